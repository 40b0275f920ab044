"""The steps every pipeline shares, written once: text encoding, sigmas, noise, sampling, decoding."""
from typing import Callable

import torch
from PIL import Image

from stablediff.diffusion.denoiser import Denoiser
from stablediff.diffusion.guidance import CFGDenoiser
from stablediff.diffusion.samplers import SAMPLERS, Sampler
from stablediff.diffusion.schedules import SCHEDULES, inference_sigmas
from stablediff.errors import UserError

# AUTOMATIC1111 labels, lower-cased, for `--sampler "DPM++ 2M Karras"` and friends
_A1111 = {s.label.lower(): name for name, s in SAMPLERS.items()}
_A1111.update({"k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun", "k_dpm_2": "dpm2",
               "k_dpm_2_a": "dpm2_a", "dpm++ 2m sde": "dpmpp_2m_sde", "uni_pc": "unipc"})


def parse_sampler(name: str, schedule: str | None = None) -> tuple[str, str]:
    """(sampler key, schedule) from our names or A1111's ("DPM++ 2M Karras" -> dpmpp_2m, karras)."""
    key = name.strip().lower()
    for suffix in ("karras", "exponential"):
        if key.endswith(" " + suffix):
            key, schedule = key[: -len(suffix) - 1].strip(), schedule or suffix
    key = _A1111.get(key, key.replace("-", "_").replace(" ", "_").replace("+", "p"))
    if key not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)} "
                        "(AUTOMATIC1111 names such as \"DPM++ 2M Karras\" work too)")
    schedule = schedule or "default"
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose from: {', '.join(SCHEDULES)}")
    return key, schedule


def sampler_sigmas(denoiser: Denoiser, sched, sampler: Sampler, steps: int, schedule: str) -> torch.Tensor:
    """The sigmas a sampler walks. CompVis' DDIM and PLMS step last to alphas_cumprod[0] rather than to 0
    unless the model's scheduler sets alpha to one; their output is then x at that small sigma."""
    sigmas = inference_sigmas(sched, steps, schedule)
    if sampler.ends_at_sigma_min and not sched.set_alpha_to_one:
        body = sigmas[:-1][sigmas[:-1] > denoiser.sigma_min * (1 + 1e-4)]
        sigmas = torch.cat([body, sigmas.new_tensor([denoiser.sigma_min])])
    return sigmas


def encode_text(model, prompts: list[str]) -> torch.Tensor:
    """(B, 77, D) text states; each distinct prompt is encoded once."""
    unique = list(dict.fromkeys(prompts))
    with torch.no_grad():
        ids = model.tokenizer(unique).to(model.device)
        states = model.text_encoder(ids)
    index = torch.tensor([unique.index(p) for p in prompts], device=states.device)
    return states[index]


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def noise_source(gens: list[torch.Generator], shape: tuple[int, ...], device) -> Callable[[], torch.Tensor]:
    """Draws (B, *shape) standard normal noise, image i from its own CPU generator, so image i of a batch
    equals the single image at seed + i and CPU and GPU start from the same numbers."""
    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    return draw


def sample(model, x, sigmas, sampler: Sampler, cond: dict, scale: float, noise, eta=None, callback=None):
    """Run a sampler under classifier-free guidance; returns latents in the model's own (VP) scale."""
    denoiser = CFGDenoiser(model.denoiser(), scale)
    options = {} if sampler.eta is None else {"eta": sampler.eta if eta is None else eta}
    x = sampler.fn(denoiser, x, sigmas, cond, noise=noise, callback=callback, **options)
    return x / (1 + sigmas[-1] ** 2) ** 0.5  # x0 + sigma * eps -> sqrt(alpha_bar) * (...); identity at sigma 0


def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (B,4,h,w) -> PIL images, one decode at a time to bound memory."""
    images = []
    with torch.no_grad():
        for z in latents:
            pixels = model.vae.decode((z[None] / model.vae.config.scaling_factor).to(model.dtype)).float()
            if not torch.isfinite(pixels).all():
                raise UserError(f"the VAE decode produced NaN/inf in {model.dtype}; run again with --precision fp32")
            pixels = (pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8)
            images.append(Image.fromarray(pixels.cpu().numpy()))
    return images
