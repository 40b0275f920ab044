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


@pytest.mark.parametrize("stride, padding, kernel", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_packed_conv_is_f_conv2d_and_follows_weight_and_shape_changes(stride, padding, kernel):
    """nn.packed.Conv2d in CPU inference: bit for bit F.conv2d on channels-last bf16 tensors (bf16 1x1 ones as an
    inner product over the pixels), and fp32's within rounding; the packed copy is made again when the weight
    changes in place (a LoRA merged) or the input's shape does; with gradients on, nn.Conv2d's own forward."""
    from stablediff.nn.packed import Conv2d

    if not layers.onednn_linear():
        pytest.skip("needs torch with oneDNN")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        conv = Conv2d(48, 40, kernel, stride=stride, padding=padding).to(dtype, memory_format=torch.channels_last)
        for shape in ((2, 48, 16, 16), (1, 48, 12, 20)):
            x = torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ours = conv(x)
                expected = F.conv2d(x, conv.weight, conv.bias, stride, padding)
                if dtype == torch.bfloat16:
                    assert torch.equal(ours, expected)
                else:
                    assert (ours - expected).abs().max() <= 1e-5 * expected.abs().max()
                by_pixels = dtype == torch.bfloat16 and kernel == 1
                slot, key = ("_packed_rows", shape[0] * shape[2] * shape[3]) if by_pixels else ("_packed_weight", shape)
                assert conv.__dict__[slot][1][1] == key
                conv.weight.mul_(0.5)  # in place, as a LoRA merge
                assert torch.allclose(conv(x).float(), expected.float() * 0.5 + conv.bias.float()[:, None, None] * 0.5,
                                      atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
                conv.weight.mul_(2.0)
    x = torch.randn(1, 48, 8, 8, requires_grad=True)
    conv = Conv2d(48, 40, 3, padding=1)
    conv(x).sum().backward()
    assert x.grad is not None and "_packed_weight" not in conv.__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_packed_conv_goes_in_parts_of_input_channels(dtype):
    """A stride-1 3x3 convolution over more than PART input channels runs as parts of them, each added to the sum
    so far (nn.packed.PART): the convolution within fp32's rounding, or in bf16 within two roundings (one for the
    sum of the parts before); with a residual as well; strided and narrow ones in one part."""
    from stablediff.nn import packed
    from stablediff.nn.packed import Conv2d

    if not layers.onednn_linear():
        pytest.skip("needs torch with oneDNN")
    torch.manual_seed(0)
    cl = torch.channels_last
    c = 2 * packed.PART + 20
    x, r = (torch.randn(*shape).to(dtype, memory_format=cl) for shape in ((2, c, 5, 6), (2, 24, 5, 6)))
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for conv, parts in ((Conv2d(c, 24, 3, padding=1), 3), (Conv2d(c, 24, 3, stride=2), 1),
                        (Conv2d(packed.PART, 24, 3, padding=1), 1)):
        conv = conv.to(dtype, memory_format=cl)
        inp = x[:, :conv.in_channels].contiguous(memory_format=cl)
        w, b = conv.weight.double(), conv.bias.double()
        exact = F.conv2d(inp.double(), w, b, conv.stride, conv.padding)
        with torch.no_grad():
            ours = conv(inp)
            assert len(conv.__dict__["_packed_weight"][2]) == parts
            assert ours.is_contiguous(memory_format=cl)
            assert (ours.double() - exact).abs().max() <= tol * exact.abs().max()
            if conv.stride == (1, 1) and conv.kernel_size == (3, 3):
                summed = conv(inp, add=r).double()
                assert (summed - exact - r.double()).abs().max() <= tol * (exact + r.double()).abs().max()


def test_packed_bf16_linear_weights_are_kept_across_calls_and_follow_in_place_changes():
    """layers.Linear and geglu in bf16 run on weights packed once (nn.packed.linear_weight): bit for bit the products
    on the plain weights, packed again only when the weight changes in place (a LoRA merged)."""
    if not layers.onednn_linear():
        pytest.skip("needs torch with oneDNN")
    g = torch.Generator().manual_seed(0)
    lin = Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(2, 40, 64, generator=g).to(torch.bfloat16)
    plain = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad():
        assert torch.equal(lin(x), plain(x, lin.weight, lin.bias, "none", [], ""))
        kept = lin.__dict__["_packed_weight"][2]
        lin(x)
        assert lin.__dict__["_packed_weight"][2] is kept
        h, gate = lin.weight.chunk(2)
        b, b_gate = lin.bias.chunk(2)
        expected = plain.binary(x, plain(x, gate, b_gate, "gelu", [], "none"), h, b, "mul")
        assert torch.equal(geglu(x, lin), expected)
        halves = lin.__dict__["_packed_h"][2], lin.__dict__["_packed_gate"][2]
        geglu(x, lin)
        assert lin.__dict__["_packed_h"][2] is halves[0] and lin.__dict__["_packed_gate"][2] is halves[1]
        lin.weight.mul_(0.5)
        assert torch.equal(lin(x), plain(x, lin.weight, lin.bias, "none", [], ""))
        assert lin.__dict__["_packed_weight"][2] is not kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv 3x3", "conv 1x1", "conv 3x3 NCHW residual"])
def test_residual_added_by_the_product_is_the_plain_sum(dtype, kind):
    """layer(x, add=r) is r + layer(x): in fp32 bit for bit, in bf16 rounded once instead of twice (at most one bf16
    step of the sum, and no further from the exact sum than the plain one), in the residual's layout; with
    gradients on, and for NCHW residuals of packed convolutions, the plain sum itself."""
    from stablediff.nn.packed import Conv2d, layout
    from stablediff.nn.winograd import Conv3x3

    torch.manual_seed(0)
    cl = torch.channels_last
    if kind == "linear":
        layer, x, r = Linear(64, 48), torch.randn(2, 30, 64), torch.randn(2, 30, 48)
    else:
        layer = Conv3x3(32, 24) if kind.startswith("conv 3x3") else Conv2d(32, 24, 1)
        layer, x = layer.to(memory_format=cl), torch.randn(2, 32, 9, 11).to(memory_format=cl)
        r = torch.randn(2, 24, 9, 11)
        r = r if kind.endswith("NCHW residual") else r.to(memory_format=cl)
    layer, x, r = layer.to(dtype), x.to(dtype), r.to(dtype)
    with torch.no_grad():
        ours, plain = layer(x, add=r), r + layer(x)
        w, b = layer.weight.double(), layer.bias.double()
        exact = r.double() + (F.linear(x.double(), w, b) if kind == "linear" else
                              F.conv2d(x.double(), w, b, padding=layer.padding))
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=layout(r))
    if dtype == torch.float32 or kind.endswith("NCHW residual"):
        assert torch.equal(ours, plain)
    else:
        err = (ours.double() - exact).abs()
        assert (err <= 2**-8 * exact.abs() + 1e-6).all() and err.mean() <= (plain.double() - exact).abs().mean()
    x.requires_grad_(True)
    assert torch.equal(layer(x, add=r), r + layer(x))
