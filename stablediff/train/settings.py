"""The settings of a `stablediff train` run (no torch import: the command line reads them for --help)."""
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Settings:
    config: str = "shapes-demo"
    data: str = "shapes"
    images: int = 60000  # pictures in the dataset
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32  # crop side for the first 80% of VAE steps (whole pictures after)
    vae_lr: float = 1e-3
    text_steps: int = 400  # the text encoder alone, learning to read captions
    text_batch: int = 128
    text_lr: float = 1e-3
    steps: int = 10000  # text encoder + UNet
    batch: int = 32
    lr: float = 5e-4
    joint_text_lr: float = 5e-5  # the text encoder's rate while it trains along with the UNet
    warmup: int = 100  # steps of linear learning-rate warm-up, in each stage
    drop_caption: float = 0.1
    seed: int = 0
    precision: str = "auto"  # bf16 autocast where bf16 is native (auto), always (bf16) or never (fp32)
    dtype: str = "fp16"  # of the weights written

    @staticmethod
    def help(name: str) -> str:
        """What a setting is, for `stablediff train --help`."""
        return HELP[name]

    def command(self) -> str:
        """The `stablediff train` command line that reproduces these settings."""
        flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in asdict(self).items() if v != getattr(Settings, k))
        return f"stablediff train OUT.safetensors {flags}".strip()


HELP = {"config": "the model's YAML config: a preset name or a file", "data": "the dataset (the drawn shapes)",
        "images": "pictures in the dataset", "vae_steps": "steps of the VAE stage", "vae_batch": "pictures per VAE step",
        "vae_crop": "crop side of the first 80%% of VAE steps (whole pictures after)", "vae_lr": "the VAE's learning rate",
        "text_steps": "steps of the text encoder alone, learning to read captions",
        "text_batch": "captions per text-encoder step", "text_lr": "the text encoder's learning rate in its own stage",
        "steps": "steps of the text encoder and UNet together", "batch": "pictures per UNet step",
        "lr": "the UNet's learning rate", "joint_text_lr": "the text encoder's learning rate while it trains with the UNet",
        "warmup": "steps of linear learning-rate warm-up in each stage",
        "drop_caption": "the share of captions dropped (for classifier-free guidance)", "seed": "seed of the data and weights",
        "precision": "bf16 autocast where bf16 is native (auto), always (bf16) or never (fp32)",
        "dtype": "dtype of the weights written"}
