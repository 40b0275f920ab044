"""Beyond one process, side by side in one run:

1. `stablediff batch` of 40 demo-model jobs in this process against Ray Data with 1 actor (2 CPUs) and 2 actors
   (1 CPU each) on a local Ray cluster on loopback (`ray start --head`, not counted): each run's whole command (Python,
   Ray Data, the actors' model loads) and its steady throughput (jobs per second between the first and last record).
2. The job store: one job's life (queued, claimed, 20 progress updates, 10 previews, its PNG and the done state, read
   back) through SQLite and through PostgreSQL, per job; and the demo model's jobs end to end through `stablediff serve`
   with its own worker (SQLite) against `serve --no-worker` with one `stablediff worker` (PostgreSQL).

    python bench/scale_out.py [--pg postgresql://USER:PASS@127.0.0.1/DB] [--workdir /tmp/sd-bench]

--pg (default $STABLEDIFF_TEST_POSTGRES): a database whose role may create databases; the bench makes its own and
drops it. Puts a section at the top of BENCHMARKS.md.
"""
import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from report import machine, prepend  # noqa: E402
from stablediff.server.store_postgres import _safe  # noqa: E402
from serving import Server, Worker, free_port, ray_env  # noqa: E402

RAY_ENV = ray_env()

PROMPT = "a red circle on a blue background"


def batch_run(jobs: Path, outdir: Path, *flags) -> tuple[float, float]:
    """(the command's wall seconds, jobs per second between its first and last record)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stablediff.cli", "batch", str(jobs), "--outdir", str(outdir), *flags],
                   env=RAY_ENV, check=True, capture_output=True)
    wall = time.perf_counter() - start
    ends = sorted(p.stat().st_mtime for p in (outdir / "jobs").glob("*.json"))
    return wall, (len(ends) - 1) / (ends[-1] - ends[0])


def bench_batch(workdir: Path, count: int) -> list[str]:
    jobs = workdir / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": f"{PROMPT} {i}", "seed": i}) + "\n" for i in range(count)))
    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    subprocess.run([str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=RAY_ENV, check=True, capture_output=True)
    try:
        runs = {"in this process (2 threads)": batch_run(jobs, workdir / "here"),
                "Ray Data, 1 actor x 2 CPUs": batch_run(jobs, workdir / "ray1", "--ray", f"127.0.0.1:{port}",
                                                        "--actors", "1", "--cpus-per-actor", "2"),
                "Ray Data, 2 actors x 1 CPU": batch_run(jobs, workdir / "ray2", "--ray", f"127.0.0.1:{port}",
                                                        "--actors", "2", "--cpus-per-actor", "1")}
    finally:
        subprocess.run([str(ray), "stop", "--force"], env=RAY_ENV, capture_output=True)
    base_wall, base_rate = runs["in this process (2 threads)"]
    rows = ["| run | command wall | jobs/s, whole command | steady jobs/s | steady vs in-process |", "|---|---|---|---|---|"]
    for name, (wall, rate) in runs.items():
        rows.append(f"| {name} | {wall:.1f} s | {count / wall:.2f} | {rate:.2f} | {rate / base_rate:.2f}x |")
    return rows


def lifecycle(store, n: int, preview: bytes, png: bytes) -> float:
    """Milliseconds per job for one job's whole life through the store."""
    from stablediff.server.store import Job

    start = time.perf_counter()
    for i in range(n):
        job = store.add(Job(id=uuid.uuid4().hex, owner="bench", task="txt2img", batch_key="k",
                            params={"model": "m", "batch_size": 1, "seed": i}), 10**6, 10**6)
        (claimed,) = store.claim(1, "bench-worker", {"m"})
        assert claimed.id == job.id
        for step in range(1, 21):  # as the worker reports a step: progress, and whether to stop
            assert not store.progress([job.id], {"step": step, "steps": 20, "at": time.time()}, worker="bench-worker")
            if step % 2 == 0:
                store.set_preview(job.id, step, preview)
        assert store.finish(job.id, "done", [{"n": 0, "seed": i, "infotext": ""}], files=[png], worker="bench-worker")
        assert store.get(job.id).state == "done" and store.image(job.id, 0) == png
    return (time.perf_counter() - start) * 1000 / n


