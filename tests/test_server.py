"""`stablediff serve` under uvicorn on a loopback port, spoken to over HTTP by webuiapi and httpx."""
import base64
import io
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image, ImageDraw

from stablediff import StableDiffusion, cli
from stablediff.api import DEMO_MODEL

from serving import Server

PROMPT = "a red circle on a blue background"


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


def cli_image(tmp_path, *args) -> Image.Image:
    out = tmp_path / f"cli-{len(list(tmp_path.glob('cli-*')))}"
    assert cli.main([*args, "--outdir", str(out), "--skip_grid"]) == 0
    return Image.open(next((out / "samples").glob("*.png")))


def wait_state(client, url, states=("done", "failed", "cancelled"), timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(url).json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"{url} still {job['state']}")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    shutil.copy(DEMO_MODEL, folder / "second-shapes.safetensors")
    return folder


@pytest.fixture(scope="module")
def open_server(tmp_path_factory, models_dir):
    with Server(tmp_path_factory.mktemp("open") / "out", "--models-dir", models_dir, "--max-batch", 4,
                "--max-queue-per-user", 100) as server:
        yield server


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("auth") / "out", "--auth", "alice:pa:ss", "--auth", "bob:secret",
                "--auth", "root:toor", "--admin", "root") as server:
        yield server


def test_webuiapi_txt2img_equals_the_command_line(open_server, tmp_path):
    api = webuiapi.WebUIApi(port=open_server.port)
    result = api.txt2img(prompt=PROMPT, negative_prompt="green", seed=5, steps=4, width=64, height=64,
                         sampler_name="Euler a", cfg_scale=7)
    expected = cli_image(tmp_path, "txt2img", PROMPT, "--negative-prompt", "green", "--seed", "5", "--steps", "4",
                         "--H", "64", "--W", "64", "--sampler", "Euler a", "--schedule", "uniform", "--scale", "7")
    assert np.array_equal(pixels(result.image), pixels(expected))
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5]
    assert result.info["infotexts"] == [expected.info["parameters"]]
    assert result.image.info["parameters"] == expected.info["parameters"]  # the PNG carries its infotext
    assert result.parameters["prompt"] == PROMPT and result.parameters["steps"] == 4
    random_seed = api.txt2img(prompt=PROMPT, steps=2, width=64, height=64).info["seed"]
    assert isinstance(random_seed, int) and random_seed >= 0  # -1: drawn, and the real one reported


def test_webuiapi_img2img_with_a_mask_equals_the_command_line(open_server, tmp_path):
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 40, 40), fill=255)
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    api = webuiapi.WebUIApi(port=open_server.port)
    result = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=3, steps=6, width=64, height=64,
                         sampler_name="DPM++ 2M", scheduler="Karras", denoising_strength=0.8, inpainting_fill=1,
                         inpaint_full_res=False, mask_blur=2, cfg_scale=5)
    expected = cli_image(tmp_path, "inpaint", PROMPT, "--init-img", str(tmp_path / "init.png"), "--mask",
                         str(tmp_path / "mask.png"), "--seed", "3", "--steps", "6", "--H", "64", "--W", "64",
                         "--sampler", "DPM++ 2M Karras", "--strength", "0.8", "--fill", "original", "--mask-blur", "2",
                         "--scale", "5")
    assert np.array_equal(pixels(result.image), pixels(expected))
    assert result.info["infotexts"] == [expected.info["parameters"]]


def test_webuiapi_progress_interrupt_and_models(open_server, models_dir):
    api = webuiapi.WebUIApi(port=open_server.port)
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("r", api.txt2img(prompt=PROMPT, steps=150, width=256,
                                                                                height=256, seed=1)))
    thread.start()
    deadline = time.monotonic() + 120
    progress = api.get_progress()
    while progress["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = api.get_progress()
    assert progress["progress"] > 0 and progress["state"]["sampling_steps"] == 150
    assert progress["eta_relative"] > 0
    time.sleep(0.3)
    assert api.get_progress()["current_image"]  # the cheap preview, as base64 PNG
    api.interrupt()
    thread.join(60)
    assert not thread.is_alive() and done["r"].images == []  # stopped within a step, nothing made
    titles = [m["title"] for m in api.get_sd_models()]
    assert [t.split(" [")[0] for t in titles] == ["shapes-64.safetensors", "second-shapes.safetensors"]
    api.util_set_model("second-shapes")
    assert api.util_get_current_model().startswith("second-shapes.safetensors")
    made = api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, seed=2)
    assert "Model: second-shapes" in made.info["infotexts"][0]
    api.util_set_model("shapes-64")


