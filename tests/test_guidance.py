"""Guidance runs each latent once up to the first layer that reads the text (UNet.forward's rows): the result must be
the model's on the latents repeated, row for row. And a guidance interval guides only at its sigmas."""
import pytest
import torch

from stablediff.checkpoints.original import sampling_from_yaml
from stablediff.diffusion.guidance import CFGDenoiser
from stablediff.errors import UserError
from stablediff.models.unet import UNet, UNetConfig

CONFIGS = {
    # SD 1.x layout: the first level's transformer reads the text
    "sd1": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_levels=(True, True, False),
                      heads=(2, 4, 4), context_dim=48),
    # the x4 upscaler's layout: no attention at the first level, a cross-only second level, class labels
    "upscaler": UNetConfig(in_channels=7, model_channels=32, channel_mult=(1, 2, 2), attention_levels=(False, True, True),
                           heads=(2, 4, 4), context_dim=48, use_linear_proj=True, num_classes=1000,
                           cross_only=(False, True, False), transformer_depth=2),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("rows", [[0, 1, 0, 1], [0, 1, 1, 0, 1]])  # plain guidance; a prompt in two parts ("a AND b")
def test_shared_latents_give_the_repeated_result(name, rows):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, 16, 16)
    t = torch.tensor([500.0, 500.0])
    rows = torch.tensor(rows)
    context = torch.randn(len(rows), 7, cfg.context_dim)
    y = torch.tensor([20, 20]) if cfg.num_classes else None
    with torch.no_grad():
        shared = unet(x, t, context, y=y, rows=rows)
        repeated = unet(x[rows], t[rows], context, y=None if y is None else y[rows])
    assert shared.shape == repeated.shape == (len(rows), 4, 16, 16)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    # two rows of one latent under different text differ, so the text is read after the rows are repeated
    again = rows.tolist().index(0, 1)
    assert (shared[0] - shared[again]).abs().max() > 1e-3


def test_guidance_applies_only_within_its_interval():
    """A stand-in denoiser whose prediction is each row's text: inside the interval the guided mix, outside the
    prompt's prediction alone, from one call without the negative rows."""
    calls = []

    def inner(x, sigma, cond):
        calls.append(len(cond["context"]))
        return cond["context"][:, :1, :1, None].expand(-1, *x.shape[1:]).clone()

    x = torch.zeros(2, 4, 8, 8)
    cond = {"context": torch.tensor([1.0, 2.0]).view(2, 1, 1), "uncond": torch.tensor([0.5, 0.5]).view(2, 1, 1)}
    den = CFGDenoiser(inner, 5.0, interval=(1.0, 10.0))
    inside, outside = den(x, torch.tensor([3.0, 3.0]), cond), den(x, torch.tensor([0.5, 0.5]), cond)
    assert calls == [4, 2]
    assert inside[:, 0, 0, 0].tolist() == [0.5 + 5 * 0.5, 0.5 + 5 * 1.5]
    assert outside[:, 0, 0, 0].tolist() == [1.0, 2.0]


def test_guidance_interval_from_the_model_config():
    assert sampling_from_yaml({"default_guidance_interval": [1, float("inf")]}) == {"guidance_interval": (1.0, float("inf"))}
    for bad in ([2, 1], [1], "1 inf", [-1, 2], [True, 2]):
        with pytest.raises(UserError, match="default_guidance_interval"):
            sampling_from_yaml({"default_guidance_interval": bad})
