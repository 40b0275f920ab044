"""`stablediff train`: a latent diffusion model of SD's architecture, trained from scratch step by step.

1. The VAE: reconstruction (L1 + L2) and a small KL, on random crops, then whole pictures.
2. The dataset encoded once to posterior means and deviations; the latent scale measured (1 / std).
3. The text encoder alone, learning to read captions: linear heads name what each caption says (the
   scene's attributes) from the text encoder's states.
4. The text encoder (at a tenth of the UNet's rate) and the UNet together: noise prediction on the discrete
   schedule, 10% of captions dropped (empty prompt) for classifier-free guidance.
Each stage keeps EMA weights and checkpoints into the work folder, so an interrupted run resumes where it
stopped. The result is one .safetensors in the original CompVis layout carrying its YAML config, read by
the same loader as any checkpoint. The data source is the procedural shapes of stablediff.demo; the stages
take any dataset with image(i), caption(i, rng), and for stage 3 vocabulary ({attribute: values}) and labels(i).
"""
import json
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from stablediff import prompts
from stablediff.checkpoints.convert import convert
from stablediff.checkpoints.original import (clip_from_yaml, config_text, parse_yaml, schedule_from_yaml,
                                             unet_from_yaml, vae_from_yaml)
from stablediff.checkpoints.spec import ModelSpec
from stablediff.errors import UserError
from stablediff.files import write_atomic
from stablediff.models.clip_text import ClipTextConfig, ClipTextModel
from stablediff.models.tokenizer import ClipTokenizer
from stablediff.models.unet import UNet
from stablediff.models.vae import AutoencoderKL
from stablediff.pipelines.common import to_pixels
from stablediff.train.loop import Run, autocast, resolve_precision
from stablediff.train.objectives import caption_loss, diffusion_loss, init_fresh, vae_loss
from stablediff.train.settings import Settings


def dataset(settings: Settings):
    if settings.data != "shapes":
        raise UserError(f"--data {settings.data}: the only dataset so far is 'shapes' (the demo's drawn scenes)")
    from stablediff.demo.shapes import ShapesDataset

    return ShapesDataset(settings.images, settings.seed)


def _step_seed(seed: int, step: int) -> int:
    """Each step's data and noise come from its own seed, so a resumed run repeats them exactly."""
    return seed * 1_000_003 + step


def _generator(seed: int, step: int, device) -> torch.Generator:
    return torch.Generator(device).manual_seed(_step_seed(seed, step))


def detailed_crops(x: torch.Tensor, size: int, rng: random.Random, candidates: int = 4) -> torch.Tensor:
    """One size x size crop per picture (on the 8-pixel grid), the most varied of a few random candidates:
    flat background teaches the VAE little, edges and corners teach it most."""
    out = []
    for picture in x:
        crops = [picture[:, i:i + size, j:j + size] for i, j in
                 ((rng.randrange(0, x.shape[-2] - size + 1, 8), rng.randrange(0, x.shape[-1] - size + 1, 8))
                  for _ in range(candidates))]
        out.append(max(crops, key=lambda c: c.std().item()))
    return torch.stack(out)


def latent_scale(mean: torch.Tensor, std: torch.Tensor) -> float:
    """1 / the std of latents sampled (with a fixed seed) from the dataset's posteriors: SD's scale_factor."""
    return 1.0 / (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))).std().item()


def train_vae(vae, data, settings: Settings, work: Path, device, progress: bool) -> Run:
    run = Run("vae", {"vae": vae}, settings.vae_steps, settings.vae_lr, work / "vae.pt", settings.warmup)
    crop_until = int(settings.vae_steps * 0.8)

    def loss(step):
        rng = random.Random(_step_seed(settings.seed, step))
        x = to_pixels([data.image(rng.randrange(len(data))) for _ in range(settings.vae_batch)], device)
        if step < crop_until and settings.vae_crop < x.shape[-1]:
            x = detailed_crops(x, settings.vae_crop, rng)
        with autocast(device, settings.precision):
            return vae_loss(vae, x, _generator(settings.seed, step, device))

    ema = run.train(loss, progress)["vae"]
    vae.load_state_dict(ema.weights(vae))
    return run


@torch.no_grad()
def encode_dataset(vae, data, settings: Settings, work: Path, device, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of every picture, cached in the work folder. Small batches keep a 64x64 layer's
    activations in the CPU's caches: 60,000 pictures in 5.0 min at 16 against 7.7 at 250, and the same
    latents bit for bit (BENCHMARKS.md)."""
    cache = work / "latents.pt"
    key = f"{settings.data}-{settings.images}-{settings.seed}-{settings.vae_steps}"
    if cache.is_file():
        saved = torch.load(str(cache), weights_only=True)
        if saved["key"] == key:
            return saved["mean"], saved["std"]
    means, stds = [], []
    for start in range(0, len(data), batch):
        x = to_pixels([data.image(i) for i in range(start, min(start + batch, len(data)))], device)
        mean, logvar = vae.encode(x)
        means.append(mean.float().cpu()), stds.append((0.5 * logvar.float()).exp().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"key": key, "mean": mean, "std": std}, str(cache))
    return mean, std


def caption_ids(tokenizer):
    """text -> its token ids (one chunk of the tokenizer's length), each caption tokenized once."""
    cache = {}

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = prompts.chunks(tokenizer, text)[0][0]
        return cache[text]

    return ids


def train_text(text_encoder, tokenizer, data, settings: Settings, work: Path, device, progress: bool) -> Run:
    """The text encoder alone, taught to read captions: linear heads (thrown away after) name each attribute
    of the scene from its states. Stands in for the CLIP pretraining of SD's text encoder: trained from scratch
    by the diffusion loss alone, a text encoder learned the background's colour but, in every budget tried,
    nothing of the shape's colour or position (bench/demo_probe.py, BENCHMARKS.md)."""
    width = text_encoder.config.width
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in data.vocabulary.items()}).to(device)
    run = Run("text", {"text_encoder": text_encoder, "heads": heads}, settings.text_steps, settings.text_lr,
              work / "text.pt", settings.warmup)
    ids = caption_ids(tokenizer)

    def loss(step):
        rng = random.Random(_step_seed(settings.seed, step))
        index = [rng.randrange(len(data)) for _ in range(settings.text_batch)]
        tokens = torch.tensor([ids(data.caption(i, rng)) for i in index], device=device)
        labels = [data.labels(i) for i in index]
        labels = {k: torch.tensor([y[k] for y in labels], device=device) for k in heads}
        with autocast(device, settings.precision):
            return caption_loss(text_encoder, heads, tokens, tokenizer.eos, labels)

    ema = run.train(loss, progress)["text_encoder"]
    text_encoder.load_state_dict(ema.weights(text_encoder))
    return run


