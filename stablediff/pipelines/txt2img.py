"""Text to image: encode -> sigmas -> sampler -> decode."""
from typing import Callable

from PIL import Image

from stablediff.diffusion.samplers import SAMPLERS
from stablediff.errors import UserError
from stablediff.pipelines import common
from stablediff.pipelines.infotext import Params


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise UserError(f"image size {width}x{height} is not possible: width and height must be positive multiples of 8")


def txt2img(model, prompts: list[str], negative_prompts: list[str], seeds: list[int], *, steps: int, sampler: str,
            schedule: str | None, scale: float, eta: float | None, width: int, height: int,
            callback: Callable | None = None) -> list[Image.Image]:
    """One batch: image i from prompts[i], negative_prompts[i] and seeds[i]; PIL images carrying their parameters."""
    check_size(width, height)
    if steps < 1:
        raise UserError(f"steps must be at least 1 (got {steps})")
    if model.unet.config.in_channels != 4:
        raise UserError(f"this model's UNet takes {model.unet.config.in_channels} input channels (an inpainting, depth or "
                        "upscaler model); txt2img needs an ordinary 4-channel model")
    key, schedule = common.parse_sampler(sampler, schedule)
    spec = SAMPLERS[key]
    # sigmas stay on the CPU: samplers do their scalar math there (in float64, which MPS lacks)
    sigmas = common.sampler_sigmas(model.denoiser(), model.schedule, spec, steps, schedule)
    cond = {"context": common.encode_text(model, prompts), "uncond": common.encode_text(model, negative_prompts)}
    f = model.vae_scale
    noise = common.noise_source(common.generators(seeds), (4, height // f, width // f), model.device)
    x = noise() * (1 + sigmas[0] ** 2) ** 0.5  # the VP prior at the first sigma
    latents = common.sample(model, x, sigmas, spec, cond, scale, noise, eta, callback)
    images = common.decode(model, latents)
    extra = {} if eta is None or spec.eta is None or eta == spec.eta else {"Eta": f"{eta:g}"}
    for image, prompt, negative, seed in zip(images, prompts, negative_prompts, seeds):
        params = Params(prompt, negative, steps, spec.label, schedule, scale, seed, width, height, model.name,
                        model.model_hash, extra)
        image.info["parameters"] = params.infotext()
    return images
