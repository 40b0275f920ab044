"""Image to image (SDEdit) and inpainting: encode the image, noise it to sigma at the strength, sample, decode."""
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from stablediff.diffusion.guidance import MaskedDenoiser
from stablediff.errors import UserError
from stablediff.pipelines import common
from stablediff.pipelines.depth import depth_condition
from stablediff.pipelines.refiner import Refiner, infotext, sample

FILLS = ("original", "fill", "latent-noise", "latent-nothing")
EMPTY_MASK = "the mask is empty: paint white where the image should change (or pass --invert-mask)"


def _needs_channels(model, channels: tuple[int, ...], what: str) -> None:
    if model.unet.config.in_channels not in channels:
        raise UserError(f"{what} needs a model whose UNet takes {' or '.join(map(str, channels))} input channels; "
                        f"this one takes {model.unet.config.in_channels}")


def img2img(model, images: list[Image.Image], prompts: list[str], negatives: list[str], seeds: list[int], *,
            strength: float, width: int, height: int, resize_mode: str = "just-resize", callback: Callable | None = None,
            depths: list[torch.Tensor] | None = None, refiner: Refiner | None = None,
            **sampling) -> list[Image.Image]:
    """Each image re-rendered under its prompt: the last int(steps * strength) steps from the image's latents
    (refiner: another model runs the steps after its switch).
    With `depths` (a depth model, 5 channels) the UNet also sees each depth map, normalised, at latent size."""
    _needs_channels(model, (5,) if depths is not None else (4,), "depth2img" if depths is not None else "img2img")
    if refiner is not None:
        refiner.check()
    job = common.prepare(model, prompts, negatives, seeds, width=width, height=height, **sampling)
    if depths is not None:
        job.cond["concat"] = depth_condition(depths, (height // model.vae_scale, width // model.vae_scale), model.device)
    sigmas = common.strength_sigmas(job.sigmas, job.steps, strength)
    pixels = common.to_pixels([common.fit(im, width, height, resize_mode) for im in images], model.device)
    x0 = common.encode_image(model, pixels, job.noise)
    latents, finisher = x0, model
    if len(sigmas) >= 2:
        latents, finisher = sample(model, job, x0 + job.start_noise() * sigmas[0], sigmas, refiner, callback=callback)
    return common.annotate(model, job, common.decode(finisher, latents),
                           {"Denoising strength": f"{strength:g}", **infotext(refiner)})


def _mask_tensor(masks: list[Image.Image], device) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in masks]))[:, None].to(device)


