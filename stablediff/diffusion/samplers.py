"""Samplers: plain functions over a tensor of sigmas, one signature, one table.

Every sampler is `fn(model, x, sigmas, cond, noise=None, callback=None, **options)` where `model(x, sigma,
cond)` returns the denoised estimate, `x` starts at the first sigma's noise level, `noise()` draws a fresh
standard normal tensor shaped like x (from the images' own generators), and `callback(i, x, denoised)` is
called once per step. Sigmas are in the variance-exploding parametrisation x = x0 + sigma * eps, and live on the CPU: their
0-dim entries act as scalars on any device.
"""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stablediff.names import SAMPLER_LABELS


def _d(x, sigma, denoised):
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 4 with sigma(t) = t)."""
    return (x - denoised) / sigma


def ancestral_step(sigma, sigma_next, eta: float = 1.0):
    """Split a step to sigma_next into a deterministic step to sigma_down plus noise of std sigma_up."""
    if not eta or sigma_next == 0:
        return sigma_next, sigma_next * 0
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _report(callback, i, x, denoised):
    if callback is not None:
        callback(i, x, denoised)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, cond, noise=None, callback=None, eta: float = 1.0):
    """Ancestral sampling with Euler steps; with eta it is DDIM's stochastic family (Song et al. 2020, eq. 12)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        if up > 0:
            x = x + noise() * up
    return x


def sample_euler(model, x, sigmas, cond, noise=None, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn):
    the ancestral sampler without noise."""
    return sample_euler_ancestral(model, x, sigmas, cond, noise, callback, eta=0.0)


@torch.no_grad()
def sample_lcm(model, x, sigmas, cond, noise=None, callback=None):
    """Latent consistency sampling (Luo et al. 2023, Algorithm 1): jump to the model's x0, then noise it afresh to the
    next sigma. LCM's boundary condition (c_skip, c_out at timestep scaling 10) is left out: it changes x0 by less
    than 1e-5 of x at every timestep LCM visits, as the webui's sampler also does without it."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + noise() * sigmas[i + 1]
    return x


def sample_ddim(model, x, sigmas, cond, noise=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2020, eq. 12). In x / sqrt(alpha_bar) it is exactly an Euler step with ancestral
    noise of std eta * sigma_up, so it shares that code; eta=1 is DDPM's posterior sampling."""
    return sample_euler_ancestral(model, x, sigmas, cond, noise, callback, eta=eta)