def train_diffusion(text_encoder, unet, tokenizer, data, latents, scale: float, schedule, settings: Settings,
                    work: Path, device, progress: bool) -> Run:
    mean, std = latents
    run = Run("unet+text", {"text_encoder": text_encoder, "unet": unet}, settings.steps, settings.lr,
              work / "diffusion.pt", settings.warmup, module_lr={"text_encoder": settings.joint_text_lr})
    ids = caption_ids(tokenizer)

    def loss(step):
        rng = random.Random(_step_seed(settings.seed, step))
        g = _generator(settings.seed, step, "cpu")
        index = torch.tensor([rng.randrange(len(data)) for _ in range(settings.batch)])
        z = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=g)) * scale
        captions = ["" if rng.random() < settings.drop_caption else data.caption(i, rng) for i in index.tolist()]
        tokens = torch.tensor([ids(c) for c in captions], device=device)
        with autocast(device, settings.precision):
            return diffusion_loss(unet, text_encoder, z.to(device), tokens, schedule,
                                  _generator(settings.seed, step, device))

    emas = run.train(loss, progress)
    for name, m in (("text_encoder", text_encoder), ("unet", unet)):
        m.load_state_dict(emas[name].weights(m))
    return run


def concrete(settings: Settings, device: torch.device) -> Settings:
    """The settings with --precision auto made bf16 or fp32 as this device resolves it, so that the command a
    model file records reproduces it on any machine (auto trains in bf16 on some CPUs, in fp32 on others)."""
    return replace(settings, precision=resolve_precision(settings.precision, device))


def record(work: Path, settings: Settings) -> list[str]:
    """The commands that have trained in this work folder, this one last: a run resumed with other settings
    (more --steps, say) is reproduced by running the same commands in order."""
    path = work / "history.json"
    history = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if not history or history[-1] != settings.command():
        history.append(settings.command())
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(history, indent=1), encoding="utf-8"))
    return history


def train(settings: Settings, out: Path, work: Path, device: torch.device, progress: bool = True) -> dict:
    """Both stages, then the model file; returns a summary (losses, latent scale, seconds per stage)."""
    settings = concrete(settings, device)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new name")
    work.mkdir(parents=True, exist_ok=True)
    text = config_text(settings.config)
    params = parse_yaml(text, settings.config)
    schedule = schedule_from_yaml(params)
    unet_cfg, vae_cfg = unet_from_yaml(params["unet_config"]["params"]), vae_from_yaml(params)
    clip_cfg = clip_from_yaml(params, ClipTextConfig())
    torch.manual_seed(settings.seed)
    vae = init_fresh(AutoencoderKL(vae_cfg)).to(device)
    text_encoder = init_fresh(ClipTextModel(clip_cfg)).to(device)
    unet = init_fresh(UNet(unet_cfg)).to(device, memory_format=torch.channels_last)
    data = dataset(settings)
    times = {}
    history = record(work, settings)

    t = time.perf_counter()
    vae_run = train_vae(vae, data, settings, work, device, progress)
    times["vae"] = time.perf_counter() - t
    t = time.perf_counter()
    latents = encode_dataset(vae, data, settings, work, device)
    scale = latent_scale(*latents)
    times["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    tokenizer = ClipTokenizer(max_len=clip_cfg.max_len)
    text_run = train_text(text_encoder, tokenizer, data, settings, work, device, progress)
    times["text"] = time.perf_counter() - t
    t = time.perf_counter()
    diffusion_run = train_diffusion(text_encoder, unet, tokenizer, data, latents, scale, schedule, settings, work,
                                    device, progress)
    times["diffusion"] = time.perf_counter() - t

    text = re.sub(r"scale_factor: [-+.\deE]+", f"scale_factor: {scale:.6f}", text, count=1)
    text = "".join(f"# {'trained by' if i == 0 else 'then resumed as'}: {c}\n" for i, c in enumerate(history)) + text
    spec = ModelSpec(unet=unet_cfg, vae=vae_cfg, clip=clip_cfg, schedule=schedule, config_text=text,
                     weights={"text_encoder": (text_encoder.state_dict(), []), "unet": (unet.state_dict(), []),
                              "vae": (vae.state_dict(), [])})
    convert(spec, out, "safetensors", settings.dtype)
    return {"vae_loss": vae_run.losses, "text_loss": text_run.losses, "diffusion_loss": diffusion_run.losses,
            "scale_factor": scale, "seconds": times,
            "bf16": settings.precision == "bf16"}