def test_webuiapi_set_auth(auth_server):
    api = webuiapi.WebUIApi(port=auth_server.port)
    with pytest.raises(RuntimeError, match="401"):
        api.txt2img(prompt=PROMPT, steps=2, width=64, height=64)
    api.set_auth("alice", "pa:ss")  # a password may hold ':'
    assert api.txt2img(prompt=PROMPT, steps=2, width=64, height=64, seed=4).info["seed"] == 4


def test_fifty_jobs_from_ten_clients_all_finish_each_its_solo_image(open_server):
    demo = StableDiffusion.load(device="cpu")
    requests = {c: [{"task": "txt2img", "prompt": f"{PROMPT} {c}", "seed": 100 * c + i, "steps": 4}
                    for i in range(5)] for c in range(10)}

    def client(c):
        with httpx.Client(base_url=open_server.url, timeout=60) as http:
            return [http.post("/v1/jobs", json=r).json()["id"] for r in requests[c]]
    with ThreadPoolExecutor(10) as pool:
        ids = dict(zip(requests, pool.map(client, requests)))
    with httpx.Client(base_url=open_server.url, timeout=60) as http:
        finished = {c: [wait_state(http, f"/v1/jobs/{i}") for i in ids[c]] for c in ids}
        differing = 0
        for c, job_list in finished.items():
            assert [j["state"] for j in job_list] == ["done"] * 5
            assert all(len(j["images"]) == 1 for j in job_list)  # none lost, none doubled
            ends = [j["finished"] for j in job_list]
            assert ends == sorted(ends)  # in submission order
            for r, job in zip(requests[c], job_list):
                got = pixels(Image.open(io.BytesIO(http.get(job["images"][0]["url"]).content)))
                solo = pixels(demo.txt2img(r["prompt"], steps=4, seed=r["seed"])[0])
                assert np.abs(got - solo).max() <= 1  # the batch bound (tests/test_hardening.py)
                differing += int((got != solo).sum())
        assert differing <= 50 * got.size // 1000
    images = list((open_server.outdir / "images").rglob("*.png"))
    assert len({p.parent.name for p in images} & {i for v in ids.values() for i in v}) == 50


def test_a_cancelled_running_job_stops_within_one_step(open_server):
    with httpx.Client(base_url=open_server.url, timeout=60) as http:
        job_id = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 150, "width": 256,
                                             "height": 256}).json()["id"]
        job = wait_state(http, f"/v1/jobs/{job_id}", states=("running",))
        while job["progress"].get("step", 0) < 2:
            job = http.get(f"/v1/jobs/{job_id}").json()
        assert http.delete(f"/v1/jobs/{job_id}").json()["state"] == "running"
        at_cancel = http.get(f"/v1/jobs/{job_id}").json()["progress"]["step"]
        job = wait_state(http, f"/v1/jobs/{job_id}")
        assert job["state"] == "cancelled" and job["error"] == "cancelled while it ran" and job["images"] == []
        assert job["progress"]["step"] <= at_cancel + 1
        queued = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 150, "width": 256,
                                             "height": 256}).json()["id"]
        second = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2}).json()["id"]
        assert http.delete(f"/v1/jobs/{second}").json()["state"] == "cancelled"  # queued: at once
        http.delete(f"/v1/jobs/{queued}")
        assert wait_state(http, f"/v1/jobs/{queued}")["state"] == "cancelled"


