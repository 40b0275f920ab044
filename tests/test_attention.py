"""bf16 attention on the CPU (two matrix products per chunk of queries, not PyTorch's fused kernel) against the
same attention in float64 on the same bf16 inputs."""
import pytest
import torch
import torch.nn.functional as F

from stablediff.nn.attention import CPU_BF16_ROWS, attention


def _check(fn, n, m, heads, d):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, x, heads * d, generator=g).bfloat16() for x in (n, m, m))
    exact = attention(q.double(), k.double(), v.double(), heads)
    with torch.no_grad():  # training takes the fused kernel, which has a backward
        ours = fn(q, k, v, heads)
    split = lambda t: t.view(2, -1, heads, d).transpose(1, 2)  # noqa: E731
    fused = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, n, heads * d)
    assert ours.dtype == torch.bfloat16 and ours.shape == (2, n, heads * d)
    ours_err, fused_err = ((t.double() - exact).abs() for t in (ours, fused))
    # the scores and probabilities are rounded to bf16 between the products (the fused kernel keeps them in fp32):
    # about twice its error, and on average under one bf16 step (2^-7) of the output's size
    assert ours_err.mean() < 2.5 * fused_err.mean()
    assert ours_err.mean() < 2**-7 * exact.abs().mean()


@pytest.mark.parametrize("n, m, heads, d", [(300, 300, 2, 40), (CPU_BF16_ROWS, 77, 1, 64), (50, 77, 8, 16)])
def test_cpu_bf16_attention_is_as_close_as_the_fused_kernel(n, m, heads, d):
    _check(attention, n, m, heads, d)


def test_cpu_bf16_attention_with_scores_past_exps_range():
    """Scores up to about +-100: past e^60, so these go through the softmax, which subtracts each row's maximum
    (exp alone would give inf, then NaN). Against float64 on the same scores rounded to bf16, as both paths round
    them (at this size that rounding alone moves the probabilities by up to a fifth)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 80, generator=g).bfloat16() for _ in range(3))
    q = q * 20
    split = lambda t: t.view(2, -1, 2, 40).transpose(1, 2)  # noqa: E731
    scores = (split(q).double() @ split(k).double().transpose(-1, -2) * 40 ** -0.5).bfloat16().double()
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
