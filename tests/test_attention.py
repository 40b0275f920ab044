"""Attention in CPU inference (two oneDNN matrix products per head and chunk of queries, not PyTorch's fused
kernel), in bf16 and fp32, against the same attention in float64 on the same inputs."""
import pytest
import torch
import torch.nn.functional as F

from stablediff.nn import attention as attention_module
from stablediff.nn.attention import attention


def _check(fn, n, m, heads, d, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, x, heads * d, generator=g).to(dtype) for x in (n, m, m))
    exact = attention(q.double(), k.double(), v.double(), heads)
    with torch.no_grad():  # training takes the fused kernel, which has a backward
        ours = fn(q, k, v, heads)
    split = lambda t: t.view(2, -1, heads, d).transpose(1, 2)  # noqa: E731
    fused = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, n, heads * d)
    assert ours.dtype == dtype and ours.shape == (2, n, heads * d)
    ours_err, fused_err = ((t.double() - exact).abs() for t in (ours, fused))
    # the scores and probabilities are rounded to bf16 between the products (the fused kernel keeps them in fp32):
    # about twice its error, and on average under one bf16 step (2^-7) of the output's size
    assert ours_err.mean() < 2.5 * fused_err.mean()
    assert ours_err.mean() < 2**-7 * exact.abs().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, m, heads, d", [(300, 300, 2, 40), (256, 77, 1, 64), (50, 77, 8, 16)])
def test_cpu_attention_is_as_close_as_the_fused_kernel(n, m, heads, d, dtype):
    _check(attention, n, m, heads, d, dtype)


def test_cpu_attention_in_chunks_of_queries(monkeypatch):
    """Chunks of 70 queries: 300 of them make four whole chunks and a partial one, in each head."""
    monkeypatch.setattr(attention_module, "CPU_SCORES", 70 * 300)
    _check(attention, 300, 300, 4, 40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_with_scores_past_exps_range(dtype):
    """Scores up to about +-100: past e^60, so these go through the softmax, which subtracts each row's maximum
    (exp alone would give inf, then NaN). Against float64 on the same scores rounded to the dtype, as both paths
    round them (in bf16, at this size, that rounding alone moves the probabilities by up to a fifth)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 80, generator=g).to(dtype) for _ in range(3))
    q = q * 20
    split = lambda t: t.view(2, -1, 2, 40).transpose(1, 2)  # noqa: E731
    scores = (split(q).double() @ split(k).double().transpose(-1, -2) * 40 ** -0.5).to(dtype).double()
    assert scores.abs().max() > 90
    rounded = (torch.softmax(scores, -1) @ split(v).double()).transpose(1, 2).reshape(2, 300, 80)
    with torch.no_grad():
        ours = attention(q, k, v, 2)
    assert ours.isfinite().all()
    assert (ours.double() - rounded).abs().mean() < 2**-7 * rounded.abs().mean()


def test_compiled_cpu_bf16_attention_is_one_graph_as_close_as_the_fused_kernel():
    """torch.compile takes no out= views: under it the same products run as new tensors, in one graph (a graph
    break here made `--compile --precision bf16` compile pieces of the UNet only, slower than eager)."""
    _check(torch.compile(attention, fullgraph=True, dynamic=False), 300, 300, 2, 40)