def test_events_stream_position_steps_previews_and_the_end(open_server):
    with httpx.Client(base_url=open_server.url, timeout=60) as http:
        job_id = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 12, "width": 128,
                                             "height": 128}).json()["id"]
        events = []
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
    assert events[-1] == "end" and events[-2] == "done" and "progress" in events
    assert "preview" in events


def test_kill_9_with_ten_jobs_queued_then_restart_runs_each_once(tmp_path):
    out = tmp_path / "out"
    server = Server(out, "--max-batch", 1).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            ids = [http.post("/v1/jobs", json={"task": "txt2img", "prompt": f"{PROMPT} {i}", "seed": i, "steps": 30,
                                               "width": 128, "height": 128}).json()["id"] for i in range(10)]
            wait_state(http, f"/v1/jobs/{ids[0]}", states=("running", "done"))
        server.kill()
    finally:
        server.stop()
    with Server(out, "--max-batch", 1, port=server.port) as again, httpx.Client(base_url=again.url, timeout=60) as http:
        jobs = [wait_state(http, f"/v1/jobs/{i}") for i in ids]
    assert [j["state"] for j in jobs] == ["done"] * 10
    assert [len(j["images"]) for j in jobs] == [1] * 10
    assert sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*") if p.is_file()) == \
        sorted(f"{i}/0.png" for i in ids)  # each result exactly once, no temporary file left


def test_every_route_needs_credentials(auth_server, tmp_path):
    from fastapi.routing import APIRoute

    from stablediff.server.app import ServerConfig, create_app

    from starlette.routing import Mount

    def walk(routes):  # the app's routes, through the routers it includes
        for r in routes:
            if isinstance(r, APIRoute):
                yield from ((m, r.path) for m in r.methods)
            elif isinstance(r, Mount):
                yield "GET", r.path + "/"
            elif hasattr(r, "original_router") or hasattr(r, "routes"):
                yield from walk(getattr(r, "original_router", r).routes)
            else:
                raise AssertionError(f"a route of an unknown kind: {r!r}")
    app = create_app(ServerConfig(model=DEMO_MODEL, outdir=tmp_path / "enumerated"))
    routes = sorted(set(walk(app.routes)))
    assert len(routes) > 30 and ("GET", "/docs") in routes and ("POST", "/sdapi/v1/txt2img") in routes
    public = {("GET", "/"), ("HEAD", "/"), ("GET", "/web/")}  # the page and its files: it signs in itself
    assert public <= set(routes)
    routes = [r for r in routes if r not in public]
    filled = {"{job_id}": "0" * 32, "{n}": "0", "{name}": "image"}
    with httpx.Client(base_url=auth_server.url, timeout=60) as http:
        for method, path in routes:
            for key, value in filled.items():
                path = path.replace(key, value)
            for auth in (None, ("alice", "wrong"), ("nobody", "pa:ss")):
                r = http.request(method, path, auth=auth, json={})
                assert r.status_code == 401, (method, path, auth, r.status_code)
                assert r.headers["www-authenticate"].startswith("Basic") and "error" in r.json()


def test_users_see_only_their_own_jobs_and_tokens_work(auth_server):
    with httpx.Client(base_url=auth_server.url, timeout=60) as http:
        alice, bob, root = ("alice", "pa:ss"), ("bob", "secret"), ("root", "toor")
        job_id = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2}, auth=alice).json()["id"]
        with httpx.Client(base_url=auth_server.url, auth=alice) as as_alice:
            job = wait_state(as_alice, f"/v1/jobs/{job_id}")
        assert http.get(f"/v1/jobs/{job_id}", auth=bob).status_code == 404
        assert http.get(job["images"][0]["url"], auth=bob).status_code == 404
        assert http.delete(f"/v1/jobs/{job_id}", auth=bob).status_code == 404
        assert job_id not in [j["id"] for j in http.get("/v1/jobs", auth=bob).json()["jobs"]]
        assert http.get(job["images"][0]["url"], auth=alice).status_code == 200
        assert job_id in [j["id"] for j in http.get("/v1/jobs", auth=root).json()["jobs"]]  # the admin sees all
        token = http.post("/v1/tokens", auth=alice).json()["token"]
        bearer = {"authorization": f"Bearer {token}"}
        assert http.get(f"/v1/jobs/{job_id}", headers=bearer).json()["state"] == "done"
        assert http.get("/sdapi/v1/options", headers=bearer).status_code == 401  # Basic only there, as the webui
        assert http.get("/v1/me", headers={"authorization": "Bearer sdt_forged"}).status_code == 401


