"""`stablediff finetune --method lora`: a LoRA trained on a folder of pictures over a checkpoint people have, by the
demo trainer's loop (train/loop.Run: AdamW, warm-up and schedule, checkpoints and an exact resume, Ctrl-C keeping
the last checkpoint), written in kohya's layout with the metadata AUTOMATIC1111 reads."""
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from stablediff.checkpoints.hashing import sha256
from stablediff.errors import UserError
from stablediff.files import write_atomic
from stablediff.pipelines.common import encode_image, to_pixels
from stablediff.train.data import Buckets, load, read_folder
from stablediff.train.lora import LoraNetwork
from stablediff.train.loop import Run, autocast, resolve_precision
from stablediff.train.objectives import diffusion_loss
from stablediff.train.recipe import _generator, _step_seed, caption_ids
from stablediff.train.settings import FinetuneSettings


def legacy_model_hash(path: Path) -> str | None:
    """AUTOMATIC1111's old 8-digit model hash (of 64 KiB at 1 MiB into the file), which kohya writes as
    ss_sd_model_hash; None for a folder."""
    import hashlib

    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def total_steps(settings: FinetuneSettings, pictures: int) -> int:
    """--steps, or --epochs passes over the pictures (their repeats counted) in batches."""
    if settings.epochs is None:
        return settings.steps
    return max(1, math.ceil(settings.epochs * pictures / settings.batch_size))


def _check(settings: FinetuneSettings, out: Path) -> None:
    if out.exists():
        raise UserError(f"{out} exists: choose a new file name (a LoRA is never written over)")
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the LoRA is written as .safetensors; give a name ending in .safetensors")
    for name, low in (("rank", 1), ("batch_size", 1), ("steps", 1), ("checkpoint_every", 1), ("clip_skip", 1),
                      ("resolution", 64)):
        if getattr(settings, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(settings, name)})")
    if settings.resolution % 64:
        raise UserError(f"--resolution {settings.resolution}: give a multiple of 64 (the buckets' grid)")
    if settings.epochs is not None and settings.epochs < 1:
        raise UserError(f"--epochs must be at least 1 (got {settings.epochs})")


def metadata(settings: FinetuneSettings, base: Path, model, examples, buckets: Buckets, steps: int, out: Path,
             started: float) -> dict[str, str]:
    """kohya's ss_* fields (all strings), as AUTOMATIC1111's and ComfyUI's LoRA browsers read them."""
    folders = Counter(e.path.parent.name for e in examples)
    repeats = {e.path.parent.name: e.repeats for e in examples}
    tags = {name: dict(Counter(t.strip() for e in examples if e.path.parent.name == name
                               for t in e.caption.split(",") if t.strip())) for name in folders}
    fields = {
        "ss_network_module": "networks.lora", "ss_network_dim": settings.rank, "ss_network_alpha": settings.alpha,
        "ss_network_args": json.dumps({"conv_dim": settings.conv_rank, "conv_alpha": settings.conv_alpha})
        if settings.conv_rank else None,
        "ss_base_model_version": "sd_v2" if model.family == "sd2" else "sd_v1", "ss_v2": model.family == "sd2",
        "ss_sd_model_name": base.name, "ss_sd_model_hash": legacy_model_hash(base),
        "ss_new_sd_model_hash": sha256(base) if base.is_file() else None, "ss_output_name": out.stem,
        "ss_training_started_at": started, "ss_training_finished_at": time.time(),
        "ss_learning_rate": settings.lr, "ss_unet_lr": settings.lr,
        "ss_text_encoder_lr": settings.text_lr if settings.train_text_encoder else None,
        "ss_network_train_unet_only": not settings.train_text_encoder, "ss_max_train_steps": steps,
        "ss_epoch": settings.epochs, "ss_train_batch_size": settings.batch_size,
        "ss_resolution": f"({settings.resolution}, {settings.resolution})", "ss_enable_bucket": settings.aspect_buckets,
        "ss_bucket_info": json.dumps({"buckets": {f"{w}x{h}": len(v) for (w, h), v in buckets.by_bucket.items()}}),
        "ss_num_train_images": buckets.total, "ss_seed": settings.seed, "ss_lr_scheduler": settings.schedule,
        "ss_lr_warmup_steps": settings.warmup, "ss_noise_offset": settings.noise_offset or None,
        "ss_min_snr_gamma": settings.min_snr_gamma, "ss_clip_skip": settings.clip_skip,
        "ss_mixed_precision": resolve_precision(settings.precision, model.device), "ss_flip_aug": settings.flip,
        "ss_random_crop": not settings.center_crop, "ss_optimizer": "torch.optim.AdamW(weight_decay=0)",
        "ss_dataset_dirs": json.dumps({name: {"n_repeats": repeats[name], "img_count": n} for name, n in folders.items()}),
        "ss_tag_frequency": json.dumps(tags), "ss_training_comment": "stablediff finetune"}
    return {k: str(v) for k, v in fields.items() if v is not None}


