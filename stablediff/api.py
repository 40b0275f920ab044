"""The Python API: `StableDiffusion.load(path)` then `.txt2img(...)`."""
import functools
import random
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, ImageOps

from stablediff import checks
from stablediff.adapters.embeddings import EmbeddingLibrary
from stablediff.adapters.lora import LoraMerger, LoraUse, parse_use
from stablediff.checkpoints import diffusers_folder as folder_fmt
from stablediff.checkpoints import original
from stablediff.checkpoints.hashing import cached_hash
from stablediff.checkpoints.io import read_state_dict
from stablediff.checkpoints.keymaps import load_into, vae_prefixes
from stablediff.checkpoints.spec import ModelSpec
from stablediff.devices import compile_module, keep_freed_memory, resolve_device, resolve_dtype, weight_layout
from stablediff.diffusion.denoiser import Denoiser
from stablediff.diffusion.schedules import TrainSchedule
from stablediff.errors import UserError
from stablediff.files import load_image
from stablediff.models.clip_text import ClipTextModel
from stablediff.models.tokenizer import ClipTokenizer
from stablediff.models.unet import UNet
from stablediff.models.vae import AutoencoderKL
from stablediff.names import parse_sampler
from stablediff.pipelines import img2img as image_pipelines
from stablediff.pipelines.common import fit as common_fit
from stablediff.pipelines.depth import NO_DEPTH_SOURCE, depth_from_image, estimate_depth
from stablediff.pipelines.finish import Screen, finish
from stablediff.pipelines.hires import Hires
from stablediff.pipelines.refiner import Refiner
from stablediff.pipelines.txt2img import txt2img as run_txt2img
from stablediff.pipelines.upscale import upscale as upscale_pipeline
from stablediff.safety import check_watermark_text


# the small model trained here on drawn shapes (stablediff train; see the README): the default model
DEMO_MODEL = Path(str(resources.files("stablediff") / "data" / "demo" / "shapes-64.safetensors"))


def _build(cls, cfg, sd, prefixes, what, dtype, device):
    with torch.device("meta"):  # no random init: every tensor comes from the file
        module = cls(cfg)
    load_into(module, sd, prefixes, what, dtype, device, conv_layout=weight_layout(device, dtype, what))
    return module.eval().requires_grad_(False)


# few-step models: Turbo (adversarial diffusion distillation) takes 1 to 4 steps of Euler a on trailing timesteps
# without guidance, at 512; LCM 2 to 8 steps of its own sampler, guidance off. As Stability's and LCM's model cards.
FEW_STEP = {"turbo": {"sampler": "Euler a", "schedule": "trailing", "steps": 1, "scale": 1.0},
            "lcm": {"sampler": "LCM", "steps": 4, "scale": 1.0}}


def few_step_kind(spec: ModelSpec, path: Path) -> str | None:
    """"turbo" or "lcm" where the model's name says so (sd_xl_turbo_1.0, sd_turbo, LCM_Dreamshaper_v7, lcm-sdxl) or
    its folder's scheduler is LCMScheduler; the tensors of these models are those of the models they come from."""
    name = spec.name.lower()
    if "turbo" in name:
        return "turbo"
    scheduler = path / "scheduler" / "scheduler_config.json"
    if path.is_dir() and scheduler.is_file():
        name += " " + str(folder_fmt.read_config(path, "scheduler", "scheduler_config.json").get("_class_name")).lower()
    return "lcm" if "lcm" in name else None


def read_spec(path: Path, config=None, use_ema: bool = True, prediction: str | None = None,
              unsafe_pickle: bool = False, vae: str | Path | None = None) -> ModelSpec:
    """Configs and weights from a diffusers folder or a single checkpoint file, with an optional VAE file."""
    spec = _read_source(path, config, use_ema, prediction, unsafe_pickle)
    if (kind := few_step_kind(spec, path)) is not None:  # what the model's own config says still wins
        spec.sampling = {**FEW_STEP[kind], **spec.sampling}
        spec.native_size = 512 if kind == "turbo" else spec.native_size
    if vae is not None:
        sd, prefixes = vae_weights(Path(vae), unsafe_pickle)
        spec.weights["vae"] = (sd, vae_prefixes(spec.vae) if prefixes is None else prefixes)
    return spec


