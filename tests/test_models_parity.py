"""Our text encoder, UNet and VAE equal the reference implementations on the same random weights (fp32)."""
import pytest
import torch

from stablediff import StableDiffusion

TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def pair(request, tiny_model_dir, tiny_v_model_dir):
    from diffusers import StableDiffusionPipeline

    path = tiny_model_dir if request.param == "sd1" else tiny_v_model_dir
    ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    return StableDiffusion.load(path, device="cpu", dtype="fp32"), ref


@torch.no_grad()
def test_text_encoder(pair):
    ours, ref = pair
    ids = ours.tokenizer(["a photo of a cat", "", "an astronaut riding a horse on mars, 8k " * 5])
    expected = ref.text_encoder(ids)[0]
    assert (ours.text_encoder(ids) - expected).abs().max() < TOL


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])  # 9x7 latents: odd sizes must line up in the up path
@torch.no_grad()
def test_unet(pair, hw):
    ours, ref = pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([999.0, 261.37])  # fractional timesteps, as karras schedules give
    ctx = torch.randn(2, 77, 128, generator=g)
    expected = ref.unet(x, t, ctx).sample
    assert expected.std() > 0.1
    assert (ours.unet(x, t, ctx) - expected).abs().max() < TOL


@torch.no_grad()
def test_vae(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert (ours.vae.decode(z) - ref.vae.decode(z).sample).abs().max() < TOL
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mean, logvar = ours.vae.encode(image)
    dist = ref.vae.encode(image).latent_dist
    assert (mean - dist.mean).abs().max() < TOL and (logvar - dist.logvar).abs().max() < TOL
