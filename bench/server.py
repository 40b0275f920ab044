"""`stablediff serve` against the Python API, side by side in one run: the server's overhead per image, throughput of
8 queued jobs with batching on and off (the demo model at 64x64; optionally an SD 1.5-shaped random-weight model at
512x512), and p50/p95 latency with 10 concurrent clients. The server runs as its own process under uvicorn on a
loopback port, spoken to over HTTP with httpx, as a user's client would.

    python bench/server.py [--sd15] [--workdir /tmp/sd-bench] [--precision bf16] [--sd-steps 4]

Puts a section at the top of BENCHMARKS.md.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import machine, percentile, prepend  # noqa: E402
from serving import Server  # noqa: E402

PROMPT = "a red circle on a blue background"


def submit(http: httpx.Client, body: dict) -> str:
    r = http.post("/v1/jobs", json=body)
    r.raise_for_status()
    return r.json()["id"]


def wait(http: httpx.Client, job_id: str, poll: float = 0.02) -> dict:
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            assert job["state"] == "done", job
            return job
        time.sleep(poll)


def api_per_image(model_path: Path | None, body: dict, n: int, precision: str, out: Path) -> float:
    """Seconds per image through the Python API, the model loaded once, one image per call, saved as the PNG the
    server gives (files.write_png, with its infotext)."""
    from stablediff import StableDiffusion
    from stablediff.files import write_png

    model = StableDiffusion.load(model_path, device="cpu", dtype=precision)
    args = {k: v for k, v in body.items() if k not in ("task", "prompt")}
    model.txt2img(PROMPT, **{**args, "seed": 0})  # warm-up
    start = time.perf_counter()
    for i in range(n):
        image = model.txt2img(PROMPT, **{**args, "seed": i})[0]
        write_png(image, out / f"{i}.png", image.info["parameters"])
    return (time.perf_counter() - start) / n


def wait_events(http: httpx.Client, job_id: str) -> dict:
    """The job once it has ended, as its event stream says (no polling)."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events?preview_every=1000000") as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "end":
                return json.loads(line[6:])
    raise RuntimeError(f"the events of {job_id} ended without an end")


def server_per_image(server: Server, body: dict, n: int) -> tuple[float, float]:
    """Seconds per image through the server, one job at a time: the native API (submit, wait on the job's events,
    fetch the PNG) and AUTOMATIC1111's (one blocking txt2img call, the PNG in base64)."""
    a1111 = {"prompt": body["prompt"], "steps": body["steps"], "width": body.get("width", 64),
             "height": body.get("height", 64), "sampler_name": "DPM++ 2M", "cfg_scale": 3}
    with httpx.Client(base_url=server.url, timeout=600) as http:
        wait(http, submit(http, {**body, "seed": 0}))  # warm-up: the model loads
        start = time.perf_counter()
        for i in range(n):
            job = wait_events(http, submit(http, {**body, "seed": i}))
            http.get(job["images"][0]["url"]).raise_for_status()
        native = (time.perf_counter() - start) / n
        start = time.perf_counter()
        for i in range(n):
            http.post("/sdapi/v1/txt2img", json={**a1111, "seed": i}).raise_for_status()
        return native, (time.perf_counter() - start) / n


def throughput(server: Server, body: dict, jobs: int = 8) -> float:
    """Seconds from the first of `jobs` queued jobs to the last one done."""
    with httpx.Client(base_url=server.url, timeout=600) as http:
        wait(http, submit(http, {**body, "seed": 0}))  # warm-up
        start = time.perf_counter()
        ids = [submit(http, {**body, "seed": i, "prompt": f"{PROMPT} {i}"}) for i in range(jobs)]
        for job_id in ids:
            wait(http, job_id, poll=0.1)
        return time.perf_counter() - start


