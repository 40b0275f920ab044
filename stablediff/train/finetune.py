"""`stablediff finetune`: a checkpoint people have taught a subject from a folder of pictures, by the demo trainer's
loop (train/loop.Run: AdamW, warm-up and schedule, checkpoints and an exact resume, Ctrl-C keeping the last
checkpoint). --method lora writes a LoRA in kohya's layout with the metadata AUTOMATIC1111 reads; --method
dreambooth trains the UNet (and optionally the text encoder) itself and writes a whole checkpoint in the original
layout (or a diffusers folder); --method textual-inversion trains the vectors of a new word (Gal et al. 2022) and
writes an embedding (AUTOMATIC1111's emb_params, or diffusers' learned_embeds). Either may keep the class as the base model drew it (DreamBooth's prior
preservation, Ruiz et al. 2022): pictures of --class-prompt, made once by the base model, trained on alongside."""
import contextlib
import json
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from stablediff import prompts
from stablediff.checkpoints.hashing import sha256
from stablediff.errors import UserError
from stablediff.files import write_atomic
from stablediff.pipelines.common import encode_image, to_pixels
from stablediff.train.data import Buckets, Example, load, read_folder
from stablediff.train.lora import LoraNetwork
from stablediff.train.loop import Run, accelerator, checkpointing, resolve_precision
from stablediff.train.objectives import diffusion_loss, rows
from stablediff.train.recipe import _step_seed, caption_ids
from stablediff.train.settings import DEFAULT_LR, FinetuneSettings


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
        raise UserError(f"{out} exists: choose a new name (a result is never written over)")
    if settings.method not in DEFAULT_LR:
        raise UserError(f"--method {settings.method}: lora, dreambooth or textual-inversion")
    if settings.method != "dreambooth" and out.suffix != ".safetensors":
        raise UserError(f"{out}: a LoRA or an embedding is written as .safetensors; give a name ending in .safetensors")
    if settings.method == "textual-inversion" and not settings.init_word:
        raise UserError("textual inversion starts from a word: give --init-word, one near the subject (e.g. dog)")
    for name, low in (("rank", 1), ("batch_size", 1), ("grad_accum", 1), ("steps", 1), ("checkpoint_every", 1),
                      ("clip_skip", 1), ("resolution", 64), ("num_class_images", 1), ("vectors", 1)):
        if getattr(settings, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(settings, name)})")
    if settings.resolution % 64:
        raise UserError(f"--resolution {settings.resolution}: give a multiple of 64 (the buckets' grid)")
    if settings.sample_every < 0 or (settings.sample_every and not settings.sample_prompt):
        raise UserError("--sample-every N draws the --sample-prompt(s) every N steps: give both (N at least 1)")
    if settings.epochs is not None and settings.epochs < 1:
        raise UserError(f"--epochs must be at least 1 (got {settings.epochs})")


def _check_token(tokenizer, examples, token: str) -> None:
    """Every caption names the token, as a whole word (its tokens in a row among the caption's)."""
    want = tokenizer.tokens(token)
    if blind := [e.path.name for e in examples if not prompts.holds(tokenizer.tokens(e.caption), want)]:
        raise UserError(f"{len(blind)} caption(s) do not name the token {token!r} ({', '.join(blind[:3])}): the "
                        "vectors learn what it stands for there; write it in the captions or --instance-prompt")


def class_images(model, settings: FinetuneSettings, folder: Path, progress: bool) -> list[Example]:
    """--num-class-images pictures of the --class-prompt(s) (taken in turn) at the training resolution, made by the
    base model (seed + i) and kept in a folder of `folder` named by the prompts, seed and size: a rerun makes only
    those not there yet, and other prompts get pictures of their own."""
    import hashlib

    from tqdm import tqdm

    from stablediff.files import write_png

    size, wanted = settings.resolution, settings.class_prompt
    key = hashlib.sha256(json.dumps([list(wanted), settings.seed, size]).encode()).hexdigest()[:10]
    folder = folder / key
    folder.mkdir(parents=True, exist_ok=True)
    pictures = [(folder / f"{i:05d}.png", wanted[i % len(wanted)]) for i in range(settings.num_class_images)]
    missing = [i for i, (p, _) in enumerate(pictures) if not p.is_file()]
    for start in tqdm(range(0, len(missing), 4), desc="class pictures", unit="batch", disable=not progress or not missing):
        chunk = missing[start:start + 4]
        images = model.txt2img([pictures[i][1] for i in chunk], width=size, height=size,
                               seed=[settings.seed + i for i in chunk])
        for i, image in zip(chunk, images):
            write_png(image, pictures[i][0], image.info.get("parameters"))
    return [Example(p, prompt, 1, (size, size)) for p, prompt in pictures]


