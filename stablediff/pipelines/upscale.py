"""The SD x4 upscaler: a 7-channel UNet sees the noise-augmented low-res image beside its latents, and the
noise level as a class label; its VAE (f=4) decodes the latents at the low-res size to 4x the pixels."""
from typing import Callable

from PIL import Image

from stablediff.errors import UserError
from stablediff.pipelines import common

MAX_NOISE_LEVEL = 350


def upscale(model, images: list[Image.Image], prompts: list[str], negatives: list[str], seeds: list[int], *,
            noise_level: int = 20, callback: Callable | None = None, **sampling) -> list[Image.Image]:
    if model.unet.config.in_channels != 7 or model.unet.config.num_classes is None or model.low_res_schedule is None:
        raise UserError("upscale needs the SD x4 upscaler (a UNet with 7 input channels and a noise-level embedding); "
                        f"this model's UNet takes {model.unet.config.in_channels}")
    if not 0 <= noise_level <= MAX_NOISE_LEVEL:
        raise UserError(f"noise level {noise_level} is outside 0..{MAX_NOISE_LEVEL}")
    w, h = images[0].size
    if w % 2 or h % 2:
        images = [common.fit(im, w // 2 * 2, h // 2 * 2) for im in images]
        w, h = w // 2 * 2, h // 2 * 2
    f = model.vae_scale
    job = common.prepare(model, prompts, negatives, seeds, width=w * f, height=h * f, **sampling)
    low = common.to_pixels(images, model.device)
    a = model.low_res_schedule.alphas_cumprod()[noise_level].item()
    low = a**0.5 * low + (1 - a) ** 0.5 * job.noise((3, h, w))  # drawn first, as diffusers does
    job.cond["concat"] = low
    job.cond["extra"] = {"y": low.new_full((len(images),), noise_level, dtype=low.dtype).long()}
    x = job.noise() * (1 + job.sigmas[0] ** 2) ** 0.5
    latents = common.sample(model, job, x, callback=callback)
    return common.annotate(model, job, common.decode(model, latents), {"Noise level": noise_level})