def _surroundings_fill(pixels: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """The masked area painted with the colours around it: a normalised blur of the unmasked pixels."""
    keep, size = 1 - binary, max(pixels.shape[-2:]) // 4 * 2 + 1
    blur = lambda t: F.avg_pool2d(F.avg_pool2d(t, size, 1, size // 2, count_include_pad=False), size, 1, size // 2,
                                  count_include_pad=False)
    filled = blur(pixels * keep) / blur(keep).clamp(min=1e-6)
    return pixels * keep + filled * binary


def paste_back(generated: list[Image.Image], originals: list[Image.Image], masks: torch.Tensor) -> list[Image.Image]:
    """Original pixels wherever the (blurred) mask is 0, exactly; a blend where it is between 0 and 1."""
    out = []
    for gen, orig, m in zip(generated, originals, masks.cpu().numpy()):
        m = m[0][..., None]
        mixed = np.asarray(orig, dtype=np.float32) * (1 - m) + np.asarray(gen, dtype=np.float32) * m
        image = Image.fromarray(np.where(m == 0, np.asarray(orig), mixed.round()).astype(np.uint8))
        image.info.update(gen.info)
        out.append(image)
    return out


def inpaint(model, images: list[Image.Image], masks: list[Image.Image], prompts: list[str], negatives: list[str],
            seeds: list[int], *, width: int, height: int, strength: float = 1.0, fill: str = "original", mask_blur: int = 4,
            invert_mask: bool = False, resize_mode: str = "just-resize", blur_inward: bool = False,
            callback: Callable | None = None, **sampling) -> list[Image.Image]:
    """Repaint where the mask is white. A 9-channel inpainting model sees the mask and the masked image; an ordinary
    model is held to the original outside the mask at every step. Pixels outside the blurred mask are the original's
    (blur_inward: the blur only fades inside the mask, so everything outside it stays exact)."""
    _needs_channels(model, (4, 9), "inpainting")
    if fill not in FILLS:
        raise UserError(f"unknown masked-content fill {fill!r} (choose from {', '.join(FILLS)})")
    job = common.prepare(model, prompts, negatives, seeds, width=width, height=height, **sampling)
    sigmas = common.strength_sigmas(job.sigmas, job.steps, strength)
    originals = [common.fit(im, width, height, resize_mode) for im in images]
    masks = [common.fit(m.convert("L"), width, height, resize_mode) for m in masks]
    masks = [ImageOps.invert(m) for m in masks] if invert_mask else masks
    binary = (_mask_tensor(masks, model.device) >= 0.5).float()
    if not binary.any():
        raise UserError(EMPTY_MASK)
    blurred = [m.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur else m for m in masks]
    if blur_inward:
        blurred = [Image.fromarray(np.minimum(np.asarray(b), np.asarray(m))) for b, m in zip(blurred, masks)]
    pixels = common.to_pixels(originals, model.device)
    latent_size = (height // model.vae_scale, width // model.vae_scale)
    if model.unet.config.in_channels == 9:  # generator draws in diffusers' order: [image], noise, masked image
        x0 = common.encode_image(model, pixels, job.noise) if strength < 1 else None
        noise = job.start_noise()
        x = noise * (1 + sigmas[0] ** 2) ** 0.5 if x0 is None else x0 + noise * sigmas[0]
        masked = common.encode_image(model, pixels * (binary < 0.5), job.noise)
        job.cond["concat"] = torch.cat([F.interpolate(binary, size=latent_size), masked], dim=1)
        latents = common.sample(model, job, x, sigmas, callback=callback)
    else:
        start = _surroundings_fill(pixels, binary) if fill == "fill" else pixels
        x0 = common.encode_image(model, pixels, job.noise)
        x_start = common.encode_image(model, start, job.noise) if fill == "fill" else x0
        noise = job.start_noise()
        m = F.adaptive_max_pool2d(binary, latent_size)  # every latent cell the mask touches is repainted
        if fill in ("latent-noise", "latent-nothing"):
            x_start = x0 * (1 - m) + (job.noise() if fill == "latent-noise" else 0) * m
        latents = common.sample(model, job, x_start + noise * sigmas[0], sigmas, callback=callback,
                                wrap=lambda d: MaskedDenoiser(d, x0, m, noise))
    generated = common.decode(model, latents)
    images = paste_back(generated, originals, _mask_tensor(blurred, model.device))
    extra = {"Denoising strength": f"{strength:g}", "Mask blur": mask_blur,
             **({"Masked content": fill} if model.unet.config.in_channels == 4 else {})}
    return common.annotate(model, job, images, extra)


def outpaint_canvas(image: Image.Image, left: int, right: int, up: int, down: int) -> tuple[Image.Image, Image.Image]:
    """The image on a larger canvas whose new border starts from the image's edge colours (stretched outward, then
    softened), and the mask of that border."""
    if min(left, right, up, down) < 0 or any(v % 8 for v in (left, right, up, down)) or not any((left, right, up, down)):
        raise UserError(f"--extend {left},{right},{up},{down}: give left,right,up,down in pixels, multiples of 8, "
                        "at least one above 0")
    w, h = image.size
    canvas = Image.new("RGB", (w + left + right, h + up + down))
    canvas.paste(image, (left, up))
    canvas = common.stretch_edges(canvas, image, left, up)
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, up, left + w, up + h))
    soft = canvas.filter(ImageFilter.GaussianBlur(max(left, right, up, down) / 4))
    return Image.composite(soft, canvas, mask), mask


def only_masked(run, image: Image.Image, mask: Image.Image, padding: int, mask_blur: int) -> list[Image.Image]:
    """Inpaint just the mask's box (plus padding) at the full working size, then paste it back: `run(crop, crop_mask)`
    renders the crops; nothing outside the box changes, and inside it only what the blurred mask covers."""
    box = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        raise UserError(EMPTY_MASK)
    box = (max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, image.width),
           min(box[3] + padding, image.height))
    size = (box[2] - box[0], box[3] - box[1])
    blend = mask.crop(box).filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur else mask.crop(box)
    outs = []
    for rendered in run(image.crop(box).resize(image.size, Image.LANCZOS), mask.crop(box).resize(image.size, Image.NEAREST)):
        out = image.copy()
        out.paste(Image.composite(rendered.resize(size, Image.LANCZOS), image.crop(box), blend), box[:2])
        out.info.update(rendered.info)
        outs.append(out)
    return outs