def latencies(server: Server, body: dict, clients: int = 10, each: int = 3) -> list[float]:
    """Submit-to-done seconds of every job, `clients` threads each sending `each` jobs one after the other."""
    out, lock = [], threading.Lock()

    def client(c):
        with httpx.Client(base_url=server.url, timeout=600) as http:
            for i in range(each):
                start = time.perf_counter()
                wait(http, submit(http, {**body, "seed": 100 * c + i}), poll=0.05)
                with lock:
                    out.append(time.perf_counter() - start)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def run_model(label: str, model: Path | None, body: dict, precision: str, n: int, tmp: Path) -> list[str]:
    model_args = ["--model", model] if model else []
    (tmp / f"{label}-api").mkdir()
    api = api_per_image(model, body, n, precision, tmp / f"{label}-api")
    rows = []
    with Server(tmp / f"{label}-one", *model_args, "--max-batch", 1, "--precision", precision) as server:
        native, a1111 = server_per_image(server, body, n)
        off = throughput(server, body)
    rows.append(f"| {label} | per image, one job at a time, /v1 (submit, events, PNG) | {api:.3f} s | {native:.3f} s | "
                f"{native / api:.3f}x |")
    rows.append(f"| {label} | per image, one job at a time, /sdapi/v1/txt2img | {api:.3f} s | {a1111:.3f} s | "
                f"{a1111 / api:.3f}x |")
    with Server(tmp / f"{label}-batched", *model_args, "--max-batch", 4, "--precision", precision) as server:
        on = throughput(server, body)
    rows.append(f"| {label} | 8 queued jobs, batching off (--max-batch 1) | {8 * api:.2f} s (8 x per image) | "
                f"{off:.2f} s | {off / (8 * api):.3f}x |")
    rows.append(f"| {label} | 8 queued jobs, batching on (--max-batch 4) | | {on:.2f} s | {on / off:.3f}x of off |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sd15", action="store_true", help="also an SD 1.5-shaped random model at 512x512")
    parser.add_argument("--workdir", default="/tmp/sd-bench")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--sd-steps", type=int, default=4)
    parser.add_argument("--n", type=int, default=10, help="images for the per-image times")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sd-bench-server-"))
    if args.sd15:  # the random SD 1.5-shaped file first, in a process of its own: this one stays as small as a user's
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        code = f"from pathlib import Path; from load import make_files; make_files(Path({args.workdir!r}))"
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
        sd_path = Path(args.workdir) / "sd15-random.safetensors"
    demo = {"task": "txt2img", "prompt": PROMPT, "steps": 20}
    rows = run_model("demo 64x64, 20 steps", None, demo, args.precision, args.n, tmp)
    with Server(tmp / "latency", "--max-batch", 4, "--max-queue-per-user", 100, "--precision", args.precision) as server:
        times = latencies(server, demo)
    print("\n".join(rows), f"latencies: {sorted(times)}", sep="\n", flush=True)
    if args.sd15:
        sd = {"task": "txt2img", "prompt": PROMPT, "steps": args.sd_steps, "width": 512, "height": 512}
        rows += run_model(f"SD 1.5-shaped 512x512, {args.sd_steps} steps", sd_path, sd, args.precision, 2, tmp)
    lines = [f"Machine: {machine()}.", f"Command: `python bench/server.py {' '.join(sys.argv[1:])}`. The server is "
             "`stablediff serve` in its own process (uvicorn, loopback), spoken to with httpx; the Python API renders "
             "the same requests in this process, model loaded once, and writes each PNG as the server does, "
             f"{args.precision}. Each side has a warm-up render first. Throughput and latency clients poll each "
             "job's state (every 0.1 s and 0.05 s).", "",
             "| model | what | Python API | server | ratio |", "|---|---|---|---|---|", *rows, "",
             f"10 concurrent clients, 3 demo jobs each one after the other (--max-batch 4): submit-to-done latency p50 "
             f"{percentile(times, 50):.2f} s, p95 {percentile(times, 95):.2f} s, max {max(times):.2f} s over "
             f"{len(times)} jobs."]
    prepend("Server: `stablediff serve` against the Python API", lines)


if __name__ == "__main__":
    main()
