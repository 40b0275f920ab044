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


@dataclass(frozen=True)
class FinetuneSettings:
    """What `stablediff finetune` trains and how (no torch import, for --help)."""

    method: str = "lora"  # "dreambooth": the UNet (and optionally the text encoder); "textual-inversion": vectors
    instance_prompt: str | None = None  # the caption of pictures with none of their own
    class_prompt: tuple[str, ...] = ()  # DreamBooth's prior preservation: pictures of these, made by the base model
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    ema: bool = False  # DreamBooth: write the EMA of the weights, not the last ones
    save_dtype: str = "fp16"  # DreamBooth: of the checkpoint written
    token: str | None = None  # textual inversion: the word the captions use for the subject (default: OUT's name)
    init_word: str | None = None  # textual inversion: the vectors start as this word's
    vectors: int = 1  # textual inversion: vectors per token
    embedding_format: str = "a1111"  # textual inversion: "a1111" (emb_params) or "diffusers" ({token: vectors})
    lora_format: str = "kohya"  # LoRA: "kohya" (lora_unet_*, .alpha) or "peft" (diffusers' unet.*.lora_A/B)
    resolution: int = 512
    aspect_buckets: bool = True
    center_crop: bool = False
    flip: bool = False
    rank: int = 4
    alpha: float = 4.0
    conv_rank: int = 0  # 3x3 convolutions too (LoCon), at this rank; 0: not
    conv_alpha: float = 1.0
    feed_forward: bool = True
    train_text_encoder: bool = False
    steps: int = 500
    epochs: int | None = None  # in place of steps: passes over the pictures (with their repeats)
    batch_size: int = 1
    grad_accum: int = 1  # batches per optimizer step, their gradients summed
    lr: float | None = None  # None: the method's own (DEFAULT_LR)
    text_lr: float = 5e-5
    warmup: int = 0
    schedule: str = "constant"
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    clip_skip: int = 1
    seed: int = 0
    precision: str = "auto"  # mixed precision through accelerate: auto (bf16 where native), bf16, fp16 (GPU), fp32
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    sample_prompt: tuple[str, ...] = ()  # pictures of these every sample_every steps, into the work folder
    sample_every: int = 0


DEFAULT_LR = {"lora": 1e-4, "dreambooth": 5e-6, "textual-inversion": 5e-3}

FINETUNE_HELP = {
    "token": "textual inversion: the word your captions use for the subject (default: the output file's name, "
             "which is how AUTOMATIC1111 and this program's --embeddings-dir name an embedding)",
    "init_word": "textual inversion: a word near the subject (e.g. dog); the vectors start as its embedding",
    "vectors": "textual inversion: vectors the token stands for",
    "embedding_format": "textual inversion: a1111 (emb_params) or diffusers (learned_embeds: {token: vectors})",
    "class_prompt": "prior preservation: also train on pictures of this prompt that the base model makes (e.g. "
                    "\"a photo of a dog\"), so that it keeps drawing the class as it did; repeat it for several "
                    "prompts (the pictures are shared among them)",
    "num_class_images": "pictures of --class-prompt to make (once: kept in the work folder for reruns)",
    "prior_loss_weight": "the weight of the class pictures' loss", "ema": "DreamBooth: write the EMA weights",
    "save_dtype": "DreamBooth: the dtype of the checkpoint written",
    "instance_prompt": "the caption of every picture without a NAME.txt of its own (e.g. \"a photo of sks dog\")",
    "resolution": "the training resolution: pictures go to aspect-ratio buckets of about this many pixels squared",
    "aspect_buckets": "sort pictures into aspect-ratio buckets (else every picture is cropped square)",
    "center_crop": "crop the centre of each picture to its bucket (default: a random place each time)",
    "flip": "flip pictures left-right at random", "rank": "the LoRA's rank (network dim)",
    "alpha": "the LoRA's alpha: its factors are scaled by alpha / rank",
    "conv_rank": "also train the UNet's 3x3 convolutions (LoCon) at this rank (0: not)",
    "conv_alpha": "alpha of the convolutions' factors", "feed_forward": "also train the UNet's feed-forward layers",
    "train_text_encoder": "also train LoRA factors on the text encoder", "steps": "optimizer steps",
    "epochs": "train this many passes over the pictures (with their repeats) instead of --steps",
    "batch_size": "pictures per step (one aspect bucket per step)",
    "grad_accum": "batches per optimizer step, their gradients summed (a larger batch in the same memory)",
    "lora_format": "LoRA: kohya (lora_unet_*, .alpha: AUTOMATIC1111, ComfyUI, diffusers) or peft (diffusers' own "
                   "unet.*.lora_A/lora_B, alpha / rank folded into lora_B)",
    "lr": "the learning rate (default: lora 1e-4, dreambooth 5e-6, textual inversion 5e-3)",
    "text_lr": "the text encoder's learning rate", "warmup": "steps of linear learning-rate warm-up",
    "schedule": "the learning rate after the warm-up", "noise_offset": "a per-channel offset added to the noise",
    "min_snr_gamma": "weight each timestep's loss by min(SNR, gamma) / SNR (5 is usual)",
    "clip_skip": "the text encoder layer to train with, as at generation (1: the last)",
    "seed": "seed of the data order, crops, noise and the LoRA's start",
    "precision": "mixed precision: auto (bf16 where the hardware has it, else fp32), bf16, fp16 (on a GPU, with loss "
                 "scaling) or fp32",
    "optimizer": "adamw, or adamw8bit (bitsandbytes' 8-bit moments: a quarter of the optimizer's memory)",
    "gradient_checkpointing": "recompute each block's activations in the backward pass instead of keeping them "
                              "(far less memory, about a third more time)",
    "checkpoint_every": "steps between checkpoints (to resume from)",
    "sample_prompt": "a prompt to draw every --sample-every steps, into the work folder's samples/ (repeatable)",
    "sample_every": "steps between sample pictures (0: none)"}