def finetune(base: Path, images: Path, out: Path, work: Path, settings: FinetuneSettings, device: torch.device,
             load_options: dict | None = None, progress: bool = True) -> dict:
    """Train and write the LoRA; returns the loss history and seconds taken. Rerun with the same arguments to
    resume from the last checkpoint in `work`."""
    from safetensors.torch import save_file

    from stablediff.api import StableDiffusion

    _check(settings, out)
    started = time.time()
    examples = read_folder(images, settings.instance_prompt)
    buckets = Buckets(examples, settings.resolution, settings.aspect_buckets)
    steps = total_steps(settings, buckets.total)
    model = StableDiffusion.load(base, device=device, dtype="fp32", **(load_options or {}))
    usable = model.text_encoder.config.layers - model.text_encoder.config.skip_layers
    if settings.clip_skip > usable:
        raise UserError(f"--clip-skip {settings.clip_skip}: this text encoder has {usable} layers to choose from")
    torch.manual_seed(settings.seed)  # the factors' start
    network = LoraNetwork(model, settings.rank, settings.alpha, settings.conv_rank, settings.conv_alpha,
                          settings.train_text_encoder, settings.feed_forward).to(device).attach(model)
    parts = {part: nn.ModuleList(network.factors[k] for k, (p, _) in network.targets.items() if p == part)
             for part in ("unet", "text_encoder")}
    work.mkdir(parents=True, exist_ok=True)
    run = Run("lora", {k: v for k, v in parts.items() if len(v)}, steps, settings.lr, work / "lora.pt", settings.warmup,
              every=settings.checkpoint_every, module_lr={"text_encoder": settings.text_lr}, schedule=settings.schedule)
    ids = caption_ids(model.tokenizer)
    skip = model.text_encoder.config.skip_layers + settings.clip_skip - 1

    def loss(step):
        rng = random.Random(_step_seed(settings.seed, step))
        g = _generator(settings.seed, step, device)
        (w, h), batch = buckets.batch(rng, settings.batch_size)
        pixels = to_pixels([load(e, (w, h), settings.center_crop, settings.flip, rng) for e in batch], device)
        f = model.vae_scale
        latents = encode_image(model, pixels, lambda: torch.randn((len(batch), 4, h // f, w // f), generator=g,
                                                                  device=g.device))
        tokens = torch.tensor([ids(e.caption) for e in batch], device=device)
        with autocast(device, settings.precision):
            return diffusion_loss(model.unet, model.text_encoder, latents, tokens, model.schedule, g,
                                  settings.noise_offset, settings.min_snr_gamma, skip)

    try:
        run.train(loss, progress)
    finally:
        network.detach()
    sd = network.kohya_state_dict()
    meta = metadata(settings, base, model, examples, buckets, steps, out, started)
    write_atomic(out, lambda tmp: save_file(sd, tmp, metadata=meta))
    return {"losses": run.losses, "steps": steps, "layers": len(network.factors),
            "parameters": sum(p.numel() for p in network.parameters()), "seconds": time.time() - started}