def _read_source(path: Path, config, use_ema: bool, prediction: str | None, unsafe_pickle: bool) -> ModelSpec:
    if not path.exists():
        raise UserError(f"model {path} not found: pass --model with a .safetensors/.ckpt checkpoint or a "
                        "diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is a folder but not a diffusers model (no model_index.json)")
        if config is not None:
            raise UserError("--config is for single-file checkpoints; a diffusers folder carries its own configs")
        spec = folder_fmt.read(path, unsafe_pickle)
        if prediction:
            spec.schedule = replace(spec.schedule, prediction=prediction)
        return spec
    return original.read(path, config, use_ema, prediction, unsafe_pickle)


def vae_weights(path: Path, unsafe_pickle: bool = False) -> tuple[dict, list]:
    """A separate VAE file in either layout: CompVis (optionally under first_stage_model.) or diffusers."""
    sd = read_state_dict(path, unsafe_pickle)
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".down_blocks." in k or ".mid_block." in k for k in sd):
        return sd, None  # diffusers names: mapped with the model's VAE config
    if not any(k.startswith("encoder.down.") for k in sd):
        raise UserError(f"{path}: not a VAE (no encoder/decoder weights in either the CompVis or the diffusers layout)")
    return sd, []


def probe_v_prediction(unet: UNet) -> bool:
    """AUTOMATIC1111's test for SD 2.x weights: at t=999 a v model's output sits well below its input."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.context_dim), 0.5, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        out = unet(x, torch.tensor([999.0], device=p.device), context)
    return (out.float() - x.float()).mean().item() < -1


def lora_uses(loras) -> tuple[LoraUse, ...]:
    """LoraUse, (file, weight) pairs or "FILE:WEIGHT" strings, checked to exist."""
    uses = tuple(u if isinstance(u, LoraUse) else parse_use(u) if isinstance(u, str) else LoraUse(Path(u[0]), u[1], u[1])
                 for u in loras)
    for use in uses:
        if not use.path.is_file():
            raise UserError(f"LoRA file {use.path} not found")
    return uses


SAMPLING = {"sampler": "DPM++ 2M Karras", "scale": 7.5, "steps": 20}  # when neither the call nor the model says


def _sampling(model: "StableDiffusion", steps: int, sampler: str | None, schedule: str | None, scale: float | None,
              eta: float | None, clip_skip: int, subseed: int | None, subseed_strength: float) -> dict:
    """The sampling options every image method passes on to its pipeline: a sampler, scale or steps left as None is
    the model's own default (SAMPLING where it has none); a variation strength without a variation seed draws
    one, the same for every tile and pass of the call."""
    if subseed_strength and subseed is None:
        subseed = random.randrange(2**32)
    if sampler is None and schedule is None:  # the model's own sampler, on its own schedule where it names one
        schedule = model.sampling.get("schedule")
    return dict(steps=model.sampling["steps"] if steps is None else steps, sampler=sampler or model.sampling["sampler"],
                schedule=schedule,
                scale=model.sampling["scale"] if scale is None else scale, eta=eta, clip_skip=clip_skip,
                subseed=subseed, subseed_strength=subseed_strength)


def _finished(method):
    """An image method whose images go through the model's safety checker and watermark, where it has them."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        return finish(method(self, *args, **kwargs), self.screen, self.watermark)
    return run


def load_screen(model_path: Path, checker: str | Path | bool, device: torch.device, dtype: torch.dtype,
                unsafe_pickle: bool = False) -> Screen:
    """The safety checker: `checker` a path, or True for the model folder's own safety_checker/. It runs in fp32 on
    a CPU (a small part of a render's work; the scores as diffusers computes them), else in the model's dtype."""
    from stablediff.checkpoints.safety_checker import NO_CHECKER, load

    if checker is True:
        if not model_path.is_dir():
            raise UserError(f"{model_path} is a single file, which carries no safety checker; {NO_CHECKER}")
        checker = model_path
    dtype = torch.float32 if device.type == "cpu" else dtype
    return Screen(*load(Path(checker), device, dtype, unsafe_pickle))