@torch.no_grad()
def sample_heun(model, x, sigmas, cond, noise=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler for the last step to 0."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        d, dt = _d(x, sigmas[i], denoised), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1], cond))
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(model, x, sigma, target, d, cond):
    """DPM-Solver-2 step to `target`: the derivative taken at the log-midpoint sigma."""
    sigma_mid = sigma.log().lerp(target.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    return x + _d(x_2, sigma_mid, model(x_2, sigma_mid, cond)) * (target - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, cond, noise=None, callback=None, eta: float = 1.0):
    """DPM-Solver-2 to the ancestral step's sigma_down, then fresh noise of std sigma_up; Euler on the
    last step to 0."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = _d(x, sigmas[i], denoised)
        if down == 0:
            x = x + d * (down - sigmas[i])
        else:
            x = _dpm2_step(model, x, sigmas[i], down, d, cond)
        if up > 0:
            x = x + noise() * up
    return x


def sample_dpm_2(model, x, sigmas, cond, noise=None, callback=None):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1) in the form of Karras et al.'s Algorithm 2: the
    ancestral variant without noise."""
    return sample_dpm_2_ancestral(model, x, sigmas, cond, noise, callback, eta=0.0)


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of point i-j, exactly."""
    others = [sigmas[i - k] for k in range(order) if k != j]
    basis = np.polynomial.Polynomial([1.0])
    for s in others:
        basis = basis * np.polynomial.Polynomial([-s, 1.0]) / (sigmas[i - j] - s)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, cond, noise=None, callback=None, order: int = 4):
    """Linear multistep on the ODE derivative, up to 4th order (Karras et al. 2022 / k-diffusion)."""
    s = sigmas.double().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        ds = [_d(x, sigmas[i], denoised), *ds][:order]
        k = min(i + 1, order)
        x = x + sum(lms_coefficient(s, k, i, j) * ds[j] for j in range(k))
    return x


@torch.no_grad()
def sample_plms(model, x, sigmas, cond, noise=None, callback=None):
    """Pseudo linear multistep (Liu et al. 2022, PLMS as in CompVis): Adams-Bashforth on eps, with a
    Heun-like first step."""
    old_eps = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, cond)
        _report(callback, i, x, denoised)
        eps = _d(x, sigma, denoised)
        if not old_eps:
            e = eps
            if sigma_next > 0:
                x_2 = x + eps * (sigma_next - sigma)
                e = (eps + _d(x_2, sigma_next, model(x_2, sigma_next, cond))) / 2
        elif len(old_eps) == 1:
            e = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + e * (sigma_next - sigma)
        old_eps = [*old_eps, eps][-3:]
    return x


def _lam(sigma):
    """Half log-SNR, lambda = -log sigma (inf at sigma = 0)."""
    return -torch.log(sigma.double())


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, cond, noise=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2); first order on the first and the last step."""
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        h = (_lam(sigmas[i + 1]) - _lam(sigmas[i])).float()
        if old is not None and sigmas[i + 1] > 0:
            r = (_lam(sigmas[i]) - _lam(sigmas[i - 1])).float() / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        else:
            denoised_d = denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, cond, noise=None, callback=None, eta: float = 1.0):
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022b; k-diffusion), Gaussian noise per step."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = (_lam(sigmas[i + 1]) - _lam(sigmas[i])).float()
            eta_h = eta * h
            x = (sigmas[i + 1] / sigmas[i]) * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old is not None:
                x = x - 0.5 * torch.expm1(-h - eta_h) * (h / h_last) * (denoised - old)
            if eta:
                x = x + noise() * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt()
            h_last = h
        old = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, cond, noise=None, callback=None, eta: float = 1.0):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022b, single-step second order, r = 1/2)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + _d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:
            h = (_lam(down) - _lam(sigmas[i])).float()
            sigma_s = sigmas[i] * torch.exp(-h / 2)
            x_2 = (sigma_s / sigmas[i]) * x - torch.expm1(-h / 2) * denoised
            x = (down / sigmas[i]) * x - torch.expm1(-h) * model(x_2, sigma_s, cond)
        if up > 0:
            x = x + noise() * up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, cond, noise=None, callback=None, eta: float = 1.0, r: float = 0.5):
    """DPM-Solver++ SDE (Lu et al. 2022b; k-diffusion's sample_dpmpp_sde), two ancestral substeps per step."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, cond)
        _report(callback, i, x, denoised)
        if sigma_next == 0:
            x = x + _d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        h = (_lam(sigma_next) - _lam(sigma)).float()
        sigma_s = sigma * torch.exp(-r * h)
        down, up = ancestral_step(sigma, sigma_s, eta)
        x_2 = (down / sigma) * x - torch.expm1(-(_lam(down) - _lam(sigma)).float()) * denoised
        if up > 0:
            x_2 = x_2 + noise() * up
        denoised_2 = model(x_2, sigma_s, cond)
        down, up = ancestral_step(sigma, sigma_next, eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (down / sigma) * x - torch.expm1(-(_lam(down) - _lam(sigma)).float()) * denoised_d
        if up > 0:
            x = x + noise() * up
    return x


def _unipc_terms(lams, j, target_lam, history, order):
    """UniPC's bh2 data-prediction pieces for a step from lams[j] to target_lam using `order` points.

    history[-1] is the denoised at lams[j], history[-1-k] at lams[j-k]. Returns (h phi_1(h), which is also
    B(h) for bh2; the order conditions R and b; the scaled differences D1).
    """
    h = target_lam - lams[j]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[j - k] - lams[j]) / h
        rks.append(rk)
        d1s.append((history[-1 - k] - history[-1]) / rk.float())
    rks = torch.stack([*rks, torch.ones((), dtype=torch.float64)])
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, torch.stack(rows), torch.stack(b), d1s


def _unipc_base(x, sigma, target_sigma, h_phi_1, denoised):
    return (target_sigma / sigma) * x - h_phi_1.float() * denoised


@torch.no_grad()
def sample_unipc(model, x, sigmas, cond, noise=None, callback=None, order: int = 2):
    """UniPC (Zhao et al. 2023), B(h) = e^h - 1 (bh2), data prediction: a UniP predictor step, then
    the UniC corrector once the model has been evaluated at the new point. Lower order at the end."""
    lams = _lam(sigmas)
    steps = len(sigmas) - 1
    history, x_last, last_order = [], None, 0
    for i in range(steps):
        denoised = model(x, sigmas[i], cond)
        _report(callback, i, x, denoised)
        if history:  # UniC: redo the last step with the new model output as an extra point
            h_phi_1, rows, b, d1s = _unipc_terms(lams, i - 1, lams[i], history, last_order)
            rhos = torch.tensor([0.5], dtype=torch.float64) if last_order == 1 else torch.linalg.solve(rows, b)
            corr = sum(rho.float() * d for rho, d in zip(rhos[:-1], d1s)) + rhos[-1].float() * (denoised - history[-1])
            x = _unipc_base(x_last, sigmas[i - 1], sigmas[i], h_phi_1, history[-1]) - h_phi_1.float() * corr
        history = [*history, denoised][-order:]
        last_order = min(order, steps - i, len(history))
        x_last = x
        h_phi_1, rows, b, d1s = _unipc_terms(lams, i, lams[i + 1], history, last_order)
        x = _unipc_base(x, sigmas[i], sigmas[i + 1], h_phi_1, denoised)
        if d1s:
            rhos = [0.5] if last_order == 2 else torch.linalg.solve(rows[:-1, :-1], b[:-1]).float()
            x = x - h_phi_1.float() * sum(rho * d for rho, d in zip(rhos, d1s))
    return x


@dataclass(frozen=True)
class Sampler:
    fn: Callable
    label: str  # the AUTOMATIC1111 name, written into PNG parameters
    eta: float | None = None  # default eta for samplers that take one
    ends_at_sigma_min: bool = False  # CompVis DDIM/PLMS step last to alphas_cumprod[0], not to a clean x0
    schedule: str | None = None  # what its "default" schedule is, where not the model's own spacing


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(sample_ddim, SAMPLER_LABELS["ddim"], eta=0.0, ends_at_sigma_min=True),
    "plms": Sampler(sample_plms, SAMPLER_LABELS["plms"], ends_at_sigma_min=True),
    "ddpm": Sampler(sample_ddim, SAMPLER_LABELS["ddpm"], eta=1.0),
    "lms": Sampler(sample_lms, SAMPLER_LABELS["lms"]),
    "euler": Sampler(sample_euler, SAMPLER_LABELS["euler"]),
    "euler_a": Sampler(sample_euler_ancestral, SAMPLER_LABELS["euler_a"], eta=1.0),
    "heun": Sampler(sample_heun, SAMPLER_LABELS["heun"]),
    "dpm2": Sampler(sample_dpm_2, SAMPLER_LABELS["dpm2"]),
    "dpm2_a": Sampler(sample_dpm_2_ancestral, SAMPLER_LABELS["dpm2_a"], eta=1.0),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, SAMPLER_LABELS["dpmpp_2m"]),
    "dpmpp_2s_a": Sampler(sample_dpmpp_2s_ancestral, SAMPLER_LABELS["dpmpp_2s_a"], eta=1.0),
    "dpmpp_sde": Sampler(sample_dpmpp_sde, SAMPLER_LABELS["dpmpp_sde"], eta=1.0),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, SAMPLER_LABELS["dpmpp_2m_sde"], eta=1.0),
    "unipc": Sampler(sample_unipc, SAMPLER_LABELS["unipc"]),
    "lcm": Sampler(sample_lcm, SAMPLER_LABELS["lcm"], schedule="lcm"),
}
