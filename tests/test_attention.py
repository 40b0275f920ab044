"""Attention in CPU inference (two oneDNN matrix products per head and chunk of queries, or PyTorch's fused kernel
where that is the faster), in bf16 and fp32, against the same attention in float64 on the same inputs."""
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


@pytest.fixture
def by_products(monkeypatch):
    """The products' paths on any CPU, also where the fused kernel would be taken (fused_kernel_faster)."""
    monkeypatch.setattr(attention_module, "fused_kernel_faster", lambda dtype: False)


@pytest.fixture(params=["per head", "batched"])
def cpu_path(request, monkeypatch, by_products):
    """Each CPU path: head by head in chunks (attention past SMALL_SCORES), or all heads in one batched product."""
    size = 0 if request.param == "per head" else 1 << 30
    monkeypatch.setattr(attention_module, "SMALL_SCORES", dict.fromkeys(attention_module.SMALL_SCORES, size))
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_attention_takes_the_fused_kernel_where_it_is_faster(dtype, monkeypatch):
    """Where fused_kernel_faster says so (bf16 with AMX, fp32 on Intel CPUs), CPU inference is the fused kernel's
    own result, bit for bit; elsewhere it goes by the products."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 320, 40, generator=g).to(dtype) for _ in range(3))
    for faster in (True, False):
        monkeypatch.setattr(attention_module, "fused_kernel_faster", lambda d: faster)
        with torch.no_grad():
            assert attention_module._by_products(q, causal=False) is not faster
    monkeypatch.setattr(attention_module, "fused_kernel_faster", lambda d: d == dtype)
    merge = lambda t: t.transpose(1, 2).reshape(2, 320, 8 * 40)  # noqa: E731
    with torch.no_grad():
        ours = attention(merge(q), merge(k), merge(v), 8)
    assert torch.equal(ours, merge(F.scaled_dot_product_attention(q, k, v)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernel_takes_few_keys_padded_to_whole_rows(dtype, monkeypatch):
    """On the fused kernel's path, a prompt's 77 keys go padded to 80 with the padding masked out: the kernel's
    result on the 77 within bf16's rounding or fp32's sums in another order, and as close to exact; 600 keys (more
    than PAD_KEYS_UNDER), 80 keys, causal attention and training (gradients on) stay as they are."""
    monkeypatch.setattr(attention_module, "fused_kernel_faster", lambda d: True)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 300, 40, generator=g).to(dtype)
    merge = lambda t: t.transpose(1, 2).reshape(2, t.shape[2], 4 * 40)  # noqa: E731
    for m, padded in ((77, True), (600, False), (80, False)):
        k, v = (torch.randn(2, 4, m, 40, generator=g).to(dtype) for _ in range(2))
        with torch.no_grad():
            mask = attention_module._whole_key_rows(k, v, causal=False)[2]
            ours = attention(merge(q), merge(k), merge(v), 4)
        assert (mask is not None) == padded and (mask is None or mask.sum() == m)
        fused = merge(F.scaled_dot_product_attention(q, k, v))
        if not padded:
            assert torch.equal(ours, fused)
            continue
        exact = merge(F.scaled_dot_product_attention(q.double(), k.double(), v.double()))
        step = 2**-8 if dtype == torch.bfloat16 else 2**-20  # a rounding of bf16's; fp32's sums in another order
        assert (ours.double() - fused.double()).abs().max() <= step * fused.abs().max().double()
        assert (ours.double() - exact).abs().mean() <= 1.1 * (fused.double() - exact).abs().mean()
        assert attention_module._whole_key_rows(k, v, causal=True)[2] is None
        assert attention_module._whole_key_rows(k, v, causal=False)[2] is None  # gradients on


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, m, heads, d", [(300, 300, 2, 40), (256, 77, 1, 64), (50, 77, 8, 16)])
def test_cpu_attention_is_as_close_as_the_fused_kernel(n, m, heads, d, dtype, cpu_path):
    _check(attention, n, m, heads, d, dtype)


def test_small_cpu_attention_goes_batched_and_large_per_head():
    """SD 1.5's cross-attention at 16x16 latents (batch 2, 8 heads, 256 queries, 77 keys) is under the bound in both
    precisions; its 4096-token self-attention is not."""
    small, large = 16 * 256 * 77, 16 * 4096 * 4096
    for dtype in (torch.bfloat16, torch.float32):
        assert small <= attention_module.SMALL_SCORES[dtype] < large


def test_cpu_attention_in_chunks_of_queries(monkeypatch, cpu_path):
    """Chunks of 70 queries: 300 of them make four whole chunks and a partial one, in each head."""
    monkeypatch.setattr(attention_module, "CPU_SCORES", 70 * 300)
    _check(attention, 300, 300, 4, 40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scaled", ["all", "by chunk"])
def test_cpu_attention_with_scores_past_exps_range(dtype, scaled, cpu_path, monkeypatch):
    """Scores up to about +-100: past e^60, so these go through the softmax, which subtracts each row's maximum
    (exp alone would give inf, then NaN). Per head the path is chosen for each chunk of queries from a bound on its
    scores: "by chunk" has, in the first batch, a chunk of queries at 1x (bf16: the fused sigmoid; fp32: exp2), one
    at 4x (exp2) and one at 20x (the softmax). Against float64 on the same scores rounded to the dtype where the
    softmax and exp2 round them (in bf16, at this size, that rounding alone moves the probabilities by up to a
    fifth)."""
    monkeypatch.setattr(attention_module, "CPU_SCORES", 100 * 300)  # 3 chunks of 100 queries per head
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 80, generator=g).to(dtype) for _ in range(3))
    if scaled == "all":
        q = q * 20
    else:
        q[0, 100:200] *= 4
        q[0, 200:] *= 20
    split = lambda t: t.view(2, -1, 2, 40).transpose(1, 2)  # noqa: E731
    bounds = attention_module._score_bounds(split(q).reshape(4, 300, 40), split(k).reshape(4, 300, 40), 100)
    if scaled == "all":
        assert (bounds > attention_module.EXP_BOUND).all()
    else:  # heads of the first batch, then of the second
        sigmoid, exp2 = attention_module.SIGMOID_BOUND, attention_module.EXP_BOUND
        assert (bounds[:2, 0] <= sigmoid).all() and (bounds[2:] <= sigmoid).all()
        assert ((sigmoid < bounds[:2, 1]) & (bounds[:2, 1] <= exp2)).all() and (bounds[:2, 2] > exp2).all()
    exact = split(q).double() @ split(k).double().transpose(-1, -2) * 40 ** -0.5
    assert exact.abs().max() > (90 if scaled == "all" else attention_module.EXP_BOUND + 20)  # by chunk: up to 86
    # the fused sigmoid takes the exp of the scores before they are rounded (its chunks: bf16, per head)
    unrounded = bounds <= attention_module.SIGMOID_BOUND if dtype == torch.bfloat16 and cpu_path == "per head" \
        else torch.zeros_like(bounds, dtype=torch.bool)
    unrounded = unrounded.repeat_interleave(100, dim=1).view(2, 2, 300, 1)
    scores = torch.where(unrounded, exact, exact.to(dtype).double())
    rounded = (torch.softmax(scores, -1) @ split(v).double()).transpose(1, 2).reshape(2, 300, 80)
    with torch.no_grad():
        ours = attention(q, k, v, 2)
    assert ours.isfinite().all()
    assert (ours.double() - rounded).abs().mean() < 2**-7 * rounded.abs().mean()


def test_compiled_cpu_bf16_attention_is_one_graph_as_close_as_the_fused_kernel(by_products):
    """torch.compile takes no out= views: under it the same products run as new tensors, in one graph (a graph
    break here made `--compile --precision bf16` compile pieces of the UNet only, slower than eager)."""
    _check(torch.compile(attention, fullgraph=True, dynamic=False), 300, 300, 2, 40)
