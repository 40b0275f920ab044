"""The one entry point to attention: scaled_dot_product_attention, except inference on CPUs where that is slower
(_products)."""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.devices import intel_cpu
from stablediff.nn.layers import Linear, onednn_linear

MAX_SCORES = 1 << 28  # elements of one attention's score matrix; past it, queries go in chunks
# Elements of scores in one chunk of attention on the CPU (8 MiB in fp32): one head's queries, as many as fit, so
# that its scores stay in cache between the two products and exp. For SD 1.5's 4096-token self-attention on 2
# threads, chunks of 256, 512, 1024 and 2048 queries measured 160, 153, 161 and 186 ms in fp32.
CPU_SCORES = 1 << 21
# Scores within +-EXP_BOUND need no maximum subtracted before exp: e^60 summed over 2^24 keys stays within
# bf16's and fp32's range, and a row's largest term, at least e^-60, far from their smallest normal numbers.
EXP_BOUND = 60.0
LOG2E = 1.4426950408889634
# bf16 only: scores within +-SIGMOID_BOUND go to exp as oneDNN's sigmoid fused into the first product, on its fp32
# sums before they are rounded, instead of exp2 as a pass of its own over the bf16 scores. The scores are shifted by
# -(SIGMOID_BOUND + SIGMOID_MARGIN), the same for every key and row, which cancels in the division by the row sums;
# for z <= -10, sigmoid(z) = e^z / (1 + e^z) is e^z within e^-10 = 4.5e-5 relative, far under bf16's 2^-9. The
# shifted scores lie in [-60, -10]: e^-60 is as far from bf16's smallest normal number as the exp2 path's is. SD
# 1.5's 4096-token self-attention (batch 2): about 5% faster (99.5 against 105.1 ms).
SIGMOID_BOUND, SIGMOID_MARGIN = 25.0, 10.0
# At most this many score elements over all heads, attention on the CPU goes as one batched product per side with
# the softmax, not head by head: there each oneDNN call's fixed cost (about 12 us) outweighs the work. SD 1.5 at
# 512x512, batch 2, bf16: the 256-token self-attention 1.48 against 2.60 ms, its cross-attention 0.77 against
# 1.54 ms. fp32 batched products take MKL's slower path, so there it pays only below 2^19 (that cross-attention
# 1.92 against 2.19 ms; the 256-token self-attention, 4.76 against 4.09 ms, stays per head).
SMALL_SCORES = {torch.bfloat16: 1 << 20, torch.float32: 1 << 19}
# PyTorch's fused kernel on the CPU runs fewer than 512 keys (one of its blocks of keys) about twice as fast when
# their number is a multiple of 16: on a 2-core Xeon with AMX, SD 1.5's cross-attention to the 77 tokens of a prompt
# (4096 queries, batch 2, 8 heads of 40) took 3.4 against 6.6 ms in bf16 and 5.4 against 8.7 ms in fp32 with the keys
# padded to 80 and the padding masked out, the same within a rounding. Past one block the mask costs more than the
# ragged block (2500 keys: 40 against 36 ms), so there the keys stay as they are.
KEY_ROWS, PAD_KEYS_UNDER = 16, 512


def attention(q, k, v, heads: int, causal: bool = False, upcast: bool = False):
    """Multi-head attention on (B, N, heads*d) tensors; returns (B, N, heads*d). Past MAX_SCORES elements of
    scores (the VAE's single 512-wide head over every latent pixel of a large image, which CUDA's flash kernels
    do not take), the queries go in chunks, with the same result."""
    b, n, inner = q.shape
    d = inner // heads
    # (B, N, H*d) -> (B, H, N, d)
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if upcast and dtype == torch.float16:  # SD 2.x overflows in fp16 attention logits
        q, k, v = q.float(), k.float(), v.float()
    rows = max(1, MAX_SCORES // (b * heads * k.shape[2]))
    if _by_products(q, causal):
        out = _products(q, k, v)
    else:
        k, v, mask = _whole_key_rows(k, v, causal)
        if causal or rows >= n:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        else:  # each query's row is independent: chunks bound the memory where a kernel would hold all the scores
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v, attn_mask=mask)
                             for i in range(0, n, rows)], dim=2)
    return out.to(dtype).transpose(1, 2).reshape(b, n, inner)


