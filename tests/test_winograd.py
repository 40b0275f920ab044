"""3x3 convolutions by Winograd F(4x4, 3x3) (stablediff.nn.winograd): the same result as the direct convolution
within its own rounding, taken only where it applies, and the same images end to end."""
import pytest
import torch
import torch.nn.functional as F

from stablediff.nn import winograd

from test_txt2img_parity import KARRAS, STEPS, assert_close, reference_image


def _case(n, c, k, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)  # unit-scale outputs
    return x, weight, torch.randn(k, generator=g)


@pytest.mark.parametrize("n,c,k,h,w", [(2, 320, 320, 16, 16), (1, 64, 96, 13, 30), (3, 8, 4, 5, 3), (1, 5, 7, 1, 1)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_equals_the_direct_convolution_within_its_rounding(n, c, k, h, w, with_bias, layout):
    """Against fp64, within 1e-4 on unit-scale outputs (sizes that are not multiples of the 4x4 tile included), in
    the input's layout (the UNet's channels-last on AVX512 CPUs, NCHW elsewhere). The direct fp32 convolution's
    error is 3e-6 to 3e-5 here; a wrong transform or tile gives errors of order 1."""
    x, weight, bias = _case(n, c, k, h, w)
    bias = bias if with_bias else None
    exact = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)
    x, weight = x.contiguous(memory_format=layout), weight.contiguous(memory_format=layout)
    got = winograd.conv3x3(F.pad(x, (1, 1, 1, 1)), winograd.filters(weight), bias)
    assert got.shape == exact.shape and got.is_contiguous(memory_format=layout)
    assert exact.std() > 0.2 and (got.double() - exact).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_bands_of_tile_rows_and_groups_of_outputs_give_the_same_result(monkeypatch, layout):
    x, weight, bias = _case(2, 16, 24, 37, 21)
    x = x.contiguous(memory_format=layout)
    whole = winograd.conv3x3(F.pad(x, (1, 1, 1, 1)), winograd.filters(weight), bias)
    monkeypatch.setattr(winograd, "MAX_BUFFER", 36 * 16 * 10)  # output channels in groups of 10, 1 tile row a band
    parts = winograd.filters(weight)
    assert [u.shape[1] for u in parts] == [10, 10, 4]
    assert torch.equal(winograd.conv3x3(F.pad(x, (1, 1, 1, 1)), parts, bias), whole)


@pytest.fixture
def avx2(monkeypatch):
    """A CPU of the kind Winograd pays on, whatever this one is."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")


def test_taken_only_for_fp32_cpu_inference_with_enough_channels_and_tiles(avx2, monkeypatch):
    conv = winograd.Conv3x3(320, 320)
    assert set(conv.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 320, 32, 32)  # 128 tiles of 4x4
    with torch.no_grad():
        assert winograd.applies(conv, x)
        assert not winograd.applies(conv, x[:, :, :16])  # 64 tiles
        assert not winograd.applies(conv, x.bfloat16())
        assert not winograd.applies(winograd.Conv3x3(320, 4), x)  # the UNet's last conv: too few outputs
        assert not winograd.applies(torch.nn.Conv2d(320, 320, 3, stride=2, padding=1), x)
        assert winograd.applies(conv, F.pad(x, (1, 1, 1, 1)), padded=True)
    assert not winograd.applies(conv, x)  # training: gradients go through the direct convolution
    with torch.no_grad():
        assert (conv(x) - F.conv2d(x, conv.weight, conv.bias, padding=1)).abs().max() < 1e-4
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        monkeypatch.setattr(winograd, "intel_cpu", lambda: False)
        assert not winograd.applies(conv, x)  # where the direct convolution is faster (an AMD EPYC)
        monkeypatch.setattr(winograd, "intel_cpu", lambda: True)
        assert winograd.applies(conv, x)  # and where MKL's products keep up with it


@pytest.fixture
def everywhere(monkeypatch, avx2):
    """Winograd for every 3x3 convolution of the tiny models (too small for it otherwise); counts its calls."""
    calls, real = [], winograd.conv3x3
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 0.0)
    monkeypatch.setattr(winograd, "MIN_TILES", 0)
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def test_txt2img_matches_diffusers_with_every_conv_by_winograd(ours, reference, everywhere):
    expected = reference_image(reference, "DPMSolverMultistepScheduler", KARRAS, {})
    got = ours.txt2img("a photo of a cat", steps=STEPS, sampler="dpmpp_2m", schedule="karras", seed=3,
                       width=64, height=64)
    assert len(everywhere) > 100
    assert_close(got, expected)


def test_banded_decode_with_winograd_equals_the_whole_direct_decode(ours, everywhere, monkeypatch):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 96, 80, generator=g)
    with torch.no_grad():
        bands = ours.vae.decode(z, banded=True)
        assert everywhere
        monkeypatch.setattr(winograd, "MIN_TILES", 1 << 40)  # the direct convolution throughout
        whole = ours.vae.decode(z)
    assert whole.std() > 0.1 and (bands - whole).abs().max().item() < 1e-4
