"""Load time and peak memory: stablediff vs diffusers' from_single_file, side by side on the same files.

Makes a full-size SD 1.5-shaped random-weight checkpoint in the original layout (fp32 .safetensors and
.ckpt, about 4.3 GB each), then for each file and each implementation runs a fresh Python process that
imports, loads the whole pipeline in fp32 on the CPU and stops when it is ready to sample. Time is the
process's wall time from start to ready; memory is its peak RSS. The file is read once beforehand so
both sides find it in the page cache. Appends a table to BENCHMARKS.md.

    python bench/load.py [--workdir /tmp/sd-bench] [--runs 2]

Needs the test extra (diffusers, transformers) and about 10 GB of disk and 12 GB of memory.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from report import append, machine

# After loading, each child prints when it was ready, then reads every weight once (as the first sampling
# step does: memory-mapped weights count toward RSS only once read) and prints its peak RSS (VmHWM).
REPORT = """
import time
ready = time.time()
with torch.no_grad():
    for part in parts:
        for p in part.parameters():
            p.sum()
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(ready, hwm)
"""
OURS = """
import sys, torch
from stablediff import StableDiffusion
m = StableDiffusion.load(sys.argv[1], device="cpu", dtype="fp32")
assert (m.family, m.variant, m.schedule.prediction) == ("sd1", "base", "epsilon"), "not recognised as SD 1.x"
parts = (m.unet, m.vae, m.text_encoder)
""" + REPORT
DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline
p = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[2], local_files_only=True,
                                             torch_dtype=torch.float32, safety_checker=None)
parts = (p.unet, p.vae, p.text_encoder)
""" + REPORT


def make_files(workdir: Path) -> tuple[Path, Path, Path, int]:
    """The random checkpoint as .safetensors and .ckpt, and a folder with the configs diffusers needs offline."""
    import torch
    from safetensors.torch import save_file

    from stablediff.checkpoints.convert import diffusers_configs, to_original
    from stablediff.checkpoints.spec import ModelSpec
    from stablediff.checkpoints.original import train_schedule
    from stablediff.models.clip_text import SD1_CLIP, ClipTextModel
    from stablediff.models.tokenizer import default_tables
    from stablediff.models.unet import SD1_UNET, UNet
    from stablediff.models.vae import SD_VAE, AutoencoderKL

    st, ck, cfg = workdir / "sd15-random.safetensors", workdir / "sd15-random.ckpt", workdir / "sd15-configs"
    spec = ModelSpec(unet=SD1_UNET, vae=SD_VAE, clip=SD1_CLIP, schedule=train_schedule())
    g = torch.Generator().manual_seed(0)
    parts = {}
    for name, cls, c in (("unet", UNet, SD1_UNET), ("vae", AutoencoderKL, SD_VAE), ("text_encoder", ClipTextModel, SD1_CLIP)):
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in cls(c).state_dict().items()}
        parts[name] = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    sd = to_original(spec, parts)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    if not st.exists():
        save_file(sd, str(st))
    if not ck.exists():
        torch.save({"state_dict": sd}, ck)
    for name, config in diffusers_configs(spec).items():
        (cfg / name).parent.mkdir(parents=True, exist_ok=True)
        (cfg / name).write_text(json.dumps(config))
    (cfg / "tokenizer").mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (cfg / "tokenizer" / name).write_bytes((default_tables() / name).read_bytes())
    (cfg / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return st, ck, cfg, nbytes


def measure(code: str, *args: str) -> tuple[float, float]:
    """(seconds from process start to ready, peak RSS in GiB) of one fresh interpreter. The child reports
    its own high-water mark (VmHWM): a child's ru_maxrss would include this process's peak from before exec."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr[-2000:]}")
    ready, hwm = proc.stdout.split()[-2:]
    return float(ready) - start, int(hwm) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/sd-bench")
    parser.add_argument("--runs", type=int, default=2, help="runs of each; the best is reported")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    st, ck, cfg, nbytes = make_files(workdir)
    weights_gib = nbytes / 2**30
    rows = []
    for path in (st, ck):
        with open(path, "rb") as f:  # warm the page cache for both sides alike
            while f.read(1 << 26):
                pass
        ours = min(measure(OURS, str(path)) for _ in range(args.runs))
        theirs = min(measure(DIFFUSERS, str(path), str(cfg)) for _ in range(args.runs))
        rows.append((path.suffix, ours, theirs))
        print(path.suffix, "ours", ours, "diffusers", theirs, flush=True)
    write_report(rows, weights_gib, " ".join(["python", *sys.argv]))


def write_report(rows, weights_gib: float, command: str) -> None:
    import diffusers

    lines = [f"Machine: {machine()}, diffusers {diffusers.__version__}.",
             f"Command: `{command}`. A full-size SD 1.5-shaped random checkpoint in the original layout, fp32, "
             f"{weights_gib:.2f} GiB of weights; each run a fresh process from start to ready-to-sample, fp32 on the CPU, "
             "file in the page cache; best of the runs. Peak RSS is taken after every weight has been read once, as the first "
             "sampling step reads them (both sides keep memory-mapped weights that count only once read).\n",
             "| file | stablediff time | diffusers time | time ratio | stablediff peak RSS | diffusers peak RSS | stablediff RSS / weights |",
             "|---|---|---|---|---|---|---|"]
    for suffix, (t1, m1), (t2, m2) in rows:
        lines.append(f"| {suffix} | {t1:.1f} s | {t2:.1f} s | {t1 / t2:.2f}x | {m1:.2f} GiB | {m2:.2f} GiB | {m1 / weights_gib:.2f}x |")
    append("Load time and memory: stablediff vs diffusers `from_single_file`", lines)


if __name__ == "__main__":
    main()
