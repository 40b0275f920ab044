"""Text to image: encode -> sigmas -> sampler -> decode; optionally a hires fix's second pass at a larger size."""
from typing import Callable

import torch.nn.functional as F
from PIL import Image

from stablediff.errors import UserError
from stablediff.pipelines import common
from stablediff.pipelines.hires import UPSCALERS, Hires
from stablediff.pipelines.refiner import Refiner, infotext, sample


def txt2img(model, prompts: list[str], negative_prompts: list[str], seeds: list[int], *, steps: int, sampler: str,
            schedule: str | None, scale: float, eta: float | None, width: int, height: int, clip_skip: int = 1,
            hires: Hires | None = None, refiner: Refiner | None = None, callback: Callable | None = None,
            **variation) -> list[Image.Image]:
    """One batch: image i from prompts[i], negative_prompts[i] and seeds[i]; PIL images carrying their parameters.
    refiner: another model finishes the last part of the schedule (SDXL's refiner)."""
    if model.unet.config.in_channels != 4:
        raise UserError(f"this model's UNet takes {model.unet.config.in_channels} input channels (an inpainting, depth or "
                        "upscaler model); txt2img needs an ordinary 4-channel model")
    if hires is not None:
        hires.check()
    if refiner is not None:
        refiner.check()
        if hires is not None:
            raise UserError("the refiner and the hires fix do not go together yet: use one of them")
    sampling = dict(sampler=sampler, schedule=schedule, scale=scale, eta=eta, clip_skip=clip_skip, **variation)
    job = common.prepare(model, prompts, negative_prompts, seeds, steps=steps, width=width, height=height, **sampling)
    x = job.start_noise() * (1 + job.sigmas[0] ** 2) ** 0.5  # the VP prior at the first sigma
    latents, finisher = sample(model, job, x, job.sigmas, refiner, callback=callback)
    if hires is None:
        return common.annotate(model, job, common.decode(finisher, latents), infotext(refiner))
    latents, second = _second_pass(model, job, latents, hires, sampling, callback)
    extra = {"Denoising strength": f"{hires.denoise:g}", "Hires upscale": f"{hires.scale:g}",
             **({"Hires steps": hires.steps} if hires.steps else {}), "Hires upscaler": UPSCALERS[hires.upscaler]}
    return common.annotate(model, job, common.decode(model, latents), extra, also_steps=(second.steps,))


def _second_pass(model, first, latents, hires: Hires, sampling: dict, callback):
    """Enlarge the first pass's latents and re-render their last steps at the new size."""
    f = model.vae_scale
    width, height = hires.size(first.width, first.height)
    steps = hires.steps or first.steps
    total = int(steps / min(hires.denoise, 0.999))
    if first.variation is not None:  # the same variation seed as the first pass, drawn or given
        sampling = {**sampling, "subseed": first.variation[0]}
    job = common.prepare(model, first.prompts, first.negatives, first.seeds, steps=total, width=width, height=height,
                         prompt_steps=(steps, first.steps), **sampling)
    if hires.upscaler.startswith("latent"):
        mode = "nearest" if hires.upscaler == "latent-nearest" else "bilinear"
        x0 = F.interpolate(latents, size=(height // f, width // f), mode=mode)
    else:
        images = [im.resize((width, height), Image.LANCZOS) for im in common.decode(model, latents)]
        x0 = common.encode_image(model, common.to_pixels(images, model.device), job.noise)
    sigmas = job.sigmas[-(steps + 1):]
    return common.sample(model, job, x0 + job.start_noise() * sigmas[0], sigmas, callback=callback), job
