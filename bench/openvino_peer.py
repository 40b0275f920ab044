"""CPU speed against OpenVINO, side by side in one run on the same full-size SD 1.5-shaped random file: a guided
512x512 UNet step (batch 2: negative and prompt) and the whole image (8 steps of DPM++ 2M, CFG 7.5, batch 1: text
encoding, sampling and the VAE decode), for our bf16 against OpenVINO's default precision (bf16 on a CPU with
AVX512-BF16 or AMX) and our fp32 against OpenVINO's f32 hint. Also peak RSS, OpenVINO's export and compile time,
and where each side spends a step (torch's profiler by op; OpenVINO's performance counters by node type).

OpenVINO runs through optimum-intel's OVStableDiffusionPipeline, exported from a diffusers folder of the same
weights and reshaped static (512x512, batch 1), in a virtual environment of its own (its pins clash with ours:
optimum-intel wants transformers < 5.6):

    python3 -m venv /tmp/ov-venv
    /tmp/ov-venv/bin/pip install "optimum-intel[openvino]==2.2.0" "openvino==2026.4.1" "transformers<5.6" "diffusers==0.39.0"
    python bench/openvino_peer.py --ov-python /tmp/ov-venv/bin/python [--workdir /tmp/sd-bench] [--reps 3] [--pause 0]

Each side is its own process, both alive at once, each asked in turn (ours, OpenVINO, ours, ...) so that a drift in
the machine's speed falls on both alike; each times its own calls, after a warm-up call, on the same inputs.
Prepends a table to BENCHMARKS.md. Needs the test extra, about 10 GB of disk and 16 GB of memory.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from load import make_files
from report import machine, prepend

PROMPT, STEPS, SCALE, SIZE = "a photo of a cat", 8, 7.5, 512

# What both children share: the step's inputs (the same on both sides, from one seed), and a loop answering one
# JSON line per command read: step, image, profile, rss.
COMMON = """
import json, sys, time
import torch
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
context = torch.randn(2, 77, 768, generator=g)
sigma = torch.tensor(5.0)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def serve(handlers, ready):
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.split()
        out = handlers[command[0]](*command[1:])
        print(json.dumps(out), flush=True)


def rss():
    return {"rss_gib": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 2**20}
"""

OURS = """
from stablediff import StableDiffusion
from stablediff.diffusion.guidance import CFGDenoiser
path, precision = sys.argv[1], sys.argv[2]
load_s, model = timed(lambda: StableDiffusion.load(path, device="cpu", dtype=precision))
dtype = model.dtype
cond = {"context": context[1:].to(dtype), "uncond": context[:1].to(dtype)}
denoiser = CFGDenoiser(model.denoiser(), SCALE)


def step(save=None):
    with torch.no_grad():
        seconds, y = timed(lambda: denoiser(x, sigma, cond))
    if save:
        torch.save(y.float(), save)
    return {"s": seconds}


def image():
    return {"s": timed(lambda: model.txt2img(PROMPT, steps=STEPS, sampler="dpmpp_2m", scale=SCALE, seed=1,
                                             width=SIZE, height=SIZE))[0]}


def profile():
    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        denoiser(x, sigma, cond)
    rows = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return {"by": "op (self time)", "rows": sorted(rows, key=lambda r: -r[1])}


t = float(model.denoiser().sigma_to_t(sigma.reshape(1)))
serve({"step": step, "image": image, "profile": profile, "rss": rss}, {"load_s": load_s, "precision": str(dtype), "t": t})
"""

OPENVINO = """
import openvino as ov
from diffusers import DPMSolverMultistepScheduler
from optimum.intel import OVStableDiffusionPipeline
ir, hint = sys.argv[1], sys.argv[2]
config = {} if hint == "default" else {"INFERENCE_PRECISION_HINT": hint}
pipe = OVStableDiffusionPipeline.from_pretrained(ir, compile=False, ov_config=config)
pipe.reshape(batch_size=1, height=SIZE, width=SIZE, num_images_per_prompt=1)
compile_s, _ = timed(pipe.compile)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
alpha = (sigma**2 + 1) ** 0.5
t = torch.tensor([float(sys.argv[3])])  # the timestep our denoiser gives sigma (the same schedule)
inputs = {"sample": (torch.cat([x, x]) / alpha).numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.numpy()}
request = pipe.unet.request