def _image(image: Image.Image | str | Path, mode: str = "RGB") -> Image.Image:
    return load_image(image, mode) if isinstance(image, (str, Path)) else image.convert(mode)


def _size(image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
    """The requested size, else the image's own rounded down to a multiple of 8."""
    return width or image.width // 8 * 8, height or image.height // 8 * 8


@dataclass
class StableDiffusion:
    tokenizer: ClipTokenizer | None  # None: SDXL's refiner, which has only the second text encoder
    text_encoder: ClipTextModel | None
    unet: UNet
    vae: AutoencoderKL
    schedule: TrainSchedule
    name: str
    device: torch.device
    dtype: torch.dtype
    native_size: int = 512  # pixels per side the model was trained at
    family: str = "sd1"
    variant: str = "base"
    model_hash: str | None = None  # AUTOMATIC1111's short hash, when `stablediff info --hash` has cached it
    low_res_schedule: TrainSchedule | None = None  # the x4 upscaler's noise augmentation of its input
    embeddings: EmbeddingLibrary | None = None  # textual inversion files, used where a prompt names them
    lora_dir: Path | None = None  # where <lora:name:weight> in a prompt looks for name.safetensors
    loras: tuple[LoraUse, ...] = ()  # merged into every render, with those the prompt names
    sampling: dict = field(default_factory=lambda: dict(SAMPLING))  # sampler and scale when a call names none
    max_pixels: int = checks.MAX_PIXELS  # the largest image (width x height) a call may ask for
    screen: Screen | None = None  # the safety checker: a flagged image is returned black, info["nsfw"] True
    watermark: str | None = None  # text embedded invisibly in every image (invisible-watermark's dwtDct)
    tokenizer_2: ClipTokenizer | None = None  # SDXL: OpenCLIP ViT-bigG/14, whose pooled output joins the UNet's vector
    text_encoder_2: ClipTextModel | None = None
    # SDXL's size conditioning where not the render's own (conditioning.size_numbers): original_size and target_size
    # as (height, width), crop as (top, left); the refiner's aesthetic_score and negative_aesthetic_score
    size_conditioning: dict = field(default_factory=dict)
    zero_empty_negatives: bool = True  # SDXL: a batch's negative prompts all empty are zeros (diffusers' force_zeros)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype | None = None, *,
             config: str | Path | None = None, vae: str | Path | None = None, use_ema: bool = True,
             prediction: str | None = None, unsafe_pickle: bool = False, embeddings_dir: str | Path | None = None,
             lora_dir: str | Path | None = None, loras=(), compile: bool = False,
             safety_checker: str | Path | bool | None = None, watermark: str | None = None) -> "StableDiffusion":
        """Load a .safetensors/.ckpt checkpoint or a diffusers folder (None: the shipped demo model) onto `device`
        in `dtype` (fp32, fp16, bf16).

        config: an original YAML (or preset name); vae: a separate VAE file; use_ema: prefer EMA weights;
        prediction: "epsilon" or "v" where the weights do not say; unsafe_pickle: the full unpickler.
        embeddings_dir: textual inversion files; lora_dir: LoRA files for <lora:name:weight>; loras: see use_loras.
        compile: torch.compile the UNet. Its first step at each image size then takes minutes (2 to 3 on a
        2-core CPU); there the compiled steps measured no faster than eager ones, in fp32 and in bf16, so it is
        for GPUs (BENCHMARKS.md).
        safety_checker: screen every image with the Stable Diffusion safety checker (a path, or True for the model
        folder's own); watermark: embed this text invisibly in every image (needs stablediff[watermark]).
        """
        path = Path(path) if path is not None else DEMO_MODEL
        loras = lora_uses(loras)  # a missing file fails before the model is read
        if watermark is not None:
            check_watermark_text(watermark)  # it, and the library, fail before the model is read
        dev = resolve_device(device) if isinstance(device, str) else device
        dt = resolve_dtype(dtype, dev)
        screen = None if safety_checker in (None, False) else load_screen(path, safety_checker, dev, dt, unsafe_pickle)
        spec = read_spec(path, config, use_ema, prediction, unsafe_pickle, vae)
        if "sampler" in spec.sampling:  # a bad name in the model's config fails here, not at the first render
            try:
                parse_sampler(spec.sampling["sampler"])
            except UserError as e:
                raise UserError(f"the model's YAML config has default_sampler: {e}") from None
        classes = {"text_encoder": ClipTextModel, "text_encoder_2": ClipTextModel, "unet": UNet, "vae": AutoencoderKL}
        built = {part: _build(cls_, spec.config_of(part), *spec.weights[part], part, dt, dev)
                 if spec.config_of(part) is not None else None for part, cls_ in classes.items()}
        keep_freed_memory(dev)  # after loading, whose large buffers are freed once and for all
        if compile:
            compile_module(built["unet"], dev)
        schedule, native = spec.schedule, spec.native_size
        if not spec.prediction_known:  # SD 2.x base weights: the 768 v model or the 512 epsilon one
            is_v = probe_v_prediction(built["unet"])
            schedule, native = replace(schedule, prediction="v" if is_v else "epsilon"), 768 if is_v else 512
        tokenizers = {"tokenizer": ClipTokenizer(spec.tokenizer_tables, pad_token=spec.pad_token,
                                                 max_len=spec.clip.max_len) if spec.clip else None}
        if spec.clip2 is not None:
            tokenizers["tokenizer_2"] = ClipTokenizer(spec.tokenizer2_tables, pad_token=spec.pad_token_2,
                                                      max_len=spec.clip2.max_len)
        return cls(**tokenizers,
                   schedule=schedule, name=spec.name, device=dev, dtype=dt, native_size=native, family=spec.family,
                   variant=spec.variant, model_hash=cached_hash(path) if path.is_file() else None,
                   low_res_schedule=spec.low_res_schedule,
                   embeddings=EmbeddingLibrary(embeddings_dir) if embeddings_dir is not None else None,
                   lora_dir=Path(lora_dir) if lora_dir is not None else None, sampling={**SAMPLING, **spec.sampling},
                   screen=screen, watermark=watermark, zero_empty_negatives=spec.zero_empty_negatives,
                   **built).use_loras(loras)

    def __post_init__(self):
        self._denoiser = Denoiser(self.unet, self.schedule)
        self.lora_merger = LoraMerger()

    def use_loras(self, loras) -> "StableDiffusion":
        """LoRAs to merge into every render from now on: LoraUse, (file, weight) pairs or "FILE:WEIGHT" strings.
        They are merged at the next render and taken out again, bit for bit, when the set changes."""
        self.loras = lora_uses(loras)
        return self

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.ch_mult) - 1)

    def denoiser(self) -> Denoiser:
        return self._denoiser

    def _batch(self, prompt, negative_prompt, seed, batch_size):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1 (got {batch_size})")
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        seeds = checks.seeds(seed, len(prompts)) if seed is None or isinstance(seed, int) else list(seed)
        for what, values in (("negative prompts", negatives), ("seeds", seeds)):
            if len(values) != len(prompts):
                raise UserError(f"{len(prompts)} prompt(s) but {len(values)} {what}: give one per prompt, or one "
                                f"{what.removesuffix('s')} for all")
        for i, text in enumerate(prompts + negatives):
            checks.check_prompt(text, f"{'prompt' if i < len(prompts) else 'negative prompt'} {i % len(prompts) + 1}")
        return prompts, negatives, checks.check_seed_list(seeds)

    @_finished
    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int | None = None,
                sampler: str | None = None, schedule: str | None = None, scale: float | None = None,
                eta: float | None = None, clip_skip: int = 1, width: int | None = None, height: int | None = None,
                seed: int | list[int] | None = None, subseed: int | None = None,
                subseed_strength: float = 0.0, batch_size: int = 1, hires: Hires | None = None,
                refiner: Refiner | None = None, callback: Callable | None = None) -> list[Image.Image]:
        """Images for a prompt (batch_size of them) or one per prompt in a list; image i uses seed + i (or
        seed[i]). sampler, scale None: the model's own defaults (`model.sampling`; DPM++ 2M Karras and 7.5 unless
        its config names others). schedule None: the one in the sampler's name ("... Karras"), else the model's own.
        clip_skip: 1 uses the text encoder's usual layer, 2 the one before it (through the final layer norm), and so on.
        subseed, subseed_strength: variation seeds (image i's noise slerped towards subseed + i's). hires: a second
        pass at a larger size (AUTOMATIC1111's hires fix). refiner: Refiner(StableDiffusion.load(...), switch=0.8), a
        second model (SDXL's refiner) that runs the steps after the switch."""
        prompts, negatives, seeds = self._batch(prompt, negative_prompt, seed, batch_size)
        return run_txt2img(self, prompts, negatives, seeds, width=width or self.native_size,
                           height=height or self.native_size, hires=hires, refiner=refiner, callback=callback,
                           **_sampling(self, steps, sampler, schedule, scale, eta, clip_skip, subseed, subseed_strength))

    @_finished
    def img2img(self, image: Image.Image | str | Path, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                strength: float = 0.75, steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
                scale: float | None = None, eta: float | None = None, clip_skip: int = 1, width: int | None = None,
                height: int | None = None, resize_mode: str = "just-resize", seed: int | list[int] | None = None,
                subseed: int | None = None, subseed_strength: float = 0.0, batch_size: int = 1,
                refiner: Refiner | None = None, callback: Callable | None = None) -> list[Image.Image]:
        """The image re-rendered under the prompt; strength 0 keeps it, 1 repaints it. Size: the image's own,
        rounded down to a multiple of 8, unless width/height say otherwise (then resize_mode applies). refiner: as
        txt2img's."""
        init = _image(image)
        prompts, negatives, seeds = self._batch(prompt, negative_prompt, seed, batch_size)
        w, h = _size(init, width, height)
        return image_pipelines.img2img(self, [init] * len(prompts), prompts, negatives, seeds, strength=strength,
                                       width=w, height=h, resize_mode=resize_mode, refiner=refiner, callback=callback,
                                       **_sampling(self, steps, sampler, schedule, scale, eta, clip_skip, subseed, subseed_strength))

    @_finished
    def depth2img(self, image: Image.Image | str | Path, prompt: str | list[str], negative_prompt: str | list[str] = "",
                  *, depth_map: Image.Image | str | Path | None = None, depth_model: str | Path | None = None,
                  strength: float = 0.8, steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
                  scale: float | None = None, eta: float | None = None, clip_skip: int = 1, width: int | None = None,
                  height: int | None = None, resize_mode: str = "just-resize", seed: int | list[int] | None = None,
                  subseed: int | None = None, subseed_strength: float = 0.0, batch_size: int = 1,
                  callback: Callable | None = None) -> list[Image.Image]:
        """img2img with an SD 2 depth model, keeping the scene's depth: from `depth_map` (an image, lighter or
        darker = nearer, any scale), or estimated by the DPT model folder `depth_model`."""
        init = _image(image)
        prompts, negatives, seeds = self._batch(prompt, negative_prompt, seed, batch_size)
        w, h = _size(init, width, height)
        if depth_map is not None:
            depth = depth_from_image(_image(depth_map, "F"))
        elif depth_model is not None:
            depth = estimate_depth([common_fit(init, w, h, resize_mode)], depth_model)[0]
        else:
            raise UserError(NO_DEPTH_SOURCE)
        return image_pipelines.img2img(self, [init] * len(prompts), prompts, negatives, seeds, strength=strength,
                                       width=w, height=h, resize_mode=resize_mode, callback=callback,
                                       depths=[depth] * len(prompts),
                                       **_sampling(self, steps, sampler, schedule, scale, eta, clip_skip, subseed, subseed_strength))

    @_finished
    def inpaint(self, image: Image.Image | str | Path, mask: Image.Image | str | Path, prompt: str | list[str],
                negative_prompt: str | list[str] = "", *, strength: float = 1.0, fill: str = "original",
                mask_blur: int = 4, invert_mask: bool = False, only_masked: bool = False, padding: int = 32,
                steps: int | None = None, sampler: str | None = None, schedule: str | None = None, scale: float | None = None,
                eta: float | None = None, clip_skip: int = 1, width: int | None = None, height: int | None = None,
                resize_mode: str = "just-resize", seed: int | list[int] | None = None, subseed: int | None = None,
                subseed_strength: float = 0.0, batch_size: int = 1,
                callback: Callable | None = None) -> list[Image.Image]:
        """Repaint where the mask is white (with a 9-channel inpainting model, or any ordinary one). only_masked:
        work on the mask's box plus `padding` pixels at the full size, then paste it back."""
        init = _image(image)
        mask_image = _image(mask, "L")
        prompts, negatives, seeds = self._batch(prompt, negative_prompt, seed, batch_size)
        w, h = _size(init, width, height)

        def run(img, msk, **extra):
            return image_pipelines.inpaint(self, [img] * len(prompts), [msk] * len(prompts), prompts, negatives, seeds,
                                           width=w, height=h, strength=strength, fill=fill, mask_blur=mask_blur,
                                           resize_mode=resize_mode, callback=callback, **extra,
                                           **_sampling(self, steps, sampler, schedule, scale, eta, clip_skip, subseed, subseed_strength))
        if not only_masked:
            return run(init, mask_image, invert_mask=invert_mask)
        base, mask_image = common_fit(init, w, h, resize_mode), common_fit(mask_image, w, h, resize_mode)
        mask_image = ImageOps.invert(mask_image) if invert_mask else mask_image
        return image_pipelines.only_masked(run, base, mask_image, padding, mask_blur)

    @_finished
    def upscale(self, image: Image.Image | str | Path, prompt: str | list[str], negative_prompt: str | list[str] = "", *,
                noise_level: int = 20, tile: int = 128, overlap: int = 32, steps: int | None = None,
                sampler: str | None = None, schedule: str | None = None, scale: float = 9.0,
                eta: float | None = None, clip_skip: int = 1, seed: int | list[int] | None = None,
                subseed: int | None = None, subseed_strength: float = 0.0, batch_size: int = 1,
                callback: Callable | None = None) -> list[Image.Image]:
        """The image at 4x its size with the SD x4 upscaler; noise_level (0..350) trades fidelity for new detail.
        Images larger than `tile` low-res pixels are upscaled in overlapping tiles, blended across `overlap`."""
        init = _image(image)
        prompts, negatives, seeds = self._batch(prompt, negative_prompt, seed, batch_size)
        checks.check_pixels(init.width * 4, init.height * 4, self.max_pixels, "--max-pixels (max_pixels in Python)")
        return upscale_pipeline(self, [init] * len(prompts), prompts, negatives, seeds, noise_level=noise_level,
                                tile=tile, overlap=overlap, callback=callback,
                                **_sampling(self, steps, sampler, schedule, scale, eta, clip_skip, subseed, subseed_strength))

    @_finished
    def outpaint(self, image: Image.Image | str | Path, prompt: str | list[str], negative_prompt: str | list[str] = "",
                 *, extend: tuple[int, int, int, int] = (0, 0, 0, 0), mask_blur: int = 8, fill: str = "original",
                 steps: int | None = None, sampler: str | None = None, schedule: str | None = None, scale: float | None = None,
                 eta: float | None = None, clip_skip: int = 1, seed: int | list[int] | None = None,
                 subseed: int | None = None, subseed_strength: float = 0.0, batch_size: int = 1,
                 callback: Callable | None = None) -> list[Image.Image]:
        """The image on a canvas extended by (left, right, up, down) pixels, the new border painted to match;
        the original pixels are kept exactly."""
        init = _image(image)
        init = common_fit(init, *_size(init, None, None), "crop-and-resize")
        canvas, mask = image_pipelines.outpaint_canvas(init, *extend)
        prompts, negatives, seeds = self._batch(prompt, negative_prompt, seed, batch_size)
        return image_pipelines.inpaint(self, [canvas] * len(prompts), [mask] * len(prompts), prompts, negatives, seeds,
                                       width=canvas.width, height=canvas.height, fill=fill, mask_blur=mask_blur,
                                       blur_inward=True, callback=callback,
                                       **_sampling(self, steps, sampler, schedule, scale, eta, clip_skip, subseed, subseed_strength))
