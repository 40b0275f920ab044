"""Noise schedules as pure functions: betas -> alphas_cumprod -> sigmas, and inference sigma sequences.

Sigmas are in the variance-exploding parametrisation x = x0 + sigma * eps, sigma = sqrt((1 - a) / a).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TrainSchedule:
    """The discrete training schedule of a model (its scheduler config)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    num_train_timesteps: int = 1000
    prediction: str = "epsilon"  # or "v"
    spacing: str = "leading"  # the "default" schedule's timestep spacing: leading, trailing, linspace
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # False: DDIM/PLMS end at alphas_cumprod[0], as CompVis

    def alphas_cumprod(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta schedule {self.beta_schedule!r} (expected scaled_linear or linear)")
        return torch.cumprod(1.0 - betas, dim=0)

    def sigmas(self) -> torch.Tensor:
        """Per training timestep t = 0..n-1, ascending, float64."""
        ac = self.alphas_cumprod()
        return ((1 - ac) / ac).sqrt()


def discrete_timesteps(steps: int, spacing: str, n_train: int = 1000, offset: int = 0) -> np.ndarray:
    """Descending training timesteps for `steps` inference steps, spaced as in Table 2 of arXiv:2305.08891."""
    if spacing == "leading":
        return (np.arange(steps) * (n_train // steps)).round()[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.float64) - 1
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps)[::-1].copy()
    raise ValueError(f"unknown timestep spacing {spacing!r}")


def lcm_timesteps(steps: int, n_train: int = 1000, original_steps: int = 50) -> np.ndarray:
    """Descending timesteps of diffusers' LCMScheduler: `steps` of the `original_steps` skipping timesteps LCM was
    distilled on (19, 39, ..., 999 for 1000 and 50), evenly spaced from the top."""
    skipping = np.arange(1, original_steps + 1) * (n_train // original_steps) - 1
    if steps > original_steps:
        raise ValueError(f"LCM takes at most {original_steps} steps")
    picks = np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)
    return skipping[::-1][picks].astype(np.float64)


def sigmas_at(timesteps: np.ndarray, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Model sigmas linearly interpolated at (possibly fractional) timesteps."""
    s = model_sigmas.numpy()
    return torch.from_numpy(np.interp(timesteps, np.arange(len(s)), s))


def log_sigmas_at(timesteps: np.ndarray, model_sigmas: torch.Tensor) -> torch.Tensor:
    """Model sigmas interpolated in log sigma at fractional timesteps, as k-diffusion's t_to_sigma."""
    s = model_sigmas.log().numpy()
    return torch.from_numpy(np.interp(timesteps, np.arange(len(s)), s)).exp()


def webui_timesteps(steps: int, schedule: str, n_train: int = 1000) -> np.ndarray:
    """Descending timesteps of AUTOMATIC1111's uniform, sgm_uniform, simple and ddim schedulers (sd_schedulers.py);
    ddim steps every n_train // steps from 1 and so can give more than `steps` of them."""
    if schedule == "uniform":
        return np.linspace(n_train - 1, 0, steps)
    if schedule == "sgm_uniform":
        return np.linspace(n_train - 1, 0, steps + 1)[:-1]
    if schedule == "simple":
        return np.array([n_train - 1 - int(x * (n_train / steps)) for x in range(steps)], dtype=np.float64)
    if schedule == "ddim":
        return np.arange(1, n_train, max(n_train // steps, 1), dtype=np.float64)[::-1].copy()
    raise ValueError(f"unknown webui schedule {schedule!r}")


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5, without the final zero."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma, without the final zero."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def inference_sigmas(sched: TrainSchedule, steps: int, schedule: str = "default") -> torch.Tensor:
    """The float32 sigma sequence a sampler walks, ending in 0 (steps + 1 values; ddim's can be longer)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    model_sigmas = sched.sigmas()
    n = sched.num_train_timesteps
    if schedule == "karras":
        sigmas = karras(steps, model_sigmas[0].item(), model_sigmas[-1].item())
    elif schedule == "exponential":
        sigmas = exponential(steps, model_sigmas[0].item(), model_sigmas[-1].item())
    elif schedule in ("uniform", "sgm_uniform"):
        sigmas = log_sigmas_at(webui_timesteps(steps, schedule, n), model_sigmas)
    elif schedule in ("simple", "ddim"):
        sigmas = sigmas_at(webui_timesteps(steps, schedule, n), model_sigmas)
    elif schedule == "lcm":
        sigmas = sigmas_at(lcm_timesteps(steps, n), model_sigmas)
    else:
        spacing = sched.spacing if schedule == "default" else schedule
        offset = sched.steps_offset if spacing == "leading" else 0
        sigmas = sigmas_at(discrete_timesteps(steps, spacing, n, offset), model_sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()
