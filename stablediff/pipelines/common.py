"""The steps every pipeline shares, written once: text encoding, sigmas, noise, sampling, decoding."""
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from stablediff import checks
from stablediff.adapters.lora import take_tags
from stablediff.devices import give_back_freed_memory
from stablediff.diffusion.denoiser import Denoiser
from stablediff.diffusion.guidance import CFGDenoiser, PromptSchedule
from stablediff.diffusion.samplers import SAMPLERS, Sampler
from stablediff.diffusion.schedules import inference_sigmas
from stablediff.errors import UserError
from stablediff.names import A1111_SCHEDULES, SCHEDULE_LABELS, parse_sampler
from stablediff.pipelines.conditioning import (TextConditioning, add_size_conditioning, encode_conditioning, size_numbers,
                                               text_encoders)
from stablediff.pipelines.infotext import Params, named_hashes, size_fields


def sampler_sigmas(denoiser: Denoiser, sched, sampler: Sampler, steps: int, schedule: str) -> torch.Tensor:
    """The sigmas a sampler walks. CompVis' DDIM and PLMS step last to alphas_cumprod[0] rather than to 0
    unless the model's scheduler sets alpha to one; their output is then x at that small sigma."""
    sigmas = inference_sigmas(sched, steps, schedule)
    if sampler.ends_at_sigma_min and not sched.set_alpha_to_one:
        body = sigmas[:-1][sigmas[:-1] > denoiser.sigma_min * (1 + 1e-4)]
        sigmas = torch.cat([body, sigmas.new_tensor([denoiser.sigma_min])])
    return sigmas


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


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The webui's variation-seed blend of two (C, H, W) noises: spherical along dim 1, linear when the two are
    nearly parallel (where it weights them the other way round, as the webui does)."""
    low_unit, high_unit = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        return low * t + high * (1 - t)
    omega = dot.acos()
    return (((1 - t) * omega).sin() / omega.sin())[:, None] * low + ((t * omega).sin() / omega.sin())[:, None] * high


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
    cond: dict  # what the model sees besides text at every step: "concat" channels, "extra" inputs
    texts: TextConditioning
    noise: Callable[[], torch.Tensor]
    clip_skip: int = 1
    variation: tuple[int, float] | None = None  # (subseed, strength): image i's start noise leans to subseed + i's
    info: dict = field(default_factory=dict)  # infotext fields the job adds: LoRA and embedding hashes, ...
    interval: tuple[float, float] | None = None  # the sigmas at which guidance applies (CFGDenoiser); None: all

    def start_noise(self) -> torch.Tensor:
        """The noise a run starts from: the next draw of each image's generator, slerped towards its variation
        seed's noise when there is one."""
        x = self.noise()
        if self.variation is None or self.variation[1] == 0:
            return x
        subseed, strength = self.variation
        sub = noise_source(generators([subseed + i for i in range(len(self.seeds))]), tuple(x.shape[1:]), x.device)()
        return torch.stack([slerp(strength, a, b) for a, b in zip(x, sub)])


def _adapters(model, prompts: list[str]) -> tuple[list[str], dict]:
    """Merge the LoRAs the model is set to use plus those the prompts name (<lora:name:weight>, the same in every
    prompt of a batch); the prompts without their tags, and the infotext fields for LoRAs and embeddings."""
    taken = [take_tags(p, model.lora_dir) for p in prompts]
    if any(uses != taken[0][1] for _, uses in taken):
        raise UserError("the prompts of one batch name different LoRAs: render them in separate batches (--n_samples 1)")
    model.lora_merger.sync(model, (*model.loras, *taken[0][1]))
    info = {}
    if model.lora_merger.active:
        info["Lora hashes"] = named_hashes((u.name, model.lora_merger.hashes[u]) for u in model.lora_merger.active)
    clean = [p for p, _ in taken]
    if model.embeddings is not None and (used := model.embeddings.hashes(text_encoders(model)[0][1], clean)):
        info["TI hashes"] = named_hashes(used.items())
    return clean, info


