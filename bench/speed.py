"""CPU (or GPU) speed, stablediff vs diffusers, side by side in one process on the same full-size SD 1.5-shaped
random-weight file: import time, text encoding, a guided UNet step at 256 and 512, a VAE decode at 512, and
optionally the whole `stablediff txt2img` process against the same in diffusers. Also the machine's measured
matmul peak, and each step's distance from the arithmetic limit (its FLOPs at that peak).

    python bench/speed.py [--workdir /tmp/sd-bench] [--precision fp32|bf16] [--reps 3] [--e2e] [--compile]

--compile also times both sides' UNets under torch.compile: the first call at each size (compiling, then one
step) and the steps after it.

Appends a table to BENCHMARKS.md. Needs the test extra and about 10 GB of disk and 16 GB of memory.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from load import make_files
from report import append, give_back_memory, machine, run_process

from stablediff.devices import keep_freed_memory
from stablediff.nn.layers import onednn_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")


def best(fn, reps: int) -> float:
    """The median wall time of `reps` calls after one warm-up call."""
    fn()
    return statistics.median(once(fn) for _ in range(reps))


def paired(a, b, reps: int) -> tuple[float, float]:
    """The median wall times of a and b timed in turn (a, b, a, b, ...) after a warm-up call of each, so that
    a drift in the machine's speed falls on both sides alike."""
    a(), b()
    times = [(once(a), once(b)) for _ in range(reps)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def as_processes(ours, theirs):
    """ours and theirs, each run with the allocator as its own process has it: ours keeps freed memory for reuse
    (`devices.keep_freed_memory`, which loading our model sets), diffusers' glibc's own thresholds."""
    def ours_run():
        keep_freed_memory(CPU, True)
        return ours()

    def theirs_run():
        keep_freed_memory(CPU, False)
        return theirs()

    return ours_run, theirs_run


def once(fn) -> float:
    """The wall time of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak(dtype: torch.dtype, n: int = 4096) -> float:
    """FLOP/s of an n x n matrix product in dtype, the faster of BLAS's (torch.mm) and oneDNN's (what our linear
    layers and attention run; on AMD CPUs MKL's fp32 path is the slower): the machine's practical ceiling."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if onednn_linear():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    return max(2 * n**3 / best(p, 3) for p in products)


def import_time(code: str) -> float:
    return min(once(lambda: subprocess.run([sys.executable, "-c", code], check=True, capture_output=True))
               for _ in range(3))


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def load_both(path: Path, configs: Path, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    ours = StableDiffusion.load(path, device="cpu", dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(configs), local_files_only=True,
                                                      torch_dtype=dtype, safety_checker=None)
    return ours, theirs


def unet_steps(ours, theirs, size: int, dtype: torch.dtype):
    """Callables for one guided UNet step (batch 2: negative and prompt) on each side, on the same inputs."""
    from stablediff.diffusion.guidance import CFGDenoiser

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    sigma = torch.tensor(5.0)
    cond = {"context": context[1:].to(dtype), "uncond": context[:1].to(dtype)}
    denoiser = CFGDenoiser(ours.denoiser(), 7.5)
    t = ours.denoiser().sigma_to_t(sigma.reshape(1))

    def ours_step():
        with torch.no_grad():
            return denoiser(x, sigma, cond)

    def theirs_step():
        with torch.no_grad():
            latent = torch.cat([x, x]).to(dtype) / (sigma**2 + 1) ** 0.5
            u, c = theirs.unet(latent, t, encoder_hidden_states=context.to(dtype)).sample.chunk(2)
            return u + 7.5 * (c - u)
    return ours_step, theirs_step


def in_process(path: Path, configs: Path, dtype: torch.dtype, args) -> tuple[list, bool]:
    """Import, text encoding, UNet steps and the decode, both sides in this process; whether the allocator setting
    was on."""
    rows = [("import", import_time("import stablediff.api"),
             import_time("from diffusers import StableDiffusionPipeline"), None)]
    print(rows[-1], flush=True)
    ours, theirs = load_both(path, configs, dtype)
    reused = keep_freed_memory(CPU)  # what loading ours did already, asked again for the table
    from stablediff.pipelines.conditioning import encode_text

    with torch.no_grad():
        rows.append(("text encoding (prompt + negative)", *paired(*as_processes(
            lambda: encode_text(ours, ["a photo of a cat", ""])[0],
            lambda: theirs.encode_prompt("a photo of a cat", "cpu", 1, True, "")), args.reps), None))
    print(rows[-1], flush=True)
    step_flops = {}
    for size in (256, 512):
        ours_step, theirs_step = unet_steps(ours, theirs, size, dtype)
        step_flops[size] = flops(theirs_step)  # the direct convolutions' count: our Winograd ones do fewer
        rows.append((f"guided UNet step, {size}x{size}", *paired(*as_processes(ours_step, theirs_step), args.reps),
                     step_flops[size]))
        print(rows[-1], flush=True)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        decode_ours, decode_theirs = (lambda: ours.vae.decode(z)), (lambda: theirs.vae.decode(z).sample)
        rows.append(("VAE decode, 512x512", *paired(*as_processes(decode_ours, decode_theirs), args.reps),
                     flops(decode_theirs)))
    print(rows[-1], flush=True)
    if args.compile:
        rows += compiled_steps(ours, theirs, dtype, step_flops, args.reps)
    return rows, reused


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/sd-bench")
    parser.add_argument("--precision", default="fp32", choices=DTYPES)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--e2e", action="store_true", help="also time the whole txt2img process at 512, 20 steps")
    parser.add_argument("--compile", action="store_true", help="also time the UNet steps under torch.compile")
    args = parser.parse_args()
    dtype = DTYPES[args.precision]
    if args.compile:  # an empty kernel cache, so the first compiled calls show a cold compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sd-bench-inductor-")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, _, configs, _ = make_files(workdir)
    peak = matmul_peak(dtype)
    rows, reused = in_process(path, configs, dtype, args)
    if args.e2e:  # with both models gone and their memory given back, so the processes have the machine's memory
        give_back_memory()
        rows += end_to_end(path, configs, workdir, args.precision)
    lines = [f"Machine: {machine()}, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.0f} GFLOP/s in "
             f"{args.precision}.", f"Command: `python bench/speed.py {' '.join(sys.argv[1:])}`. Full-size SD 1.5-shaped random weights from "
             "one .safetensors file, loaded by each side; median of the runs after a warm-up; the limit is the step's "
             "FLOPs (counted on diffusers' side, with direct convolutions) at the matmul peak. "
             + ("Each side ran with the allocator as its own process has it, set before each call: ours keeps freed "
                "memory for reuse (`devices.keep_freed_memory`, set by loading our model), diffusers' has glibc's "
                "own thresholds; so do the txt2img processes." if reused
                else "Both sides ran with the allocator as it was."), "",
             "| what | stablediff | diffusers | ratio | arithmetic limit | stablediff / limit |", "|---|---|---|---|---|---|"]
    for what, a, b, n in rows:
        limit = f"{n / peak:.2f} s ({n / 1e12:.2f} TFLOP)" if n else "-"
        unit = "" if "GiB" in what else " s"
        lines.append(f"| {what} | {a:.2f}{unit} | {b:.2f}{unit} | {a / b:.2f}x | {limit} | "
                     f"{f'{a / (n / peak):.1f}x' if n else '-'} |")
    append(f"Speed, {args.precision}: stablediff vs diffusers on the CPU", lines)


def compiled_steps(ours, theirs, dtype: torch.dtype, step_flops: dict, reps: int):
    """Both UNets under torch.compile (one static graph per size): the first call, which compiles, then steps."""
    from stablediff.devices import compile_module

    compile_module(ours.unet, torch.device("cpu"))
    theirs.unet.compile(dynamic=False)
    rows = []
    for size in (256, 512):
        ours_step, theirs_step = unet_steps(ours, theirs, size, dtype)
        rows.append((f"first compiled call (compile + 1 step), {size}x{size}", once(ours_step), once(theirs_step), None))
        rows.append((f"guided UNet step, {size}x{size}, compiled", *paired(*as_processes(ours_step, theirs_step), reps),
                     step_flops[size]))
        print(rows[-2:], flush=True)
    return rows


def end_to_end(path: Path, configs: Path, workdir: Path, precision: str):
    """The whole process: import, load, 512x512, 20 steps of DPM++ 2M, decode, save a PNG."""
    ours = [sys.executable, "-m", "stablediff.cli", "txt2img", "a photo of a cat", "--model", str(path), "--H", "512",
            "--W", "512", "--steps", "20", "--sampler", "dpmpp_2m", "--seed", "1", "--precision", precision,
            "--outdir", str(workdir / "e2e"), "--skip_grid"]
    theirs = [sys.executable, "-c", f"""
import sys, torch
from diffusers import StableDiffusionPipeline, DPMSolverMultistepScheduler
p = StableDiffusionPipeline.from_single_file({str(path)!r}, config={str(configs)!r}, local_files_only=True,
    torch_dtype={'torch.float32' if precision == 'fp32' else 'torch.bfloat16'}, safety_checker=None)
p.scheduler = DPMSolverMultistepScheduler.from_config(p.scheduler.config)
p("a photo of a cat", height=512, width=512, num_inference_steps=20,
  generator=torch.Generator().manual_seed(1)).images[0].save({str(workdir / 'e2e-diffusers.png')!r})
"""]
    (t_ours, rss_ours, _), (t_theirs, rss_theirs, _) = run_process(ours), run_process(theirs)
    times, rss = (t_ours, t_theirs), (rss_ours, rss_theirs)
    print(times, rss, flush=True)
    return [("txt2img process: import, load, 512x512, 20 steps, save", times[0], times[1], None),
            ("peak RSS of that process (GiB)", rss[0], rss[1], None)]


if __name__ == "__main__":
    main()
