"""GPU speed and CUDA parity, stablediff vs diffusers, like for like: one full-size SD 1.5-shaped random-weight
file, 512x512, batch 1, 50 steps of Euler (diffusers' EulerDiscreteScheduler, leading spacing as ours), guidance 7.5,
the same CPU-seeded noise, fp16 by default.

For each side: the whole call's time (text encoding, sampling, VAE decode), the sampling loop's steps per second
(from a 50-step and a 1-step call: 49 steps / the difference), and the peak GPU memory; then the two images'
largest difference in 8-bit levels, the CUDA parity check (random weights give noise-like images: that only
makes every pixel count). Appends a table to BENCHMARKS.md.

    python bench/gpu.py [--workdir /tmp/sd-bench] [--precision fp16|bf16|fp32] [--steps 50] [--size 512]

Needs the test extra, a CUDA GPU (--device cpu runs it anyway, slowly: a smoke test of the script), and about
10 GB of disk for the file (made once by load.make_files).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from load import make_files
from report import append, machine

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT, NEGATIVE, SEED = "a photo of a cat", "blurry", 1


def timed(fn, device: str):
    """(seconds, fn's result), the GPU's queued work included."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def measure(render, steps: int, device: str) -> tuple[float, float, float, np.ndarray]:
    """(seconds of the whole call, sampling steps per second, peak GPU memory in GiB, the image)."""
    render(1)  # warm-up: kernels chosen, caches filled
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    whole, image = timed(lambda: render(steps), device)
    one, _ = timed(lambda: render(1), device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return whole, (steps - 1) / max(whole - one, 1e-9), peak, image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/sd-bench")
    parser.add_argument("--precision", default="fp16", choices=DTYPES)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run it where there is one (or pass --device cpu for a slow smoke run)")
    dtype = DTYPES[args.precision]
    path, _, configs, _ = make_files(Path(args.workdir))

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from stablediff import StableDiffusion

    ours = StableDiffusion.load(path, device=args.device, dtype=args.precision)
    results = {"stablediff": measure(lambda n: np.asarray(ours.txt2img(
        PROMPT, NEGATIVE, steps=n, sampler="euler", schedule="default", scale=7.5, seed=SEED, width=args.size,
        height=args.size)[0]), args.steps, args.device)}
    ours = None  # its memory back before diffusers loads
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                      torch_dtype=dtype, safety_checker=None).to(args.device)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config, timestep_spacing="leading")
    theirs.set_progress_bar_config(disable=True)
    results["diffusers"] = measure(lambda n: np.asarray(theirs(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n, guidance_scale=7.5, height=args.size,
        width=args.size, generator=torch.Generator().manual_seed(SEED)).images[0]), args.steps, args.device)
    diff = np.abs(results["stablediff"][3].astype(int) - results["diffusers"][3].astype(int))
    (a, a_rate, a_mem, _), (b, b_rate, b_mem, _) = results["stablediff"], results["diffusers"]
    rows = [f"| whole call ({args.steps} steps, decode included) | {a:.2f} s | {b:.2f} s | {a / b:.2f}x |",
            f"| sampling steps per second | {a_rate:.2f} | {b_rate:.2f} | {b_rate / a_rate:.2f}x |",
            f"| peak GPU memory | {a_mem:.2f} GiB | {b_mem:.2f} GiB | {a_mem / b_mem:.2f}x |"]
    print("\n".join(rows), f"\nlargest pixel difference {diff.max()}/255, mean {diff.mean():.3f}", flush=True)
    append(f"GPU speed, {args.precision}: stablediff vs diffusers", [
        f"Machine: {machine()}.",
        f"Command: `python bench/gpu.py {' '.join(sys.argv[1:])}`. Full-size SD 1.5-shaped random weights from one "
        f".safetensors file; {args.size}x{args.size}, batch 1, Euler, guidance 7.5, seed {SEED}, after a warm-up "
        "call. Ratios are stablediff over diffusers (for steps per second, diffusers' time per step over ours). The "
        f"two images differ by at most {diff.max()}/255 (mean {diff.mean():.3f}).\n",
        "| what | stablediff | diffusers | ratio |", "|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
