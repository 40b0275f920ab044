"""What a model source (a diffusers folder or a single checkpoint file) resolves to before building."""
from dataclasses import dataclass, field
from pathlib import Path

from stablediff.diffusion.schedules import TrainSchedule
from stablediff.models.clip_text import ClipTextConfig
from stablediff.models.tokenizer import EOS
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig

PARTS = ("text_encoder", "unet", "vae")


@dataclass
class ModelSpec:
    unet: UNetConfig
    vae: VAEConfig
    clip: ClipTextConfig
    schedule: TrainSchedule
    # part -> (state dict, key map into our names; [] when the names are ours already)
    weights: dict[str, tuple[dict, list]] = field(default_factory=dict)
    name: str = "model"
    native_size: int = 512
    pad_token: str = EOS
    tokenizer_tables: Path | None = None
    family: str = "sd1"
    variant: str = "base"
    prediction_known: bool = True  # False: SD 2.x base weights, which do not say epsilon or v
    ema: bool | None = None  # the EMA weights were used (None: the source has none)
    low_res_schedule: TrainSchedule | None = None  # x4 upscaler: how its low-res input is noised
    config_text: str | None = None  # the original YAML config used, carried into files written from this spec
    sampling: dict = field(default_factory=dict)  # the model's own defaults: sampler, scale (from its YAML)