class Embedding(nn.Module):
    """Textual inversion's trained vectors, (n, D), started from a word's token embeddings (repeated to n)."""

    def __init__(self, model, word: str, n: int):
        super().__init__()
        ids = model.tokenizer.tokens(word)
        if not ids:
            raise UserError(f"--init-word {word!r} has no tokens: give a word")
        start = model.text_encoder.embeddings.token_embedding.weight.detach().float()[ids]
        self.vectors = nn.Parameter(start[torch.arange(n) % len(ids)].clone())

    def tokens(self, model, ids: torch.Tensor, fixes: list[list[tuple[int, torch.Tensor]]]) -> torch.Tensor:
        """The batch's token embeddings with the vectors where each caption names the token."""
        with torch.no_grad():
            base = model.text_encoder.embeddings.token_embedding(ids)
        rows = []
        for row, places in zip(base, fixes):
            parts, at = [], 0
            for pos, _ in sorted(places, key=lambda p: p[0]):
                parts += [row[at:pos], self.vectors.to(row.dtype)]
                at = pos + len(self.vectors)
            rows.append(torch.cat([*parts, row[at:]]))
        return torch.stack(rows)


def _trained(model, settings: FinetuneSettings) -> tuple[dict[str, nn.Module], LoraNetwork | None]:
    """The modules the run trains: the LoRA's factors (hooked onto the model), the UNet and text encoder, or the
    embedding's vectors."""
    if settings.method == "textual-inversion":
        return {"embedding": Embedding(model, settings.init_word, settings.vectors).to(model.device)}, None
    if settings.method == "dreambooth":
        modules = {"unet": model.unet}
        return (modules | {"text_encoder": model.text_encoder} if settings.train_text_encoder else modules), None
    torch.manual_seed(settings.seed)  # the factors' start
    network = LoraNetwork(model, settings.rank, settings.alpha, settings.conv_rank, settings.conv_alpha,
                          settings.train_text_encoder, settings.feed_forward).to(model.device).attach(model)
    parts = {part: nn.ModuleList(network.factors[k] for k, (p, _) in network.targets.items() if p == part)
             for part in ("unet", "text_encoder")}
    return {k: v for k, v in parts.items() if len(v)}, network


def _write_checkpoint(base: Path, model, emas: dict, settings: FinetuneSettings, out: Path, load_options: dict) -> None:
    """The fine-tuned model as its base was written (the same configs and layout), with the trained weights."""
    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import convert

    spec = read_spec(base, **load_options)
    for part in ("unet", "text_encoder", "vae"):
        module = getattr(model, part)
        spec.weights[part] = (emas[part].weights(module) if part in emas else module.state_dict(), [])
    spec.ema = None  # one set of weights is written: the trained ones (their EMA with --ema)
    convert(spec, out, None, settings.save_dtype)


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
        "ss_learning_rate": settings.lr or DEFAULT_LR["lora"], "ss_unet_lr": settings.lr or DEFAULT_LR["lora"],
        "ss_text_encoder_lr": settings.text_lr if settings.train_text_encoder else None,
        "ss_network_train_unet_only": not settings.train_text_encoder, "ss_max_train_steps": steps,
        "ss_epoch": settings.epochs, "ss_train_batch_size": settings.batch_size,
        "ss_resolution": f"({settings.resolution}, {settings.resolution})", "ss_enable_bucket": settings.aspect_buckets,
        "ss_bucket_info": json.dumps({"buckets": {f"{w}x{h}": len(v) for (w, h), v in buckets.by_bucket.items()}}),
        "ss_num_train_images": buckets.total, "ss_seed": settings.seed, "ss_lr_scheduler": settings.schedule,
        "ss_lr_warmup_steps": settings.warmup, "ss_noise_offset": settings.noise_offset or None,
        "ss_min_snr_gamma": settings.min_snr_gamma, "ss_clip_skip": settings.clip_skip,
        "ss_mixed_precision": resolve_precision(settings.precision, model.device), "ss_flip_aug": settings.flip,
        "ss_random_crop": not settings.center_crop,
        "ss_optimizer": {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit"}[settings.optimizer]
        + "(weight_decay=0)", "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_gradient_accumulation_steps": settings.grad_accum,
        "ss_dataset_dirs": json.dumps({name: {"n_repeats": repeats[name], "img_count": n} for name, n in folders.items()}),
        "ss_tag_frequency": json.dumps(tags), "ss_training_comment": "stablediff finetune"}
    return {k: str(v) for k, v in fields.items() if v is not None}