def test_cross_origin_changes_are_refused(open_server):
    with httpx.Client(base_url=open_server.url, timeout=60) as http:
        r = http.post("/v1/jobs", json={"task": "txt2img", "prompt": "x", "steps": 1},
                      headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and "its own origin" in r.json()["error"]
        r = http.post("/sdapi/v1/options", json={}, headers={"sec-fetch-site": "cross-site"})
        assert r.status_code == 403
        assert http.post("/v1/jobs", json={"task": "txt2img", "prompt": "x", "steps": 1},
                         headers={"origin": open_server.url}).status_code == 202
        assert "access-control-allow-origin" not in http.options("/v1/jobs", headers={
            "origin": "http://evil.example", "access-control-request-method": "POST"}).headers


def test_listen_without_authentication_refuses_to_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stablediff.cli", "serve", "--listen", "--outdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "stablediff: error: refusing to serve 0.0.0.0 without authentication: add --auth USER:PASS or --auth-file F"]


def _png(size=(64, 64)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _bomb() -> str:
    out = io.BytesIO()
    Image.new("1", (20000, 20000)).save(out, format="PNG")  # tens of kB that decode to 400 megapixels
    return base64.b64encode(out.getvalue()).decode()


def hostile() -> list:
    return [
        ("POST", "/v1/jobs", {"task": "txt2img", "prompt": 5}),
        ("POST", "/v1/jobs", {"task": "txt2img", "steps": "many"}),
        ("POST", "/v1/jobs", {"task": "txt2img", "scale": float("nan")}),
        ("POST", "/v1/jobs", {"task": "txt2img", "scale": 1e308}),
        ("POST", "/v1/jobs", {"task": "txt2img", "steps": -5}),
        ("POST", "/v1/jobs", {"task": "txt2img", "steps": 10**12}),
        ("POST", "/v1/jobs", {"task": "txt2img", "seed": 2**70}),
        ("POST", "/v1/jobs", {"task": "txt2img", "width": 100000, "height": 100000}),
        ("POST", "/v1/jobs", {"task": "txt2img", "width": 63}),
        ("POST", "/v1/jobs", {"task": "txt2img", "batch_size": 10**6}),
        ("POST", "/v1/jobs", {"task": "txt2img", "prompt": "x" * 100_000}),
        ("POST", "/v1/jobs", {"task": "txt2img", "prompt": "a\x00b"}),
        ("POST", "/v1/jobs", {"task": "txt2img", "sampler": "DPM fast"}),
        ("POST", "/v1/jobs", {"task": "txt2img", "model": "../../etc/passwd"}),
        ("POST", "/v1/jobs", {"task": "txt2img", "prompt": "<lora:../../secret:1>"}),
        ("POST", "/v1/jobs", {"task": "txt2img", "prompt": "<lora:*:1>"}),
        ("POST", "/v1/jobs", {"task": "rm -rf"}),
        ("POST", "/v1/jobs", {"task": "txt2img", "surprise": 1}),
        ("POST", "/v1/jobs", [1, 2]),
        ("POST", "/v1/jobs", {"task": "img2img", "image": "not base64!"}),
        ("POST", "/v1/jobs", {"task": "img2img", "image": base64.b64encode(b"GIF89a not really").decode()}),
        ("POST", "/v1/jobs", {"task": "img2img", "image": _bomb()}),
        ("POST", "/v1/jobs", {"task": "img2img"}),
        ("POST", "/v1/jobs", {"task": "outpaint", "image": _png(), "extend": [1, 2]}),
        ("POST", "/v1/jobs", {"task": "upscale", "image": _png((1200, 1200))}),  # 4800x4800 out
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "steps": "x"}),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "NaN"}),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Restart"}),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "width": -64}),
        ("POST", "/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "../x"}}),
        ("POST", "/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%"]}),
        ("POST", "/sdapi/v1/img2img", {"prompt": "x", "init_images": [_png()], "resize_mode": 7}),
        ("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": -3}),
        ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"}),
        ("POST", "/sdapi/v1/png-info", {"image": "????"}),
        ("GET", "/v1/jobs/../../etc/passwd", None),
        ("GET", "/v1/images/" + "0" * 32 + "/x.png", None),
        ("GET", "/v1/jobs?page=-1", None),
    ]