def step(save=None):
    def run():
        u, c = torch.from_numpy(request(inputs)[0].copy()).chunk(2)
        return (x - sigma * (u + SCALE * (c - u)))  # x0, as our denoiser gives it
    seconds, y = timed(run)
    if save:
        torch.save(y, save)
    return {"s": seconds}


def image():
    return {"s": timed(lambda: pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                                    generator=torch.Generator().manual_seed(1)))[0]}


def profile():
    compiled = ov.Core().compile_model(pipe.unet.model, "CPU", {**config, "PERF_COUNT": "YES"})
    req = compiled.create_infer_request()
    req.infer(inputs)
    req.infer(inputs)
    rows = {}
    for node in req.profiling_info:
        if node.status == node.Status.EXECUTED:
            key = node.node_type
            rows[key] = rows.get(key, 0.0) + node.real_time.total_seconds() * 1e3
    return {"by": "node type", "rows": sorted(rows.items(), key=lambda r: -r[1])}


precision = request.get_property("INFERENCE_PRECISION_HINT").get_type_name()
serve({"step": step, "image": image, "profile": profile, "rss": rss}, {"compile_s": compile_s, "precision": precision})
"""

EXPORT = """
import sys, time
from optimum.intel import OVStableDiffusionPipeline
start = time.perf_counter()
pipe = OVStableDiffusionPipeline.from_pretrained(sys.argv[1], export=True, compile=False)
pipe.save_pretrained(sys.argv[2])
types = {}
for op in pipe.unet.model.get_ops():
    if op.get_type_name() == "Constant":
        t = op.get_element_type().get_type_name()
        types[t] = types.get(t, 0) + op.get_byte_size()