def condition(model, prompts: list[str], negatives: list[str], steps: int, width: int, height: int, clip_skip: int = 1,
              first_pass: int | None = None) -> TextConditioning:
    """The batch's text conditioning over `steps`, with SDXL's size conditioning for a width x height render."""
    texts = encode_conditioning(model, prompts, negatives, steps, clip_skip, first_pass)
    if model.unet.config.adm_in_channels is not None:
        add_size_conditioning(texts, model.unet.config, *size_numbers(model, width, height))
    return texts


def prepare(model, prompts: list[str], negatives: list[str], seeds: list[int], *, steps: int, sampler: str,
            schedule: str | None, scale: float, eta: float | None, width: int, height: int, clip_skip: int = 1,
            subseed: int | None = None, subseed_strength: float = 0.0,
            prompt_steps: tuple[int, int | None] | None = None) -> Job:
    """Check the request, merge LoRAs, pick the sigmas, encode the prompts and set up each image's noise.
    prompt_steps: (steps, first pass steps) to schedule prompt edits over, when not the sampler's own steps
    (a hires fix's second pass)."""
    check_size(width, height)
    checks.check_pixels(width, height, model.max_pixels, "--max-pixels (max_pixels in Python)")
    encoder = text_encoders(model)[0][0]
    usable = encoder.config.layers - encoder.config.skip_layers
    if not 1 <= clip_skip <= usable:
        raise UserError(f"clip skip {clip_skip} is not possible: 1 is the last layer, and this text encoder has "
                        f"{usable} to choose from")
    if steps < 1:
        raise UserError(f"steps must be at least 1 (got {steps})")
    if not 0.0 <= subseed_strength <= 1.0:
        raise UserError(f"variation strength {subseed_strength} is outside 0..1")
    key, schedule = parse_sampler(sampler, schedule)
    spec = SAMPLERS[key]
    if schedule == "default" and spec.schedule is not None:
        schedule = spec.schedule
    if schedule == "lcm" and steps > 50:
        raise UserError(f"the LCM schedule has at most 50 steps, those LCM models were distilled on (got {steps})")
    clean, info = _adapters(model, prompts)
    text_steps, first_pass = prompt_steps or (steps, None)
    texts = condition(model, clean, negatives, text_steps, width, height, clip_skip, first_pass)
    f = model.vae_scale
    noise = noise_source(generators(seeds), (4, height // f, width // f), model.device)
    variation = None
    if subseed_strength > 0:
        variation = (checks.seeds(subseed, len(seeds), "variation seed")[0], subseed_strength)
        info.update({"Variation seed": variation[0], "Variation seed strength": f"{subseed_strength:g}"})
    if model.unet.config.adm_in_channels is not None:
        info.update(size_fields(model.size_conditioning))
    interval = model.sampling.get("guidance_interval")
    if interval is not None:
        info["Guidance interval"] = f"{interval[0]:g}-{interval[1]:g}"
    return Job(prompts, negatives, seeds, steps, spec, schedule,
               sampler_sigmas(model.denoiser(), model.schedule, spec, steps, schedule), scale, eta, width, height, {}, texts,
               noise, clip_skip, variation, info, interval)


def sample(model, job: Job, x: torch.Tensor, sigmas: torch.Tensor | None = None, wrap: Callable | None = None,
           callback: Callable | None = None) -> torch.Tensor:
    """Run the job's sampler under classifier-free guidance (and `wrap`, e.g. inpaint masking) from x at
    sigmas[0]; returns latents in the model's own (VP) scale."""
    sigmas = job.sigmas if sigmas is None else sigmas
    denoiser = CFGDenoiser(model.denoiser(), job.scale, job.interval)
    if wrap is not None:
        denoiser = wrap(denoiser)
    denoiser = PromptSchedule(denoiser, sigmas, job.texts.per_step(len(sigmas) - 1))
    options = {} if job.spec.eta is None else {"eta": job.spec.eta if job.eta is None else job.eta}
    x = job.spec.fn(denoiser, x, sigmas, job.cond, noise=job.noise, callback=callback, **options)
    return x / (1 + sigmas[-1] ** 2) ** 0.5  # x0 + sigma * eps -> sqrt(alpha_bar) * (...); identity at sigma 0


def schedule_label(sched, schedule: str, step_counts) -> str:
    """The "Schedule type" to write: the webui's own name for the schedule, else the first of its schedules that gives
    exactly the same sigmas at every step count the job used (SD's leading spacing is its DDIM at 20 steps), else
    ours ("Leading"), which stablediff reads back but the webui does not know."""
    if schedule in A1111_SCHEDULES:
        return SCHEDULE_LABELS[schedule]
    for webui in ("ddim", "simple", "uniform", "sgm_uniform"):
        if all(torch.equal(inference_sigmas(sched, n, schedule), inference_sigmas(sched, n, webui)) for n in step_counts):
            return SCHEDULE_LABELS[webui]
    return SCHEDULE_LABELS[sched.spacing if schedule == "default" else schedule]


def annotate(model, job: Job, images: list[Image.Image], extra: dict | None = None,
             also_steps: tuple[int, ...] = ()) -> list[Image.Image]:
    """Attach each image's generation parameters (AUTOMATIC1111 infotext); also_steps: the step counts of later
    passes over the same schedule (a hires fix's), which its name must describe too."""
    extra = {**job.info, **(extra or {})}
    if job.eta is not None and job.spec.eta is not None and job.eta != job.spec.eta:
        extra["Eta"] = f"{job.eta:g}"
    if job.clip_skip != 1:
        extra = {"Clip skip": job.clip_skip, **extra}
    label = schedule_label(model.schedule, job.schedule, (job.steps, *also_steps))
    for image, prompt, negative, seed in zip(images, job.prompts, job.negatives, job.seeds):
        image.info["parameters"] = Params(prompt, negative, job.steps, job.spec.label, label, job.scale, seed,
                                          job.width, job.height, model.name, model.model_hash, extra).infotext()
    return images


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


BANDED_ABOVE = 768 * 768  # pixels; larger images go through the VAE in bands: the same result in less memory


def _banded(height: int, width: int) -> bool:
    return height * width > BANDED_ABOVE


def encode_image(model, pixels: torch.Tensor, noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Scaled latents of (B,3,H,W) pixels: a sample of the VAE's posterior, drawn from each image's generator as
    diffusers' latent_dist.sample(generator) does (so the draws after it line up)."""
    with torch.no_grad():
        mean, logvar = model.vae.encode(pixels.to(next(model.vae.parameters()).dtype),
                                        banded=_banded(*pixels.shape[-2:]))
    z = mean.float() + (0.5 * logvar.float()).exp() * noise()
    return z * model.vae.config.scaling_factor


def strength_sigmas(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The last int(steps * strength) steps of a schedule, as CompVis and diffusers run img2img."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength {strength} is outside 0..1 (0 keeps the image, 1 repaints it entirely)")
    return sigmas[-(min(int(steps * strength), steps) + 1):]


def _vae_decode(model, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents -> pixels in fp32. A half-precision VAE whose decode overflows (SD 1.x's VAE in fp16 does
    on some images) is moved to fp32 for good and the decode done again; NaN in fp32 as well is an error."""
    dtype = next(model.vae.parameters()).dtype
    give_back_freed_memory(z.device)  # what the steps left, before the decode's large blocks
    banded = _banded(z.shape[-2] * model.vae_scale, z.shape[-1] * model.vae_scale)
    pixels = model.vae.decode(z.to(dtype), banded=banded).float()
    if not torch.isfinite(pixels).all() and dtype != torch.float32:
        print(f"stablediff: note: the VAE overflowed in {str(dtype).removeprefix('torch.')}; it decodes in fp32 "
              "from now on", file=sys.stderr)
        model.vae.float()
        pixels = model.vae.decode(z.float(), banded=banded)
    if not torch.isfinite(pixels).all():
        raise UserError("the VAE decode produced NaN/inf even in fp32: the latents themselves went wrong (try another "
                        "sampler, fewer steps or a lower --scale)")
    return pixels


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels (..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8, rounded."""
    return (pixels / 2 + 0.5).clamp(0, 1).movedim(-3, -1).mul(255).round().to(torch.uint8)


def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (B,4,h,w) -> PIL images, one decode at a time to bound memory; never an image from NaNs."""
    images = []
    with torch.no_grad():
        for z in latents:
            pixels = _vae_decode(model, z[None] / model.vae.config.scaling_factor)
            images.append(Image.fromarray(to_uint8(pixels[0]).cpu().numpy()))
    return images
