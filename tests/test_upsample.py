"""The upsampling conv as 2x2 convolutions of the source (nn.layers.upsample_conv) against the nearest upsample
followed by the 3x3 conv, which is what it stands for."""
import pytest
import torch
import torch.nn.functional as F

from stablediff.nn.layers import Upsample


def _reference(up: Upsample, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), up.conv.weight.double(),
                    up.conv.bias.double(), padding=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_conv_is_the_upsample_then_the_conv(dtype, channels_last):
    """Against the fp32 model in float64: in bf16 the folded filters are sums of the bf16 weights rounded once
    more, which adds about a quarter to the error of the two steps in bf16 (1.24x measured)."""
    torch.manual_seed(0)
    model = Upsample(24)
    x = torch.randn(2, 24, 7, 10).to(dtype)
    exact = _reference(model, x)
    up = Upsample(24)
    up.load_state_dict(model.state_dict())
    up = up.to(dtype)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ours = up(x)
        direct = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # the two steps in this dtype
    assert ours.shape == (2, 24, 14, 20) and ours.dtype == dtype
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ours_err, direct_err = ((t.double() - exact).abs().mean() for t in (ours, direct))
    if dtype == torch.float32:
        assert ours_err < 1e-6 * exact.abs().mean()
    else:
        assert ours_err < 1.4 * direct_err


def test_upsample_refolds_after_its_weight_changes_in_place():
    torch.manual_seed(0)
    up, x = Upsample(8), torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        up(x)
        up.conv.weight.mul_(-2)  # as a LoRA merged into the weights would
        torch.testing.assert_close(up(x).double(), _reference(up, x), rtol=1e-5, atol=1e-5)


def test_upsample_to_an_odd_size_takes_the_nearest_upsample():
    torch.manual_seed(0)
    up, x = Upsample(8), torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        out = up(x, size=(9, 9))
    expected = F.conv2d(F.interpolate(x, size=(9, 9), mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_takes_winograd_on_the_upsampled_image_only_where_the_folded_filters_run_unpacked(
        channels_last, monkeypatch):
    """Where Winograd would take the conv on the upsampled image: NCHW (not packed) it does; channels-last in fp32,
    the folded filters run on packed weights and are the faster, so they run."""
    from stablediff.nn import layers, winograd

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 0.0)
    monkeypatch.setattr(winograd, "MIN_TILES", 0)
    folded, real = [], layers.upsample_conv
    monkeypatch.setattr(layers, "upsample_conv", lambda *a: folded.append(1) or real(*a))
    torch.manual_seed(0)
    up, x = Upsample(8), torch.randn(1, 8, 5, 5)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert winograd.applies(up.conv, x, scale=2)
        torch.testing.assert_close(up(x).double(), _reference(up, x), rtol=1e-4, atol=1e-4)
    assert folded == ([1] if channels_last else [])