print(time.perf_counter() - start, " ".join(f"{k}:{v / 2**20:.0f}MiB" for k, v in sorted(types.items())))
"""


class Child:
    """A side's process, answering one JSON line per command."""

    def __init__(self, python: str, code: str, *argv: str):
        self.proc = subprocess.Popen([python, "-c", f"SIZE, SCALE, STEPS, PROMPT = {SIZE}, {SCALE}, {STEPS}, "
                                      f"{PROMPT!r}\n" + COMMON + code, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a bench child ended early (status {self.proc.wait()})")
        return json.loads(line)

    def ask(self, *command) -> dict:
        self.proc.stdin.write(" ".join(map(str, command)) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def in_turn(a: Child, b: Child, command: str, reps: int, pause: float = 0.0) -> tuple[float, float]:
    """The median of each side's own timings of `command`, asked in turn after a warm-up call of each, `pause`
    seconds before each call (so that the other side's worker threads, which may spin a while after their call,
    are asleep by then)."""
    def ask(side: Child) -> float:
        time.sleep(pause)
        return side.ask(command)["s"]

    ask(a), ask(b)
    times = [(ask(a), ask(b)) for _ in range(reps)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def export(ov_python: str, path: Path, workdir: Path) -> tuple[Path, str]:
    """The diffusers folder of the file (our convert) exported to OpenVINO IR: its path and the export's line."""
    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import convert

    folder, ir = workdir / "sd15-random-diffusers", workdir / "sd15-random-openvino"
    if not folder.exists():
        convert(read_spec(path), folder)
    proc = subprocess.run([ov_python, "-c", EXPORT, str(folder), str(ir)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the OpenVINO export failed:\n{proc.stderr[-3000:]}")
    return ir, proc.stdout.strip().splitlines()[-1]


def profile_lines(name: str, found: dict, top: int = 10) -> list[str]:
    total = sum(ms for _, ms in found["rows"])
    rows = [f"{key} {ms:.0f} ms ({ms / total:.0%})" for key, ms in found["rows"][:top]]
    return [f"- {name}, one step by {found['by']}, {total:.0f} ms in all: " + "; ".join(rows) + "."]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ov-python", required=True, help="the Python of the virtual environment with optimum-intel")
    parser.add_argument("--workdir", default="/tmp/sd-bench")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per side after the warm-up")
    parser.add_argument("--image-reps", type=int, default=1, help="timed whole images per side after the warm-up")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds of idle before each timed call")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = make_files(workdir)[0]
    ir, exported = export(args.ov_python, path, workdir)
    export_s, weights = exported.split(" ", 1)
    print("export", exported, flush=True)
    table, notes, profiles = [], [], []
    for precision in args.precisions.split(","):
        hint = {"bf16": "default", "fp32": "f32"}[precision]
        ours = Child(sys.executable, OURS, str(path), precision)
        theirs = Child(args.ov_python, OPENVINO, str(ir), hint, str(ours.ready["t"]))
        outs = [workdir / f"step-{side}-{precision}.pt" for side in ("ours", "openvino")]
        ours.ask("step", outs[0]), theirs.ask("step", outs[1])
        step = in_turn(ours, theirs, "step", args.reps, args.pause)
        print(precision, "step", step, flush=True)
        image = in_turn(ours, theirs, "image", args.image_reps, args.pause)
        print(precision, "image", image, flush=True)
        profiles += [profile_lines(f"stablediff {precision}", ours.ask("profile")),
                     profile_lines(f"OpenVINO {theirs.ready['precision']}", theirs.ask("profile"))]
        rss = ours.ask("rss")["rss_gib"], theirs.ask("rss")["rss_gib"]
        ours.close(), theirs.close()
        a, b = (torch.load(p) for p in outs)
        diff = float((a - b).abs().max())
        label = f"{precision} / OpenVINO {theirs.ready['precision']}"
        table += [f"| guided UNet step, {SIZE}x{SIZE}, {label} | {step[0]:.2f} s | {step[1]:.2f} s | {step[0] / step[1]:.2f}x |",
                  f"| whole image ({STEPS} steps DPM++ 2M), {label} | {image[0]:.2f} s | {image[1]:.2f} s | "
                  f"{image[0] / image[1]:.2f}x |",
                  f"| peak RSS, {label} | {rss[0]:.2f} GiB | {rss[1]:.2f} GiB | {rss[0] / rss[1]:.2f}x |"]
        notes.append(f"{precision}: our load {ours.ready['load_s']:.1f} s; OpenVINO's compile (all parts, static "
                     f"shapes) {theirs.ready['compile_s']:.1f} s; the two steps' x0 differ by at most {diff:.3g} "
                     f"where they reach {float(a.abs().max()):.3g}.")
    lines = [f"Machine: {machine()}; OpenVINO through optimum-intel in {args.ov_python}.",
             f"Command: `python bench/openvino_peer.py {' '.join(sys.argv[1:])}`. Full-size SD 1.5-shaped random weights: "
             "ours from the .safetensors file, OpenVINO's exported from the diffusers folder our convert writes of "
             f"it (export {float(export_s):.0f} s; the UNet's IR weights {weights}), reshaped static {SIZE}x{SIZE}, "
             f"batch 1. Each side its own process, asked in turn; medians of {args.reps} steps and "
             f"{args.image_reps} image(s) after a warm-up. Whole image: prompt {PROMPT!r}, {STEPS} steps of DPM++ 2M, "
             f"CFG {SCALE}.", "", "| what | stablediff | OpenVINO | ratio |", "|---|---|---|---|", *table, "",
             *notes, "", "Where a step goes (one profiled step; profiling adds its own cost):", *sum(profiles, [])]
    prepend("CPU speed: stablediff vs OpenVINO (optimum-intel) on the same file", lines)


if __name__ == "__main__":
    main()
