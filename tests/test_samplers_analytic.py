"""Samplers against their defining equations where the answer is known in closed form.

For Gaussian data x0 ~ N(mu, s^2) the exact denoiser is D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu),
and the probability-flow ODE maps x(sigma_a) - mu to (x - mu) * sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)).
This checks the samplers diffusers lacks (DPM++ 2S a, DPM++ SDE) and every other one the same way.
"""
import pytest
import torch

from stablediff.diffusion.samplers import SAMPLERS
from stablediff.diffusion.schedules import karras
from stablediff.pipelines.common import parse_sampler
from stablediff.errors import UserError

MU, S2 = 0.3, 0.25
SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146  # SD's discrete schedule ends


def gaussian_denoiser(x, sigma, cond):
    return MU + S2 / (S2 + sigma**2) * (x - MU)


def run(name, sigmas, x0, eta=None, seed=0):
    spec, g = SAMPLERS[name], torch.Generator().manual_seed(seed)
    x = MU + x0 * (S2 + sigmas[0] ** 2) ** 0.5  # exact marginal at the first sigma
    options = {} if spec.eta is None else {"eta": eta}
    return spec.fn(gaussian_denoiser, x, sigmas, {}, noise=lambda: torch.randn(x.shape, generator=g), **options)


ORDER = {"ddim": 1, "ddpm": 1, "euler": 1, "euler_a": 1, "heun": 2, "dpm2": 2, "dpm2_a": 2, "dpmpp_2m": 2,
         "dpmpp_2s_a": 2, "dpmpp_sde": 2, "dpmpp_2m_sde": 2, "unipc": 2, "plms": 2, "lms": 3}


@pytest.mark.parametrize("name", list(ORDER))
def test_deterministic_form_converges_at_its_order(name):
    """With eta = 0, error against the exact ODE solution falls 2^order-fold per doubling of steps."""
    x0 = torch.randn(4096, generator=torch.Generator().manual_seed(1))
    errors = []
    for steps in (64, 128):
        sigmas = karras(steps, 0.1, SIGMA_MAX).float()  # stop at 0.1: the exact solution is still closed form
        exact = MU + x0 * (S2 + sigmas[-1] ** 2) ** 0.5
        errors.append((run(name, sigmas, x0, eta=0.0) - exact).abs().max().item())
    ratio = errors[0] / errors[1]
    if ORDER[name] == 1:
        assert 1.8 < ratio < 2.3, ratio
    else:
        assert ratio > 3.5 and errors[1] < 5e-3, (ratio, errors)
    if ORDER[name] == 3:
        assert ratio > 8, ratio


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde"])
def test_stochastic_form_samples_the_data_distribution(name):
    """With eta = 1 the samples end distributed as the data, N(mu, s^2)."""
    x0 = torch.randn(100_000, generator=torch.Generator().manual_seed(2))
    sigmas = torch.cat([karras(300, SIGMA_MIN, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)]).float()
    out = run(name, sigmas, x0, eta=1.0)
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() - S2**0.5) < 0.015


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_point_mass_data_is_reached_exactly(name):
    c = torch.full((2, 4, 8, 8), 0.7)
    sigmas = torch.cat([karras(10, SIGMA_MIN, SIGMA_MAX), torch.zeros(1, dtype=torch.float64)]).float()
    g = torch.Generator().manual_seed(0)
    spec = SAMPLERS[name]
    x = torch.randn(c.shape, generator=g) * SIGMA_MAX
    options = {} if spec.eta is None else {"eta": spec.eta}
    out = spec.fn(lambda x, s, cond: c.clone(), x, sigmas, {}, noise=lambda: torch.randn(c.shape, generator=g), **options)
    assert (out - c).abs().max() < 1e-5


@pytest.mark.parametrize("given,expected", [
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("Euler a", ("euler_a", "default")), ("k_lms", ("lms", "default")),
    ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")), ("UniPC", ("unipc", "default")),
    ("dpm2_a", ("dpm2_a", "default")), ("DPM2 a Karras", ("dpm2_a", "karras")), ("DDIM", ("ddim", "default")),
])
def test_sampler_names(given, expected):
    assert parse_sampler(given) == expected


def test_explicit_schedule_wins_and_unknown_names_list_the_valid_ones():
    assert parse_sampler("DPM++ 2M Karras", "trailing") == ("dpmpp_2m", "trailing")
    assert parse_sampler(None) == (None, None) and parse_sampler(None, "karras") == (None, "karras")
    with pytest.raises(UserError, match="dpmpp_2m_sde"):
        parse_sampler("dpm++ 9000")
    with pytest.raises(UserError, match="karras"):
        parse_sampler("euler", "cosine")
