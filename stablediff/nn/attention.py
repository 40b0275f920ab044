"""The one entry point to attention: scaled_dot_product_attention, except bf16 inference on the CPU (_products)."""
import torch
import torch.nn.functional as F
from torch import nn

MAX_SCORES = 1 << 28  # elements of one attention's score matrix; past it, queries go in chunks
CPU_BF16_ROWS = 256  # queries per chunk of bf16 attention on the CPU: of 64 to 1024, fastest for SD's 4096 tokens
# Scores within +-EXP_BOUND need no maximum subtracted before exp: e^60 summed over 2^24 keys stays within
# bf16's and fp32's range, and a row's largest term, at least e^-60, far from their smallest normal numbers.
EXP_BOUND = 60.0
LOG2E = 1.4426950408889634


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
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not causal and not torch.is_grad_enabled():
        out = _products(q, k, v)
    elif causal or rows >= n:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:  # each query's row is independent: chunks bound the memory where a kernel would hold all the scores
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v) for i in range(0, n, rows)], dim=2)
    return out.to(dtype).transpose(1, 2).reshape(b, n, inner)


def _products(q, k, v):
    """softmax(q k^T / sqrt(d)) v as two batched bf16 matrix products per chunk of queries, for inference on the
    CPU (its buffers are written in place, so no gradients). There PyTorch's fused kernel runs bf16 at fp32 speed;
    this takes 125 ms against 320 ms for SD 1.5's 4096-token self-attention (batch 2) on a 2-core AVX512-BF16
    CPU (175 ms with a softmax between the products). The scores and probabilities are rounded to bf16 between the
    products, as in diffusers' attention before SDPA: about twice the fused kernel's error
    (tests/test_attention.py). (B, H, N, d) in and out."""
    b, heads, n, d = q.shape
    q, v = q.reshape(b * heads, n, d), v.reshape(b * heads, -1, d)
    kt = k.reshape(b * heads, -1, d).transpose(1, 2)
    if torch.compiler.is_compiling():  # the same products as new tensors: torch.compile takes no out= views
        return torch.cat([torch.bmm(torch.softmax(torch.bmm(q[:, i:i + CPU_BF16_ROWS] * d ** -0.5, kt), -1), v)
                          for i in range(0, n, CPU_BF16_ROWS)], 1).view(b, heads, n, d)
    bh, m = b * heads, kt.shape[2]
    # Where every score lies within +-EXP_BOUND, exp needs no row maximum subtracted first (softmax's first pass),
    # and each row's sum comes out of the second product, from a column of ones appended to v (its last pass);
    # 2^(s log2 e) for e^s, as exp2 runs faster. Otherwise the softmax, in place.
    exp = _score_bound(q, kt) <= EXP_BOUND
    if exp:
        width = -(-(d + 1) // 16) * 16  # v, a column of ones, zeros to a multiple of 16 columns (as the kernels go)
        v = torch.cat([v, v.new_ones(bh, m, 1), v.new_zeros(bh, m, width - d - 1)], dim=-1)
        summed = q.new_empty(bh, min(n, CPU_BF16_ROWS), width)
    out = torch.empty_like(q)
    scores = q.new_empty(bh * min(n, CPU_BF16_ROWS) * m)
    for i in range(0, n, CPU_BF16_ROWS):
        rows = min(n - i, CPU_BF16_ROWS)
        s = scores[:bh * rows * m].view(bh, rows, m)  # contiguous, as the in-place softmax needs
        torch.baddbmm(s, q[:, i:i + rows], kt, beta=0, alpha=d ** -0.5 * (LOG2E if exp else 1.0), out=s)
        if exp:
            o = summed[:, :rows]
            torch.bmm(s.exp2_(), v, out=o)
            torch.div(o[..., :d], o[..., d:d + 1], out=out[:, i:i + rows])
        else:
            torch._softmax(s, -1, False, out=s)  # in place: a new 32 MB tensor per chunk costs more than the softmax
            torch.bmm(s, v, out=out[:, i:i + rows])
    return out.view(b, heads, n, d)


def _score_bound(q, kt) -> float:
    """A bound on |q.k| / sqrt(d) over every query and key (Cauchy-Schwarz), from their lengths."""
    lengths = (torch.linalg.vector_norm(t, dim=dim, dtype=torch.float32).amax() for t, dim in ((q, -1), (kt, 1)))
    return float(next(lengths) * next(lengths)) * q.shape[-1] ** -0.5


class CrossAttention(nn.Module):
    """Attention with q from x and k, v from context (x itself when context is None)."""

    def __init__(self, dim: int, context_dim: int | None, heads: int, head_dim: int, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast)
        return self.to_out(out)