def _generators(seed: int, step: int, first: int, n: int, device) -> list[torch.Generator]:
    """A generator for each of a step's pictures first .. first + n - 1 (its place in the whole batch of all the
    processes), so that its noise is the same however the batch is split."""
    base = _step_seed(seed, step) * 4099
    return [torch.Generator(device).manual_seed((base + i) % 2 ** 63) for i in range(first, first + n)]


def _sampler(model, settings: FinetuneSettings, folder: Path, embedding, token: str):
    """after_step: every --sample-every steps, the --sample-prompt(s) drawn by the model as it is now (its LoRA hooked
    on, the embedding written where the prompts find it), seed + i, into folder/STEP-I.png."""
    from stablediff.adapters.embeddings import EmbeddingLibrary
    from stablediff.files import write_png

    def sample(step: int) -> None:
        if not settings.sample_every or step % settings.sample_every:
            return
        folder.mkdir(parents=True, exist_ok=True)
        if embedding is not None:
            (folder / "embedding").mkdir(exist_ok=True)
            _write_file(folder / "embedding" / f"{token}.safetensors", {"emb_params": _vectors(embedding)}, {})
            model.embeddings = EmbeddingLibrary(folder / "embedding")
        images = model.txt2img(list(settings.sample_prompt), width=settings.resolution, height=settings.resolution,
                               seed=[settings.seed + i for i in range(len(settings.sample_prompt))])
        for i, image in enumerate(images):
            write_png(image, folder / f"{step:06d}-{i}.png", image.info.get("parameters"))
    return sample


def _vectors(embedding) -> torch.Tensor:
    return embedding.vectors.detach().float().cpu().contiguous()


def _checkpointed(model, settings: FinetuneSettings):
    """--gradient-checkpointing: the UNet's ResBlocks and transformer blocks, and the text encoder's layers."""
    from stablediff.models.clip_text import ClipLayer
    from stablediff.models.unet import BasicTransformerBlock, ResBlock

    if not settings.gradient_checkpointing:
        return contextlib.nullcontext()
    return checkpointing([model.unet, model.text_encoder], (ResBlock, BasicTransformerBlock, ClipLayer))


