"""Text to image: encode -> sigmas -> sampler -> decode."""
from typing import Callable

from PIL import Image

from stablediff.errors import UserError
from stablediff.pipelines import common


def txt2img(model, prompts: list[str], negative_prompts: list[str], seeds: list[int], *, steps: int, sampler: str,
            schedule: str | None, scale: float, eta: float | None, width: int, height: int, clip_skip: int = 1,
            callback: Callable | None = None) -> list[Image.Image]:
    """One batch: image i from prompts[i], negative_prompts[i] and seeds[i]; PIL images carrying their parameters."""
    if model.unet.config.in_channels != 4:
        raise UserError(f"this model's UNet takes {model.unet.config.in_channels} input channels (an inpainting, depth or "
                        "upscaler model); txt2img needs an ordinary 4-channel model")
    job = common.prepare(model, prompts, negative_prompts, seeds, steps=steps, sampler=sampler, schedule=schedule,
                         scale=scale, eta=eta, width=width, height=height, clip_skip=clip_skip)
    x = job.noise() * (1 + job.sigmas[0] ** 2) ** 0.5  # the VP prior at the first sigma
    latents = common.sample(model, job, x, callback=callback)
    return common.annotate(model, job, common.decode(model, latents))
