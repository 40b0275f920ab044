"""The shared queue: `stablediff serve --db postgresql://...` front ends and `stablediff worker` processes on one
PostgreSQL (Debian's server, which .ci/run starts on loopback; STABLEDIFF_TEST_POSTGRES is its address). Each test has
a database of its own."""
import base64
import io
import json
import os
import threading
import uuid

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from stablediff import StableDiffusion
from stablediff.server.store import Job, QueueFull

from serving import Server, Worker
from test_server import PROMPT, pixels, wait_state

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def pg():
    base = os.environ.get("STABLEDIFF_TEST_POSTGRES")
    if not base:
        pytest.skip("no PostgreSQL: set STABLEDIFF_TEST_POSTGRES=postgresql://USER:PASS@127.0.0.1/DB (.ci/run does)")
    name = f"sd_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{base.rsplit('/', 1)[0]}/{name}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _rows(url: str, sql: str, args=()):
    with psycopg.connect(url) as conn:
        return conn.execute(sql, args).fetchall()


def test_claims_of_many_workers_never_overlap_and_batch_by_key(pg):
    from stablediff.server.store_postgres import PostgresStore

    front = PostgresStore(pg)
    for i in range(40):
        front.add(Job(id=f"{i:032x}", owner=f"user{i % 3}", task="txt2img", batch_key=f"key{i % 2}",
                      params={"model": "a.safetensors" if i < 36 else "b.safetensors", "batch_size": 1}), 100, 100)
    other = PostgresStore(pg)
    with pytest.raises(QueueFull, match="the limit per user is 14"):  # the limits hold for every front end
        other.add(Job(id="f" * 32, owner="user0", task="txt2img", batch_key="k", params={}), 100, 14)
    other.close()
    stores = [PostgresStore(pg) for _ in range(4)]
    taken, lock = [], threading.Lock()

    def work(store, name):
        while batch := store.claim(3, name, {"a.safetensors"}):
            assert len({j.batch_key for j in batch}) == 1 and len(batch) <= 3
            with lock:
                taken.extend(j.id for j in batch)
            for j in batch:
                assert store.finish(j.id, "done", [], files=[b"png"], worker=name)
                assert not store.finish(j.id, "done", [], files=[b"again"], worker=name)  # once
    threads = [threading.Thread(target=work, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == [f"{i:032x}" for i in range(36)]  # each once; b's jobs wait for a worker that has b
    assert _rows(pg, "SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images") == [(36, 36)]
    assert {r[0] for r in _rows(pg, "SELECT state FROM jobs WHERE params->>'model' = 'b.safetensors'")} == {"queued"}
    for store in (front, *stores):
        store.close()


def test_one_server_two_workers_thirty_jobs_once_and_a_killed_workers_job_done_by_the_other(pg, tmp_path):
    shared = ("--db", pg, "--heartbeat-timeout", 4)
    with Server(tmp_path / "front", *shared, "--no-worker", "--max-queue-per-user", 100) as server, \
            Worker(tmp_path / "a.log", *shared, "--max-batch", 1) as a, \
            Worker(tmp_path / "b.log", *shared, "--max-batch", 1) as b, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        requests = [{"task": "txt2img", "prompt": f"{PROMPT} {i}", "seed": 500 + i, "steps": 16, "width": 96,
                     "height": 96} for i in range(30)]
        ids = [http.post("/v1/jobs", json=r).json()["id"] for r in requests]
        while True:  # a job in the middle of its steps on worker a
            rows = _rows(pg, "SELECT id FROM jobs WHERE state = 'running' AND worker LIKE %s AND "
                             "(progress->>'step')::int >= 3", (f"%:{a.proc.pid}:%",))
            if rows:
                cut = rows[0][0]
                break
        a.kill()
        jobs = [wait_state(http, f"/v1/jobs/{i}", timeout=600) for i in ids]
        assert [j["state"] for j in jobs] == ["done"] * 30
        demo = StableDiffusion.load(device="cpu")
        for r, job in zip(requests, jobs):
            assert len(job["images"]) == 1 and f"Seed: {r['seed']}," in job["images"][0]["infotext"]
            got = pixels(Image.open(io.BytesIO(http.get(job["images"][0]["url"]).content)))
            solo = pixels(demo.txt2img(r["prompt"], steps=16, width=96, height=96, seed=r["seed"])[0])
            assert np.array_equal(got, solo)  # one job a batch: what it is alone, on whichever worker
        assert b.proc.poll() is None
    attempts, worker = _rows(pg, "SELECT attempts, worker FROM jobs WHERE id = %s", (cut,))[0]
    assert attempts == 2 and worker.split(":")[1] == str(b.proc.pid)  # the other worker finished it
    assert _rows(pg, "SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images") == [(30, 30)]  # each result once


def test_a_remote_workers_job_streams_progress_and_previews_and_cancels_within_a_step(pg, tmp_path):
    with Server(tmp_path / "front", "--db", pg, "--no-worker") as server, \
            Worker(tmp_path / "w.log", "--db", pg), httpx.Client(base_url=server.url, timeout=60) as http:
        job_id = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 150, "width": 192,
                                             "height": 192}).json()["id"]
        events, preview = [], None
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                elif line.startswith("data: ") and events[-1] == "preview":
                    preview = json.loads(line[6:])
                    break
        assert "progress" in events and preview["step"] >= 2
        shown = Image.open(io.BytesIO(base64.b64decode(preview["png"])))
        assert shown.format == "PNG" and shown.width == shown.height and 192 % shown.width == 0  # the latent's size
        assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "running"
        at_cancel = http.get(f"/v1/jobs/{job_id}").json()["progress"]["step"]
        job = wait_state(http, f"/v1/jobs/{job_id}")
        assert job["state"] == "cancelled" and job["error"] == "cancelled while it ran" and job["images"] == []
        assert job["progress"]["step"] <= at_cancel + 1
        done = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2}).json()["id"]
        assert wait_state(http, f"/v1/jobs/{done}")["state"] == "done"  # the worker goes on
        # AUTOMATIC1111's blocking call, answered when the worker's NOTIFY of the end reaches the front end
        result = webuiapi.WebUIApi(port=server.port).txt2img(prompt=PROMPT, seed=5, steps=4, width=64, height=64,
                                                             sampler_name="Euler a", cfg_scale=7)
        solo = StableDiffusion.load(device="cpu").txt2img(PROMPT, seed=5, steps=4, sampler="Euler a",
                                                          schedule="uniform", scale=7)[0]
        assert np.array_equal(pixels(result.image), pixels(solo)) and result.info["all_seeds"] == [5]


def test_no_worker_without_a_shared_queue_and_a_wrong_address_are_one_line_errors(tmp_path, capsys):
    from stablediff import cli

    assert cli.main(["serve", "--outdir", str(tmp_path), "--no-worker"]) == 2
    assert cli.main(["worker", "--db", "postgresql://nobody:x@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "--db postgresql://" in err[0] and "nobody:***@" in err[1] and ":x@" not in err[1]