def test_hostile_requests_get_only_4xx_and_the_server_still_renders(open_server):
    with httpx.Client(base_url=open_server.url, timeout=120) as http:
        for method, path, body in hostile():
            content = None if body is None else __import__("json").dumps(body, allow_nan=True)
            r = http.request(method, path, content=content, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body if not isinstance(body, dict) else list(body), r.status_code,
                                                r.text[:300])
            assert "error" in r.json() and "Traceback" not in r.text
        huge = http.post("/v1/jobs", content=b"{" + b" " * (21 * 2**20) + b"}", headers={"content-type": "application/json"})
        assert huge.status_code == 413
        job_id = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2}).json()["id"]
        assert wait_state(http, f"/v1/jobs/{job_id}")["state"] == "done"


def test_a_job_that_fails_says_why_and_the_queue_goes_on(open_server):
    with httpx.Client(base_url=open_server.url, timeout=120) as http:
        # a request the table allows and this model cannot do (its text encoder has 3 layers): the job fails with
        # the reason, the server serves on
        bad = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2, "clip_skip": 12})
        job = wait_state(http, f"/v1/jobs/{bad.json()['id']}")
        assert job["state"] == "failed" and job["error"].startswith("clip skip 12 is not possible")
        good = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2}).json()["id"]
        assert wait_state(http, f"/v1/jobs/{good}")["state"] == "done"


def test_queue_limits_answer_429_with_retry_after(tmp_path):
    with Server(tmp_path / "out", "--max-queue-per-user", 2) as server, httpx.Client(base_url=server.url) as http:
        slow = {"task": "txt2img", "prompt": PROMPT, "steps": 150, "width": 256, "height": 256}
        first, second = (http.post("/v1/jobs", json=slow).json()["id"] for _ in range(2))
        r = http.post("/v1/jobs", json=slow)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0 and "limit per user is 2" in r.json()["error"]
        for job_id in (first, second):
            http.delete(f"/v1/jobs/{job_id}")


def test_sigterm_puts_the_running_job_back_and_it_runs_after_a_restart(tmp_path):
    out = tmp_path / "out"
    server = Server(out).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            job_id = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 60, "width": 192,
                                                 "height": 192, "seed": 8}).json()["id"]
            job = wait_state(http, f"/v1/jobs/{job_id}", states=("running",))
            while job["progress"].get("step", 0) < 2:
                job = http.get(f"/v1/jobs/{job_id}").json()
        started = time.monotonic()
        assert server.stop() == 0 and time.monotonic() - started < 30
    finally:
        server.stop()
    assert not [p for p in out.rglob("*.tmp")] and not list((out / "images").glob(f"{job_id}/*"))
    with Server(out, port=server.port) as again, httpx.Client(base_url=again.url, timeout=60) as http:
        job = wait_state(http, f"/v1/jobs/{job_id}")
    assert job["state"] == "done" and len(job["images"]) == 1