def bench_stores(pg: str, workdir: Path, n: int) -> list[str]:
    import psycopg
    from PIL import Image

    from stablediff.server.store_postgres import PostgresStore
    from stablediff.server.store_sqlite import SQLiteStore

    def encoded(size):
        out = io.BytesIO()
        Image.effect_noise((size, size), 64).convert("RGB").save(out, format="PNG")
        return out.getvalue()
    preview, png = encoded(16), encoded(64)
    sqlite = SQLiteStore(workdir / "bench.sqlite3", workdir / "sqlite-out")
    postgres = PostgresStore(pg)
    lifecycle(sqlite, 20, preview, png), lifecycle(postgres, 20, preview, png)  # warm-up
    per_sqlite = statistics.median(lifecycle(sqlite, n, preview, png) for _ in range(3))
    per_pg = statistics.median(lifecycle(postgres, n, preview, png) for _ in range(3))
    sqlite.close(), postgres.close()
    with psycopg.connect(pg) as conn:
        server_version = conn.info.server_version
    return [f"Store API, one job's life ({n} jobs, median of 3 runs; PNG {len(png):,} bytes, previews {len(preview):,}; "
            f"PostgreSQL {server_version // 10000}.{server_version % 10000} on loopback):", "",
            "| store | per job | vs SQLite |", "|---|---|---|",
            f"| SQLite (WAL, images as files) | {per_sqlite:.1f} ms | 1.00x |",
            f"| PostgreSQL (images as rows, NOTIFY) | {per_pg:.1f} ms | {per_pg / per_sqlite:.2f}x |"]


def end_to_end(url: str, count: int) -> float:
    """Seconds for `count` demo-model jobs queued at once, until the last is done."""
    with httpx.Client(base_url=url, timeout=60) as http:
        start = time.perf_counter()
        ids = [http.post("/v1/jobs", json={"task": "txt2img", "prompt": f"{PROMPT} {i}", "seed": i}).json()["id"]
               for i in range(count)]
        for job_id in ids:
            while (state := http.get(f"/v1/jobs/{job_id}").json()["state"]) not in ("done", "failed", "cancelled"):
                time.sleep(0.01)
            assert state == "done"
        return time.perf_counter() - start


def bench_serving(pg: str, workdir: Path, count: int) -> list[str]:
    flags = ("--max-batch", 1, "--max-queue-per-user", 1000)
    with Server(workdir / "sqlite-server", *flags) as server:
        end_to_end(server.url, 4)  # warm-up
        sqlite = end_to_end(server.url, count)
    with Server(workdir / "pg-server", "--db", pg, "--no-worker", *flags) as server, \
            Worker(workdir / "pg-worker.log", "--db", pg, "--max-batch", 1):
        end_to_end(server.url, 4)
        postgres = end_to_end(server.url, count)
    return [f"End to end: {count} demo-model jobs (64x64, 20 steps) queued at once over HTTP, one at a time (--max-batch "
            "1), until the last is done:", "",
            "| setup | wall | per job | vs SQLite |", "|---|---|---|---|",
            f"| serve (its own worker, SQLite) | {sqlite:.2f} s | {sqlite * 1000 / count:.0f} ms | 1.00x |",
            f"| serve --no-worker + 1 worker (PostgreSQL) | {postgres:.2f} s | {postgres * 1000 / count:.0f} ms | "
            f"{postgres / sqlite:.2f}x |"]


def main() -> None:
    import psycopg

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg", default=os.environ.get("STABLEDIFF_TEST_POSTGRES"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--store-jobs", type=int, default=200)
    args = ap.parse_args()
    if not args.pg:
        sys.exit("give --pg postgresql://... (a role that may create databases)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sd-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"sd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    pg = f"{args.pg.rsplit('/', 1)[0]}/{name}"
    try:
        batch = bench_batch(workdir, args.jobs)
        stores = bench_stores(pg, workdir, args.store_jobs)
        serving = bench_serving(pg, workdir, 20)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    prepend("Scale-out: `stablediff batch` on Ray Data, and the PostgreSQL job store against SQLite", [
        f"Machine: {machine()}.", f"Command: `python bench/scale_out.py --pg {_safe(args.pg)}`.",
        f"`stablediff batch` of {args.jobs} demo-model jobs (64x64, 20 steps, DPM++ 2M), each run its own process; the "
        "Ray cluster is one `ray start --head --num-cpus 2` node on loopback, started before (not counted). Whole "
        "command: from the command's start (Python, Ray Data, the actors' model loads) to its end. Steady: between the "
        "first job's record and the last's.", "", *batch, "", *stores, "", *serving])


if __name__ == "__main__":
    main()
