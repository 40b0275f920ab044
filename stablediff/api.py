"""The Python API: `StableDiffusion.load(path)` then `.txt2img(...)`."""
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from stablediff.checkpoints import diffusers_folder as folder_fmt
from stablediff.checkpoints.io import read_state_dict
from stablediff.checkpoints.keymaps import clip_prefixes, load_into, unet_prefixes, vae_prefixes
from stablediff.devices import resolve_device, resolve_dtype
from stablediff.diffusion.denoiser import Denoiser
from stablediff.diffusion.schedules import TrainSchedule
from stablediff.errors import UserError
from stablediff.models.clip_text import ClipTextModel
from stablediff.models.tokenizer import EOS, ClipTokenizer
from stablediff.models.unet import UNet
from stablediff.models.vae import AutoencoderKL
from stablediff.pipelines.txt2img import txt2img as run_txt2img


def _build(cls, cfg, sd, prefixes, what, dtype, device):
    with torch.device("meta"):  # no random init: every tensor comes from the file
        module = cls(cfg)
    load_into(module, sd, prefixes, what, dtype, device)
    return module.eval().requires_grad_(False)


@dataclass
class StableDiffusion:
    tokenizer: ClipTokenizer
    text_encoder: ClipTextModel
    unet: UNet
    vae: AutoencoderKL
    schedule: TrainSchedule
    name: str
    device: torch.device
    dtype: torch.dtype
    native_size: int = 512  # pixels per side the model was trained at

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str | torch.dtype | None = None) -> "StableDiffusion":
        """Load a diffusers-layout model folder onto `device` in `dtype` (fp32, fp16, bf16 or a torch dtype)."""
        path = Path(path)
        if not path.exists():
            raise UserError(f"model {path} not found: pass --model with a diffusers-layout folder "
                            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path} is not a diffusers model folder (no model_index.json); single checkpoint files "
                            "(.safetensors/.ckpt) are not supported yet")
        dev = resolve_device(device) if isinstance(device, str) else device
        dt = resolve_dtype(dtype, dev)
        unet_json = folder_fmt.read_config(path, "unet")
        unet_cfg = folder_fmt.unet_config(unet_json)
        vae_cfg = folder_fmt.vae_config(folder_fmt.read_config(path, "vae"))
        clip_cfg = folder_fmt.clip_config(folder_fmt.read_config(path, "text_encoder"))
        sched = folder_fmt.train_schedule(folder_fmt.read_config(path, "scheduler", "scheduler_config.json"))
        tables = path / "tokenizer" if (path / "tokenizer" / "vocab.json").is_file() else None
        tokenizer = ClipTokenizer(tables, pad_token=folder_fmt.pad_token(path) or EOS, max_len=clip_cfg.max_len)

        def part(cls_, cfg, name, prefixes):
            return _build(cls_, cfg, read_state_dict(folder_fmt.weights_file(path, name)), prefixes, name, dt, dev)

        return cls(tokenizer=tokenizer, text_encoder=part(ClipTextModel, clip_cfg, "text_encoder", clip_prefixes()),
                   unet=part(UNet, unet_cfg, "unet", unet_prefixes(unet_cfg)),
                   vae=part(AutoencoderKL, vae_cfg, "vae", vae_prefixes(vae_cfg)),
                   schedule=sched, name=path.name, device=dev, dtype=dt,
                   native_size=unet_json.get("sample_size", 64) * 2 ** (len(vae_cfg.ch_mult) - 1))

    def __post_init__(self):
        self._denoiser = Denoiser(self.unet, self.schedule)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.ch_mult) - 1)

    def denoiser(self) -> Denoiser:
        return self._denoiser

    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int = 20,
                sampler: str = "DPM++ 2M Karras", schedule: str | None = None, scale: float = 7.5,
                eta: float | None = None, width: int | None = None, height: int | None = None,
                seed: int | list[int] | None = None, batch_size: int = 1,
                callback: Callable | None = None) -> list[Image.Image]:
        """Images for a prompt (batch_size of them) or one per prompt in a list; image i uses seed + i (or
        seed[i]). schedule None: the one in the sampler's name ("... Karras"), else the model's own."""
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        seed = random.randrange(2**32) if seed is None else seed
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if not len(prompts) == len(negatives) == len(seeds):
            raise UserError("give as many negative prompts and seeds as prompts")
        return run_txt2img(self, prompts, negatives, seeds, steps=steps, sampler=sampler, schedule=schedule,
                           scale=scale, eta=eta, width=width or self.native_size, height=height or self.native_size,
                           callback=callback)
