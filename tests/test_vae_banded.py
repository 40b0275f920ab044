"""Large images go through the VAE in bands of rows (stablediff.nn.banded): less memory, the same picture. The
whole-image GroupNorm statistics and the neighbours' rows at every band edge leave nothing to blend, so the
banded result is compared with the whole-image one at float precision (under 1e-4 in [-1, 1] units)."""
import pytest
import torch

from stablediff.nn import banded


def _smooth_latents(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random latents with structure at several scales, as real ones have."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.randn(1, 4, h // 8 + 1, w // 8 + 1, generator=g), size=(h, w),
                                             mode="bicubic")
    return coarse + 0.3 * torch.randn(1, 4, h, w, generator=g)


@pytest.fixture
def bands_run(monkeypatch) -> list:
    """Counts the VAE's banded runs, so a test knows the pipeline took that path and did not compare the whole
    decode with itself."""
    from stablediff.models import vae

    calls, real = [], vae.run_banded
    monkeypatch.setattr(vae, "run_banded", lambda layers, x: calls.append(x.shape) or real(layers, x))
    return calls


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from stablediff import StableDiffusion

    return StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")


def test_a_1024_decode_in_bands_equals_the_whole_decode(model, bands_run):
    """1024x1024 pixels (above the banding threshold) through the pipeline's decode: no seam, no colour shift."""
    from stablediff.pipelines.common import _vae_decode

    latents = _smooth_latents(1024 // model.vae_scale, 1024 // model.vae_scale)
    with torch.no_grad():
        whole = model.vae.decode(latents / model.vae.config.scaling_factor, banded=False)
        bands = _vae_decode(model, latents / model.vae.config.scaling_factor)
    assert len(bands_run) == 1
    assert whole.shape == (1, 3, 1024, 1024) and whole.std() > 0.1
    assert (bands - whole).abs().max().item() < 1e-4  # [-1, 1] units: 0.013/255


def test_a_1024_encode_in_bands_equals_the_whole_encode(model, bands_run):
    from stablediff.pipelines.common import encode_image

    g = torch.Generator().manual_seed(1)
    pixels = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, size=(1024, 1024),
                                             mode="bilinear")
    with torch.no_grad():
        mean, _ = model.vae.encode(pixels, banded=False)
    got = encode_image(model, pixels, lambda: torch.zeros_like(mean)) / model.vae.config.scaling_factor
    assert len(bands_run) == 1
    assert mean.std() > 0.01 and (got - mean).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", [(13, 19), (24, 8)])
def test_many_small_bands_at_odd_sizes(model, monkeypatch, size):
    """Bands of 8 rows (the least) at odd latent sizes: every band edge of every layer, stride-2 convolutions and
    the asymmetric padding of the encoder's downsampling included."""
    monkeypatch.setattr(banded, "BAND_ELEMENTS", 1)
    z = _smooth_latents(*size, seed=2)
    with torch.no_grad():
        whole, bands = model.vae.decode(z, banded=False), model.vae.decode(z, banded=True)
        assert (bands - whole).abs().max().item() < 1e-4
        x = whole.clamp(-1, 1)
        (m1, v1), (m2, v2) = model.vae.encode(x, banded=False), model.vae.encode(x, banded=True)
    assert (m2 - m1).abs().max().item() < 1e-4 and (v2 - v1).abs().max().item() < 1e-4


def test_group_stats_match_group_norm():
    x = torch.randn(2, 64, 40, 24) * 3 + 5  # far from zero mean: the statistics are taken around the mean
    mean, rstd = banded.group_stats(x, 32, 1e-6)
    y = ((x.view(2, 32, -1) - mean.view(2, 32, 1)) * rstd.view(2, 32, 1)).view_as(x)
    assert torch.allclose(y, torch.nn.functional.group_norm(x, 32, eps=1e-6), atol=1e-5)


def test_long_attention_in_chunks_of_queries_is_the_same(monkeypatch):
    from stablediff.nn import attention as attn

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 64, generator=g) for _ in range(3))
    whole = attn.attention(q, k, v, heads=2)
    monkeypatch.setattr(attn, "MAX_SCORES", 2 * 2 * 300 * 70)  # chunks of 70 queries, the last one short
    assert torch.allclose(attn.attention(q, k, v, heads=2), whole, atol=1e-6)