def finetune(base: Path, images: Path, out: Path, work: Path, settings: FinetuneSettings, device: torch.device,
             load_options: dict | None = None, progress: bool = True) -> dict:
    """Train and write the LoRA or the checkpoint; returns the loss history and seconds taken. Rerun with the same
    arguments to resume from the last checkpoint in `work`. Under `accelerate launch`, each process trains on its
    --batch-size pictures of the step (the processes' batches one batch) and the main process writes."""
    from stablediff.api import StableDiffusion

    _check(settings, out)
    try:  # (the result's folder, made now: not found out after the training)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {out.parent} for {out.name}: {e.strerror}") from None
    load_options = load_options or {}
    started = time.time()
    examples = read_folder(images, settings.instance_prompt)
    token = settings.token or out.stem
    buckets = Buckets(examples, settings.resolution, settings.aspect_buckets)
    steps = total_steps(settings, buckets.total)
    # (the text encoder's layers past --clip-skip train nothing)
    acc = accelerator(device, settings.precision, unused=settings.clip_skip > 1)
    device = acc.device if acc.num_processes > 1 else device
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    # the frozen weights in the run's precision (as diffusers' training scripts keep them), trained ones in fp32
    frozen = "fp32" if settings.method == "dreambooth" else resolve_precision(settings.precision, device)
    model = StableDiffusion.load(base, device=device, dtype=frozen, **load_options)
    if model.family == "sdxl":
        raise UserError(f"{base} is an SDXL model; fine-tuning trains SD 1.x/2.x models for now")
    usable = model.text_encoder.config.layers - model.text_encoder.config.skip_layers
    if settings.clip_skip > usable:
        raise UserError(f"--clip-skip {settings.clip_skip}: this text encoder has {usable} layers to choose from")
    if settings.method == "textual-inversion":
        _check_token(model.tokenizer, examples, token)
    work.mkdir(parents=True, exist_ok=True)
    prior = []
    if settings.class_prompt:  # made by the main process; the others wait for them
        if main:
            prior = class_images(model, settings, work / "class-images", progress)
        acc.wait_for_everyone()
        prior = prior or class_images(model, settings, work / "class-images", False)
    modules, network = _trained(model, settings)
    embedding = modules.get("embedding")
    lr = settings.lr or DEFAULT_LR[settings.method]
    run = Run(settings.method, modules, steps, lr, work / f"{settings.method}.pt", settings.warmup,
              every=settings.checkpoint_every, module_lr={"text_encoder": settings.text_lr}, schedule=settings.schedule,
              accumulate=settings.grad_accum, optimizer=settings.optimizer, accelerator=acc,
              ema_decay=0.999 if settings.ema and settings.method == "dreambooth" else None,
              after_step=_sampler(model, settings, work / "samples", embedding, token))
    ids = caption_ids(model.tokenizer)
    placeholder = {tuple(model.tokenizer.tokens(token)): torch.zeros(settings.vectors, 1)}
    skip = model.text_encoder.config.skip_layers + settings.clip_skip - 1
    size_b = settings.batch_size

    def batch_loss(batch, size, rng, gens, instance: bool = True):
        """The loss of this process's share of the step's pictures `batch` (all of them loaded, so that the crops
        and flips drawn from rng are the same in every process)."""
        w, h = size
        pictures = [load(e, size, settings.center_crop, settings.flip, rng) for e in batch]
        mine = slice(rank * size_b, (rank + 1) * size_b)
        batch, gens = batch[mine], gens[mine]
        pixels = to_pixels(pictures[mine], device)
        f = model.vae_scale
        with torch.autocast(device.type, enabled=False):  # (the pictures' latents as the model makes them)
            latents = encode_image(model, pixels, lambda: rows(gens, len(batch), lambda g, k: torch.randn(
                (k, 4, h // f, w // f), generator=g, device=g.device)))
        vectors = None
        if embedding is not None and instance:  # the token's vectors where the captions name it
            chunked = [prompts.chunks(model.tokenizer, e.caption, placeholder)[0] for e in batch]
            tokens = torch.tensor([c[0] for c in chunked], device=device)
            vectors = embedding.tokens(model, tokens, [c[2] for c in chunked])
        else:
            tokens = torch.tensor([ids(e.caption) for e in batch], device=device)
        return diffusion_loss(model.unet, model.text_encoder, latents, tokens, model.schedule, gens,
                              settings.noise_offset, settings.min_snr_gamma, skip, vectors)

    def loss(step):
        rng = random.Random(_step_seed(settings.seed, step))
        size, batch = buckets.batch(rng, size_b * world)
        total = batch_loss(batch, size, rng, _generators(settings.seed, step, 0, len(batch), device))
        if prior:  # as many class pictures, cropped to the same bucket
            total = total + settings.prior_loss_weight * batch_loss(
                [prior[rng.randrange(len(prior))] for _ in batch], size, rng,
                _generators(settings.seed, step, len(batch), len(batch), device), instance=False)
        return total

    try:
        with _checkpointed(model, settings):
            emas = run.train(loss, progress)
    finally:
        if network is not None:
            network.detach()
    if main:
        if network is not None:
            tensors = network.kohya_state_dict() if settings.lora_format == "kohya" else network.peft_state_dict(model)
            _write_file(out, tensors, metadata(settings, base, model, examples, buckets, steps, out, started))
        elif embedding is not None:
            vectors = _vectors(embedding)
            _write_file(out, {"emb_params": vectors} if settings.embedding_format == "a1111" else {token: vectors},
                        {"token": token, "init_word": settings.init_word, "steps": str(steps)})
        else:
            _write_checkpoint(base, model, emas, settings, out, load_options)
    acc.wait_for_everyone()
    return {"losses": run.losses, "step_seconds": run.seconds, "steps": steps, "seconds": time.time() - started,
            "class_images": len(prior), "parameters": sum(p.numel() for m in modules.values() for p in m.parameters()), "main": main}


def _write_file(out: Path, tensors: dict, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    write_atomic(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
