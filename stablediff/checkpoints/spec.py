"""What a model source (a diffusers folder or a single checkpoint file) resolves to before building."""
from dataclasses import dataclass, field
from pathlib import Path

from stablediff.diffusion.schedules import TrainSchedule
from stablediff.models.clip_text import ClipTextConfig
from stablediff.models.tokenizer import EOS
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig

PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")


@dataclass
class ModelSpec:
    unet: UNetConfig
    vae: VAEConfig
    clip: ClipTextConfig | None  # None: SDXL's refiner, which has only the second text encoder
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
    clip2: ClipTextConfig | None = None  # SDXL: OpenCLIP ViT-bigG/14, with its pooled projection
    pad_token_2: str = "!"
    tokenizer2_tables: Path | None = None
    zero_empty_negatives: bool = True  # SDXL: all-empty negative prompts are zeros (not for its refiner)

    def config_of(self, part: str):
        """The config of a part (text_encoder, text_encoder_2, unet, vae), None where the model has none."""
        return {"text_encoder": self.clip, "text_encoder_2": self.clip2, "unet": self.unet, "vae": self.vae}[part]
