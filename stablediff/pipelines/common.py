"""The steps every pipeline shares, written once: text encoding, sigmas, noise, sampling, decoding."""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from stablediff.diffusion.denoiser import Denoiser
from stablediff.diffusion.guidance import CFGDenoiser
from stablediff.diffusion.samplers import SAMPLERS, Sampler
from stablediff.diffusion.schedules import SCHEDULES, inference_sigmas
from stablediff import prompts as prompt_syntax
from stablediff.errors import UserError
from stablediff.pipelines.infotext import Params

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


def encode_text(model, prompts: list[str], clip_skip: int = 1) -> torch.Tensor:
    """(B, 77 * chunks, D) text states of prompts in AUTOMATIC1111's syntax; each distinct prompt encoded once,
    shorter prompts padded with empty chunks to the longest."""
    unique = list(dict.fromkeys(prompts))
    with torch.no_grad():
        states = prompt_syntax.encode(model.text_encoder, model.tokenizer, unique, model.device, clip_skip)
    index = torch.tensor([unique.index(p) for p in prompts], device=states.device)
    return states[index]


def match_chunks(model, a: torch.Tensor, b: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and negative prompt states padded with empty chunks to the same length, for one batched call."""
    if a.shape[1] == b.shape[1]:
        return a, b
    with torch.no_grad():
        empty = prompt_syntax.encode(model.text_encoder, model.tokenizer, [""], model.device, clip_skip)
    n = max(a.shape[1], b.shape[1]) // empty.shape[1]

    def pad(s):
        extra = n - s.shape[1] // empty.shape[1]
        return torch.cat([s, empty.expand(s.shape[0], -1, -1).repeat(1, extra, 1)], dim=1) if extra else s
    return pad(a), pad(b)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def noise_source(gens: list[torch.Generator], shape: tuple[int, ...], device) -> Callable[..., torch.Tensor]:
    """Draws (B, *shape) standard normal noise (or another per-image shape), image i from its own CPU generator,
    so image i of a batch equals the single image at seed + i and CPU and GPU start from the same numbers."""
    def draw(other: tuple[int, ...] | None = None) -> torch.Tensor:
        return torch.stack([torch.randn(other or shape, generator=g) for g in gens]).to(device)
    return draw


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise UserError(f"image size {width}x{height} is not possible: width and height must be positive multiples of 8")


@dataclass
class Job:
    """What one batch shares between the steps of any pipeline."""

    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    steps: int
    spec: Sampler
    schedule: str
    sigmas: torch.Tensor  # on the CPU: samplers do their scalar math there (in float64, which MPS lacks)
    scale: float
    eta: float | None
    width: int
    height: int
    cond: dict
    noise: Callable[[], torch.Tensor]
    clip_skip: int = 1


def prepare(model, prompts: list[str], negatives: list[str], seeds: list[int], *, steps: int, sampler: str,
            schedule: str | None, scale: float, eta: float | None, width: int, height: int, clip_skip: int = 1) -> Job:
    """Check the request, pick the sigmas, encode the prompts and set up each image's noise."""
    check_size(width, height)
    usable = model.text_encoder.config.layers - model.text_encoder.config.skip_layers
    if not 1 <= clip_skip <= usable:
        raise UserError(f"clip skip {clip_skip} is not possible: 1 is the last layer, and this text encoder has "
                        f"{usable} to choose from")
    if steps < 1:
        raise UserError(f"steps must be at least 1 (got {steps})")
    key, schedule = parse_sampler(sampler, schedule)
    spec = SAMPLERS[key]
    context, uncond = match_chunks(model, encode_text(model, prompts, clip_skip), encode_text(model, negatives, clip_skip),
                                   clip_skip)
    cond = {"context": context, "uncond": uncond}
    f = model.vae_scale
    noise = noise_source(generators(seeds), (4, height // f, width // f), model.device)
    return Job(prompts, negatives, seeds, steps, spec, schedule,
               sampler_sigmas(model.denoiser(), model.schedule, spec, steps, schedule), scale, eta, width, height, cond, noise,
               clip_skip)


def sample(model, job: Job, x: torch.Tensor, sigmas: torch.Tensor | None = None, wrap: Callable | None = None,
           callback: Callable | None = None) -> torch.Tensor:
    """Run the job's sampler under classifier-free guidance (and `wrap`, e.g. inpaint masking) from x at
    sigmas[0]; returns latents in the model's own (VP) scale."""
    sigmas = job.sigmas if sigmas is None else sigmas
    denoiser = CFGDenoiser(model.denoiser(), job.scale)
    if wrap is not None:
        denoiser = wrap(denoiser)
    options = {} if job.spec.eta is None else {"eta": job.spec.eta if job.eta is None else job.eta}
    x = job.spec.fn(denoiser, x, sigmas, job.cond, noise=job.noise, callback=callback, **options)
    return x / (1 + sigmas[-1] ** 2) ** 0.5  # x0 + sigma * eps -> sqrt(alpha_bar) * (...); identity at sigma 0


def annotate(model, job: Job, images: list[Image.Image], extra: dict | None = None) -> list[Image.Image]:
    """Attach each image's generation parameters (AUTOMATIC1111 infotext)."""
    extra = dict(extra or {})
    if job.eta is not None and job.spec.eta is not None and job.eta != job.spec.eta:
        extra["Eta"] = f"{job.eta:g}"
    if job.clip_skip != 1:
        extra = {"Clip skip": job.clip_skip, **extra}
    for image, prompt, negative, seed in zip(images, job.prompts, job.negatives, job.seeds):
        image.info["parameters"] = Params(prompt, negative, job.steps, job.spec.label, job.schedule, job.scale, seed,
                                          job.width, job.height, model.name, model.model_hash, extra).infotext()
    return images


def load_image(path, mode: str = "RGB") -> Image.Image:
    """An image file, or a one-line error saying what is wrong with it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not an image Pillow can read ({e})") from None


RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")


def fit(image: Image.Image, width: int, height: int, mode: str = "just-resize") -> Image.Image:
    """The image at width x height: stretched, cropped to the aspect then resized, or resized to fit with the
    borders filled by stretching its edge pixels (AUTOMATIC1111's three resize modes)."""
    if image.size == (width, height):
        return image
    if mode == "just-resize":
        return image.resize((width, height), Image.LANCZOS)
    w, h = image.size
    scale = (max if mode == "crop-and-resize" else min)(width / w, height / h)
    rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = image.resize((rw, rh), Image.LANCZOS)
    if mode == "crop-and-resize":
        left, top = (rw - width) // 2, (rh - height) // 2
        return resized.crop((left, top, left + width, top + height))
    if mode != "resize-and-fill":
        raise UserError(f"unknown resize mode {mode!r} (choose from {', '.join(RESIZE_MODES)})")
    canvas = Image.new(resized.mode, (width, height))
    left, top = (width - rw) // 2, (height - rh) // 2
    canvas.paste(resized, (left, top))
    return stretch_edges(canvas, resized, left, top)


def stretch_edges(canvas: Image.Image, inner: Image.Image, left: int, top: int) -> Image.Image:
    """The canvas around `inner` (pasted at left, top) filled by repeating inner's edge rows and columns outward."""
    a = np.asarray(canvas).copy()
    b = np.asarray(inner)
    h, w = b.shape[:2]
    a[top:top + h, :left] = b[:, :1]
    a[top:top + h, left + w:] = b[:, -1:]
    a[:top] = a[top:top + 1]
    a[top + h:] = a[top + h - 1:top + h]
    return Image.fromarray(a)


def to_pixels(images: list[Image.Image], device) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).mul(2).sub(1).to(device)


def encode_image(model, pixels: torch.Tensor, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Scaled latents of (B,3,H,W) pixels: a sample of the VAE's posterior, drawn from each image's generator as
    diffusers' latent_dist.sample(generator) does (so the draws after it line up)."""
    with torch.no_grad():
        mean, logvar = model.vae.encode(pixels.to(model.dtype))
    z = mean.float() + (0.5 * logvar.float()).exp() * noise()
    return z * model.vae.config.scaling_factor


def strength_sigmas(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The last int(steps * strength) steps of a schedule, as CompVis and diffusers run img2img."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength {strength} is outside 0..1 (0 keeps the image, 1 repaints it entirely)")
    return sigmas[steps - min(int(steps * strength), steps):]


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
