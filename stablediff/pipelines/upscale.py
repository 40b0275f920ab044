"""The SD x4 upscaler: a 7-channel UNet sees the noise-augmented low-res image beside its latents, and the
noise level as a class label; its VAE (f=4) decodes the latents at the low-res size to 4x the pixels. Inputs
larger than a tile are upscaled tile by tile, overlapping, and blended with linear ramps across the overlaps."""
from dataclasses import replace
from typing import Callable

import numpy as np
from PIL import Image

from stablediff.errors import UserError
from stablediff.pipelines import common

MAX_NOISE_LEVEL = 350


def upscale(model, images: list[Image.Image], prompts: list[str], negatives: list[str], seeds: list[int], *,
            noise_level: int = 20, tile: int = 128, overlap: int = 32, callback: Callable | None = None,
            **sampling) -> list[Image.Image]:
    """Each image at 4x; inputs wider or taller than `tile` pixels go tile by tile."""
    w, h = images[0].size
    if w <= tile and h <= tile:
        job, out = _upscale(model, images, prompts, negatives, seeds, noise_level, callback, sampling)
        return common.annotate(model, job, out, {"Noise level": noise_level})
    if overlap * 2 >= tile:
        raise UserError(f"tile overlap {overlap} must be under half the tile size {tile}")
    f = model.vae_scale
    acc = np.zeros((len(images), h * f, w * f, 3))
    weight = np.zeros((h * f, w * f, 1))
    for left, top, cw, ch in _tiles(w, h, tile, overlap):
        crops = [im.crop((left, top, left + cw, top + ch)) for im in images]
        job, out = _upscale(model, crops, prompts, negatives, seeds, noise_level, callback, sampling)
        ramp = _ramp(cw * f, ch * f, overlap * f, left > 0, top > 0, left + cw < w, top + ch < h)
        acc[:, top * f:(top + ch) * f, left * f:(left + cw) * f] += np.stack([np.asarray(o) for o in out]) * ramp
        weight[top * f:(top + ch) * f, left * f:(left + cw) * f] += ramp
    stitched = [Image.fromarray((a / weight).round().clip(0, 255).astype(np.uint8)) for a in acc]
    return common.annotate(model, replace(job, width=w * f, height=h * f), stitched,
                           {"Noise level": noise_level, "Tile size": tile, "Tile overlap": overlap})


def _tiles(w: int, h: int, tile: int, overlap: int):
    """(left, top, width, height) of overlapping tiles covering w x h; the last in each row and column ends at the edge."""
    def starts(n):
        if n <= tile:
            return [0]
        s = list(range(0, n - tile, tile - overlap))
        return s + [n - tile]
    return [(x, y, min(tile, w), min(tile, h)) for y in starts(h) for x in starts(w)]


def _ramp(w: int, h: int, fade: int, left: bool, top: bool, right: bool, bottom: bool) -> np.ndarray:
    """(h, w, 1) blending weights: 1 inside, rising linearly across `fade` pixels on edges shared with other tiles."""
    def axis(n, lo, hi):
        r = np.ones(n)
        ramp = (np.arange(fade) + 0.5) / fade
        if lo:
            r[:fade] = ramp
        if hi:
            r[n - fade:] = ramp[::-1]
        return r
    return (axis(h, top, bottom)[:, None] * axis(w, left, right)[None, :])[..., None]


def _upscale(model, images, prompts, negatives, seeds, noise_level, callback, sampling):
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
    x = job.start_noise() * (1 + job.sigmas[0] ** 2) ** 0.5
    latents = common.sample(model, job, x, callback=callback)
    return job, common.decode(model, latents)