def test_multipart_uploads_and_png_info(open_server, tmp_path):
    init = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    init.save(tmp_path / "init.png")
    request = {"task": "img2img", "prompt": PROMPT, "seed": 6, "steps": 6, "strength": 0.6}
    with httpx.Client(base_url=open_server.url, timeout=60) as http:
        r = http.post("/v1/jobs", data={"request": __import__("json").dumps(request)},
                      files={"image": ("init.png", buffer.getvalue(), "image/png")})
        assert r.status_code == 202, r.text
        job = wait_state(http, f"/v1/jobs/{r.json()['id']}")
        png = http.get(job["images"][0]["url"]).content
        info = http.post("/v1/png-info", json={"image": base64.b64encode(png).decode()}).json()
    expected = cli_image(tmp_path, "img2img", PROMPT, "--init-img", str(tmp_path / "init.png"), "--seed", "6",
                         "--steps", "6", "--strength", "0.6")
    assert np.array_equal(pixels(Image.open(io.BytesIO(png))), pixels(expected))
    assert info["parameters"] == expected.info["parameters"]
    assert (info["settings"]["seed"], info["settings"]["steps"], info["settings"]["denoising_strength"]) == (6, 6, 0.6)


def test_batched_jobs_of_several_batches_keep_their_own_seeds(open_server):
    demo = StableDiffusion.load(device="cpu")
    with httpx.Client(base_url=open_server.url, timeout=120) as http:
        blocker = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 30, "width": 192,
                                              "height": 192}).json()["id"]
        ids = [http.post("/v1/jobs", json={"task": "txt2img", "prompt": f"{PROMPT} {i}", "seed": 40 + 10 * i, "steps": 4,
                                           "n_iter": 2}).json()["id"] for i in range(2)]
        jobs = [wait_state(http, f"/v1/jobs/{i}") for i in ids]
        assert wait_state(http, f"/v1/jobs/{blocker}")["state"] == "done"
        assert jobs[0]["started"] == jobs[1]["started"]  # they ran as one batch
        for i, job in enumerate(jobs):
            assert [im["seed"] for im in job["images"]] == [40 + 10 * i, 41 + 10 * i]
            for im in job["images"]:
                got = pixels(Image.open(io.BytesIO(http.get(im["url"]).content)))
                solo = pixels(demo.txt2img(f"{PROMPT} {i}", steps=4, seed=im["seed"])[0])
                assert np.abs(got - solo).max() <= 1 and f"Seed: {im['seed']}," in im["infotext"]


def test_lora_jobs_batch_only_with_the_same_loras_and_equal_their_solo_renders(tmp_path):
    from test_adapters import kohya_lora

    demo = StableDiffusion.load(device="cpu")
    (tmp_path / "loras").mkdir()
    kohya_lora(demo, tmp_path / "loras" / "ink.safetensors")
    demo.lora_dir = tmp_path / "loras"
    prompts = ["a red circle <lora:ink:0.5>", "a red circle <lora:ink:1>", "a red circle <lora:ink:0.5>"]
    with Server(tmp_path / "out", "--lora-dir", tmp_path / "loras") as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        assert [x["name"] for x in http.get("/v1/loras").json()["loras"]] == ["ink"]
        blocker = http.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 30, "width": 192,
                                              "height": 192}).json()["id"]
        ids = [http.post("/v1/jobs", json={"task": "txt2img", "prompt": p, "seed": 7 + i, "steps": 4}).json()["id"]
               for i, p in enumerate(prompts)]
        jobs = [wait_state(http, f"/v1/jobs/{i}") for i in ids]
        wait_state(http, f"/v1/jobs/{blocker}")
        assert [j["state"] for j in jobs] == ["done"] * 3
        assert jobs[0]["started"] != jobs[1]["started"]  # other LoRA weights: another batch
        for i, (prompt, job) in enumerate(zip(prompts, jobs)):
            got = pixels(Image.open(io.BytesIO(http.get(job["images"][0]["url"]).content)))
            solo = pixels(demo.txt2img(prompt, steps=4, seed=7 + i)[0])
            assert np.abs(got - solo).max() <= 1 and 'Lora hashes: "ink: ' in job["images"][0]["infotext"]
        r = http.post("/v1/jobs", json={"task": "txt2img", "prompt": "x <lora:missing:1>"})
        assert r.status_code == 400 and "no such LoRA" in r.json()["error"]
