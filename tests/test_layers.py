"""nn.layers.Linear and geglu: oneDNN's inner product in CPU inference, F.linear otherwise; the same results within
rounding."""
import pytest
import torch
import torch.nn.functional as F

from stablediff.nn import layers
from stablediff.nn.layers import Linear, geglu


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_in_inference_matches_f_linear(dtype, tol, bias):
    assert layers.onednn_linear() == torch.backends.mkldnn.is_available()
    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 80, bias=bias).to(dtype)
    x = torch.randn(3, 50, 96, generator=g).to(dtype)
    for inp in (x, x[0], x.transpose(0, 1)):  # batched, 2-D, strided
        with torch.no_grad():
            ours = lin(inp)
        exact = F.linear(inp.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
        assert ours.dtype == dtype and ours.shape == exact.shape
        assert (ours.double() - exact).abs().max() <= tol * exact.abs().max()


def test_linear_with_gradients_takes_f_linear():
    lin = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    lin(x).sum().backward()
    assert torch.allclose(x.grad, lin.weight.sum(0).expand(4, 16))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("bias", [True, False])
def test_geglu_fused_matches_its_definition(dtype, tol, bias):
    """h * gelu(gate) for proj(x) = [h, gate], fused on oneDNN without gradients, plain with them. In bf16 the
    fused form rounds twice (gelu(gate), the product): 2^-7 at most, relative; the plain one four times (h, gate,
    its gelu, the product): up to 1.33x that in 200 seeds here, so it is held to twice the bound."""
    torch.manual_seed(0)  # proj's init draws from the global generator
    proj = Linear(96, 2 * 80, bias=bias).to(dtype)
    x = torch.randn(3, 50, 96).to(dtype)
    for inp in (x, x[0], x.transpose(0, 1)):
        h, gate = F.linear(inp.double(), proj.weight.double(), proj.bias.double() if bias else None).chunk(2, dim=-1)
        exact = h * F.gelu(gate)
        for grad, bound in ((False, tol), (True, tol if dtype == torch.float32 else 2 * tol)):
            with torch.set_grad_enabled(grad):
                ours = geglu(inp, proj)
            assert ours.dtype == dtype and ours.shape == exact.shape
            assert (ours.double() - exact).abs().max() <= bound * exact.abs().max(), grad
