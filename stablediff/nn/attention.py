"""The one entry point to attention: everything goes through scaled_dot_product_attention."""
import torch
import torch.nn.functional as F
from torch import nn

MAX_SCORES = 1 << 28  # elements of one attention's score matrix; past it, queries go in chunks


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
    if causal or rows >= n:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:  # each query's row is independent: chunks bound the memory where a kernel would hold all the scores
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v) for i in range(0, n, rows)], dim=2)
    return out.to(dtype).transpose(1, 2).reshape(b, n, inner)


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
