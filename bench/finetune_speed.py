"""LoRA training on the full-size SD 1.5-shaped random model: our `stablediff finetune --method lora` step against a
reference step written with diffusers and peft as diffusers' train_dreambooth_lora.py writes it (frozen UNet, VAE and
text encoder cast to the mixed-precision dtype, the LoRA's weights kept in fp32, accelerate's autocast and backward,
AdamW, gradient clipping), at 256x256 and 512x512, batch 1, bf16 where the CPU has it, gradient checkpointing on both.
The same layers get rank-4 factors on both sides: the attention's q, k, v and out and the transformers' proj_in and
proj_out. Each side runs as its own process, one after the other, for its peak memory (RSS). Puts the table at the
top of BENCHMARKS.md.

    python bench/finetune_speed.py [--workdir /tmp/sd-bench] [--steps 3] [--sizes 256 512] [--precision bf16]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import make_files  # noqa: E402
from report import machine, prepend, run_process  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]


def pictures(folder: Path, size: int) -> Path:
    """Five random-noise pictures with one caption, as DreamBooth's instance pictures."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def ours(model: Path, size: int, steps: int, precision: str, work: Path) -> list[float]:
    import torch

    from stablediff.train.finetune import finetune
    from stablediff.train.settings import FinetuneSettings

    settings = FinetuneSettings(instance_prompt="a photo of sks dog", resolution=size, steps=steps + 1, rank=4,
                                alpha=4.0, feed_forward=False, gradient_checkpointing=True, precision=precision,
                                checkpoint_every=10 ** 6, seed=0)
    out = work / f"ours-{size}-{time.time_ns()}.safetensors"
    summary = finetune(model, pictures(work / f"pics-{size}", size), out, out.with_suffix(".work"), settings,
                       torch.device("cpu"), progress=False)
    return summary["step_seconds"][1:]


def reference(model: Path, configs: Path, size: int, steps: int, precision: str, work: Path) -> list[float]:
    """train_dreambooth_lora.py's training step, on diffusers' models loaded from the same file."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image

    accelerator = Accelerator(cpu=True, mixed_precision={"fp32": "no"}.get(precision, precision))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    pipe = StableDiffusionPipeline.from_single_file(str(model), config=str(configs), safety_checker=None,
                                                    requires_safety_checker=False)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.to(dtype=dtype)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    cast_training_params(unet, dtype=torch.float32)
    unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unet.train()
    folder = pictures(work / f"pics-{size}", size)
    images = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1
              for p in sorted(folder.glob("*.png"))]
    ids = tokenizer("a photo of sks dog", padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    times = []
    for step in range(steps + 1):
        began = time.perf_counter()
        pixels = torch.from_numpy(images[step % len(images)]).permute(2, 0, 1)[None]
        latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,)).long()
        noisy = noise_scheduler.add_noise(latents, noise, t)
        states = text_encoder(ids, return_dict=False)[0]
        pred = unet(noisy, t, states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/sd-bench")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and size (after one warm-up step)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--side", choices=("ours", "reference"), help=argparse.SUPPRESS)  # one side, as a child
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, _, configs, _ = make_files(work)
    if args.side:
        run = ours(model, args.size, args.steps, args.precision, work) if args.side == "ours" else \
            reference(model, configs, args.size, args.steps, args.precision, work)
        print(json.dumps(run))
        return
    rows = []
    for size in args.sizes:
        measured = {}
        for side in ("ours", "reference"):
            cmd = [sys.executable, __file__, "--side", side, "--size", str(size), "--steps", str(args.steps),
                   "--precision", args.precision, "--workdir", str(work)]
            wall, peak, out = run_process(cmd)
            measured[side] = (statistics.median(json.loads(out.strip().splitlines()[-1])), peak, wall)
            print(side, size, measured[side], flush=True)
        (o, o_mem, o_wall), (r, r_mem, r_wall) = measured["ours"], measured["reference"]
        rows.append(f"| {size}x{size} | {o:.2f} s | {r:.2f} s | {o / r:.2f}x | {o_mem:.1f} GiB | {r_mem:.1f} GiB | "
                    f"{o_wall:.0f} s / {r_wall:.0f} s |")
    command = "python bench/finetune_speed.py " + " ".join(sys.argv[1:])
    prepend("LoRA training step: ours against diffusers + peft (train_dreambooth_lora.py's step)", [
        f"Machine: {machine()}.",
        f"Command: `{command.strip()}`. The SD 1.5-shaped random-weight file (bench/load.py), batch 1, {args.precision} "
        "mixed precision (frozen weights in it, the LoRA's in fp32), gradient checkpointing, rank 4 on the attention's "
        "q/k/v/out and proj_in/proj_out on both sides, AdamW, clipping at 1. A step is the whole of it: the picture's "
        "VAE encoding, the text encoder, the UNet forward and backward, the optimizer. Median of "
        f"{args.steps} steps after a warm-up step; peak RSS of each side's own process (its model loaded from the file, "
        "the training, nothing else).", "",
        "| size | ours per step | reference per step | ratio | our peak RSS | reference peak RSS | process wall (ours / ref) |",
        "|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