def _whole_key_rows(k, v, causal: bool):
    """k, v and the mask for PyTorch's fused kernel: on the CPU in inference, a few keys (PAD_KEYS_UNDER, a prompt's
    context) not a multiple of KEY_ROWS are padded to one with zeros that the mask leaves out. (B, H, M, d) in and
    out; the mask None where nothing is padded."""
    m = k.shape[2]
    if k.device.type != "cpu" or causal or torch.is_grad_enabled() or m % KEY_ROWS == 0 or m >= PAD_KEYS_UNDER:
        return k, v, None
    pad = -m % KEY_ROWS
    mask = (torch.arange(m + pad, device=k.device) < m).view(1, 1, 1, -1)
    return F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), mask


def _by_products(q, causal: bool) -> bool:
    """Inference on the CPU in fp32 or bf16 goes by _products (under torch.compile, bf16 only, as new tensors), except
    where the fused kernel is the faster (fused_kernel_faster)."""
    if q.device.type != "cpu" or causal or torch.is_grad_enabled() or fused_kernel_faster(q.dtype):
        return False
    if torch.compiler.is_compiling():
        return q.dtype == torch.bfloat16
    return q.dtype in (torch.float32, torch.bfloat16) and onednn_linear()


@functools.cache
def fused_kernel_faster(dtype: torch.dtype) -> bool:
    """Whether CPU inference in dtype goes by PyTorch's fused kernel rather than _products: bf16 on CPUs with AMX,
    whose tiles run its products, and fp32 on Intel CPUs, where its products (MKL's) take their fast path. On a
    2-core Xeon with AMX, SD 1.5's 4096-token self-attention (batch 2) took 87 against 166 ms by _products in bf16,
    181 against 227 ms in fp32 (1024 tokens: 7.3 against 14.0 ms, 19 against 27 ms); a guided 512x512 step, 1.30
    against 1.79 s in bf16, 5.10 against 5.38 s in fp32. It keeps the scores and probabilities in fp32, so in bf16
    it is the more exact of the two as well."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_amx_tile_supported()
    return dtype == torch.float32 and intel_cpu()


def _products(q, k, v):
    """softmax(q k^T / sqrt(d)) v as two oneDNN matrix products per head and chunk of queries, for inference on the
    CPU where PyTorch's fused kernel is the slower (fused_kernel_faster). Without AMX that kernel runs bf16 at fp32
    speed, and its fp32 products take MKL's path, which on AMD CPUs is the slower one: for SD 1.5's 4096-token
    self-attention (batch 2) on a 2-core AVX512-BF16 EPYC, this takes 104 ms against 320 ms in bf16 and 153 ms
    against 291 ms in fp32. In bf16 the scores and probabilities are rounded to
    bf16 between the products, as in diffusers' attention before SDPA: about twice the fused kernel's error
    (tests/test_attention.py); the fused sigmoid's chunks take exp before the scores are rounded. Attention under
    SMALL_SCORES goes by batched products instead. (B, H, N, d) in and out."""
    b, heads, n, d = q.shape
    # contiguous: oneDNN's products on rows that are not (a view of one batch's heads) ran 2,000 times slower
    q, k, v = (t.reshape(b * heads, -1, d).contiguous() for t in (q, k, v))
    bh, m = q.shape[0], k.shape[1]
    rows = max(1, CPU_SCORES // m)
    if torch.compiler.is_compiling():  # the same products as new tensors: torch.compile takes no out= views
        return torch.cat([_softmax_products(q[:, i:i + rows], k, v) for i in range(0, n, rows)], 1).view(b, heads, n, d)
    if bh * n * m <= SMALL_SCORES[q.dtype]:
        return _softmax_products(q, k, v).view(b, heads, n, d)
    # Where every score of a chunk lies within +-EXP_BOUND, exp needs no row maximum subtracted first (softmax's
    # first pass), and each row's sum comes out of the second product, from a row of ones under v^T (its last
    # pass); 2^(s log2 e) for e^s, as exp2 runs faster, or in bf16 within +-SIGMOID_BOUND, the fused sigmoid.
    # Otherwise the softmax, in place.
    sigmoid_bound = SIGMOID_BOUND if q.dtype == torch.bfloat16 else -1.0
    paths = [["softmax" if x > EXP_BOUND else "sigmoid" if x <= sigmoid_bound else "exp2" for x in head]
             for head in _score_bounds(q, k, rows).tolist()]
    taken = set(sum(paths, []))
    scale = {"exp2": d ** -0.5 * LOG2E, "sigmoid": d ** -0.5, "softmax": d ** -0.5}
    scaled = {x: q * x for x in {scale[path] for path in taken}}  # q scaled for each path taken
    # sigmoid's bias: every score of its chunks shifted into [-60, -10]
    shift = q.new_full((m,), -(SIGMOID_BOUND + SIGMOID_MARGIN)) if "sigmoid" in taken else None
    # v^T with a row of ones under it, and zero rows to a multiple of 16 (BH, width, M): oneDNN's product is a third
    # faster on such a width (4096 keys, 512 queries, d = 40: 0.26 against 0.41 ms in bf16, 0.50 against 0.69 in fp32)
    width = -(-(d + 1) // 16) * 16
    vt = torch.cat([v, v.new_ones(bh, m, 1), v.new_zeros(bh, m, width - d - 1)], dim=-1).transpose(1, 2).contiguous()
    out = torch.empty_like(q)
    product = torch.ops.mkldnn._linear_pointwise  # x w^T: (rows, K) x (N, K) -> (rows, N)
    for h in range(bh):
        for c, i in enumerate(range(0, n, rows)):
            path = paths[h][c]
            chunk = scaled[scale[path]][h, i:i + rows]  # its queries, scaled for its path
            if path == "sigmoid":
                p = product(chunk, k[h], shift, "sigmoid", [], "")
            else:
                s = product(chunk, k[h], None, "none", [], "")
                if path == "softmax":
                    out[h, i:i + rows] = product(torch._softmax(s, -1, False, out=s), vt[h, :d], None, "none", [], "")
                    continue
                p = s.exp2_()
            o = product(p, vt[h], None, "none", [], "")
            torch.div(o[:, :d], o[:, d:d + 1], out=out[h, i:i + rows])
    return out.view(b, heads, n, d)


def _softmax_products(q, k, v):
    """softmax(q k^T / sqrt(d)) v by batched products, every head at once, as new tensors: (BH, N, d) in and out."""
    return torch.bmm(torch.softmax(torch.bmm(q * q.shape[-1] ** -0.5, k.transpose(1, 2)), -1), v)


def _score_bounds(q, k, rows: int) -> torch.Tensor:
    """For each head and chunk of `rows` queries, a bound on |q.k| / sqrt(d) over its queries and the head's keys
    (Cauchy-Schwarz), from their lengths: (BH, chunks). Per chunk, not over the whole attention, so that a few
    long queries (or one head's long keys) send only their own chunks to the softmax."""
    q_len, k_len = (torch.linalg.vector_norm(t, dim=-1, dtype=torch.float32) for t in (q, k))  # (BH, N), (BH, M)
    q_len = F.pad(q_len, (0, -q_len.shape[1] % rows)).view(len(q_len), -1, rows).amax(-1)  # (BH, chunks)
    return q_len * k_len.amax(-1, keepdim=True) * q.shape[-1] ** -0.5


class CrossAttention(nn.Module):
    """Attention with q from x and k, v from context (x itself when context is None)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int, head_dim: int, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = Linear(dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, dim))

    def forward(self, x, context=None, add=None):
        """The attention's output, plus `add` (the residual) where given, added as the output product writes it."""
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out[0](out, add=add)
