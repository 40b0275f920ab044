"""The page at / of `stablediff serve`, driven in Debian's chromium by Playwright against a real server on a loopback
port: signing in, generating, the queue, inpainting, restoring settings, the history across a restart, safety."""
import io
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from browsing import drop_file, have_chromium, launch, shown_image
from serving import Server
from test_server import wait_state

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
if not have_chromium():
    if os.environ.get("STABLEDIFF_NEED_BROWSER"):
        raise RuntimeError("the page's tests need Debian's chromium: apt-get install chromium (.ci/run does)")
    pytest.skip("no chromium here (apt-get install chromium)", allow_module_level=True)

USER, PASSWORD = "ann", "pa ss"
PROMPT = "a red circle on a blue background"
SCREENSHOTS = Path(os.environ.get("STABLEDIFF_SCREENSHOTS") or "")  # e.g. docs/: where the README's pictures come from
WEB = Path(__file__).resolve().parents[1] / "stablediff" / "web"


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from stablediff import StableDiffusion
    from test_adapters import kohya_lora

    folder = tmp_path_factory.mktemp("page")
    (folder / "loras").mkdir()
    (folder / "embeddings").mkdir()
    kohya_lora(StableDiffusion.load(device="cpu"), folder / "loras" / "ink.safetensors")
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))},
              str(folder / "embeddings" / "shiny.safetensors"))
    with Server(folder / "out", "--auth", f"{USER}:{PASSWORD}", "--max-batch", 1, "--max-steps", 200,
                "--lora-dir", folder / "loras", "--embeddings-dir", folder / "embeddings") as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, auth=(USER, PASSWORD), timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        browser = launch(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def requests_seen():
    return []


@pytest.fixture(scope="module")
def context(browser, requests_seen):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.on("request", lambda r: requests_seen.append(r.url))
    yield context
    context.close()


@pytest.fixture(scope="module")
def page(context, server):
    """One signed-in page for the module's tests, as a person keeps one tab open."""
    page = context.new_page()
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(server.url + "/")
    page.locator("#sign-in-user").fill(USER)
    page.locator("#sign-in-password").fill("wrong")
    page.locator("#sign-in-password").press("Enter")
    page.locator("#sign-in-error").get_by_text("not this server's").wait_for()
    page.locator("#sign-in-password").fill(PASSWORD)
    page.locator("#sign-in-form button").click()
    ready(page)
    yield page
    assert page.errors == []


def ready(page):
    page.wait_for_selector("body[data-ready='1']", timeout=30000)


def form(page, **fields):
    """Set form fields by parameter name (as a person types them)."""
    for name, value in fields.items():
        field = reveal(page.locator(f"#f-{name}"))
        if field.evaluate("e => e.tagName") == "SELECT":
            field.select_option(str(value))
        elif field.get_attribute("type") == "checkbox":
            field.set_checked(bool(value))
        else:
            field.fill(str(value))


def reveal(locator):
    """The control, its <details> opened (as a person opens "Hires fix" or "More" to reach it)."""
    locator.evaluate("e => { const d = e.closest('details'); if (d) d.open = true; }")
    return locator


def mode(page, task):
    page.locator(f"input[name=task][value={task}]").check()


def generate(page):
    """Click Generate and wait for the job's images in Results; the images shown."""
    before = page.locator("#job").get_attribute("data-last-job")
    page.locator("#generate").click()
    page.wait_for_function("""before => { const sent = document.getElementById('job').dataset.lastJob;
        return (sent !== before && document.getElementById('results').dataset.job === sent)
               || document.querySelector('#job .error:not(:empty)'); }""", arg=before, timeout=120000)
    errors = page.locator("#job .error:not(:empty)")
    assert errors.count() == 0, errors.all_text_contents()
    return page.locator("#results img")


def newest(http, state="done"):
    job = http.get("/v1/jobs?per_page=1").json()["jobs"][0]
    assert job["state"] == state, job
    return job


def api_image(http, body) -> tuple[dict, Image.Image]:
    """The same job through the API (httpx), and its first image."""
    r = http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_state(http, f"/v1/jobs/{r.json()['id']}")
    assert job["state"] == "done", job
    return job, Image.open(io.BytesIO(http.get(job["images"][0]["url"]).content))


def test_generate_shows_progress_and_the_apis_picture(page, http):
    form(page, prompt=PROMPT, negative_prompt="green", steps=100, seed=7, sampler="euler_a", scale=6)
    page.locator("#size-preset").select_option("64x64")
    page.locator("#generate").click()
    page.locator("#progress-text").get_by_text(re.compile(r"Step \d+ of 100 · image 1 of 1")).wait_for(timeout=60000)
    page.locator("#preview").wait_for(state="visible")  # the live preview
    assert page.locator("#progress-bar").get_attribute("value") is not None
    page.get_by_text("Done: 1 image(s).").wait_for(timeout=120000)
    shown = shown_image(page.locator("#results img").first)
    job, expected = api_image(http, {"task": "txt2img", "prompt": PROMPT, "negative_prompt": "green", "steps": 100,
                                     "seed": 7, "sampler": "euler_a", "scale": 6, "width": 64, "height": 64})
    assert np.array_equal(pixels(shown), pixels(expected))
    assert page.locator("#history img").count() >= 1


def test_queue_three_jobs_and_cancel_the_second(page, http):
    form(page, prompt="queued", steps=120, seed=1)
    page.locator("#size-preset").select_option("64x64")
    page.locator("#generate").click()
    page.locator("#f-prompt").press("Control+Enter")  # the keyboard queues one too
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelectorAll('#queue li').length === 3", timeout=30000)
    expect(page.locator("#queue li").nth(0).locator(".state")).to_have_text("running")
    page.locator("#queue li").nth(1).get_by_role("button", name="Cancel").click()
    page.wait_for_function("() => document.querySelectorAll('#queue li').length === 0", timeout=120000)
    page.locator("#progress").wait_for(state="hidden")  # the page has shown the end of each of the three
    jobs = http.get("/v1/jobs?per_page=3").json()["jobs"][::-1]
    assert [j["state"] for j in jobs] == ["done", "cancelled", "done"]
    assert [j["params"]["prompt"] for j in jobs] == ["queued"] * 3


def test_escape_cancels_the_running_job(page, http):
    form(page, prompt="cancel me", steps=200)
    page.locator("#generate").click()
    page.locator("#progress-text").get_by_text(re.compile(r"Step \d+ of 200")).wait_for(timeout=60000)
    page.evaluate("() => { document.getElementById('result-note').textContent = ''; }")
    page.keyboard.press("Escape")
    page.get_by_text("Cancelled.").wait_for(timeout=30000)
    assert newest(http, "cancelled")["params"]["prompt"] == "cancel me"


def picture(tmp_path, size=64) -> Path:
    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    draw.rectangle((36, 30, 60, 60), fill=(240, 220, 20))
    path = tmp_path / "picture.png"
    image.save(path)
    return path


def test_paint_a_mask_and_inpaint_keeps_the_rest(page, http, tmp_path):
    source = picture(tmp_path)
    mode(page, "inpaint")
    page.locator("#f-image").set_input_files(source)
    mask = page.locator("#mask-canvas")
    mask.wait_for(state="visible")
    page.locator("#brush-size").fill("12")
    mask.scroll_into_view_if_needed()
    box = mask.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    page.locator("input[name=mask-tool][value=eraser]").check()  # the eraser takes a part back
    box = mask.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.5)
    form(page, prompt="a green square", steps=8, mask_blur=0, seed=3)
    shown = generate(page).first
    job = newest(http)
    assert job["task"] == "inpaint"
    sent = np.asarray(Image.open(io.BytesIO(http.get(job["inputs"]["mask"]).content)).convert("L"))
    kept = sent == 0
    assert 0.02 < (~kept).mean() < 0.5 and sent[32, 38] == 0  # the stroke, less what was erased at its end
    result, original = pixels(shown_image(shown)), pixels(Image.open(source))
    assert np.array_equal(result[kept], original[kept])
    assert not np.array_equal(result[~kept], original[~kept])


def test_a_failed_job_shows_its_reason_and_keeps_the_form(page, tmp_path):
    mode(page, "upscale")  # the demo model is no x4 upscaler: the job is accepted, then fails in the worker
    page.locator("#f-image").set_input_files(picture(tmp_path, 32))
    form(page, prompt="kept after a failure")
    generate(page)
    assert page.locator("#result-note").text_content().startswith("The job failed: ")
    assert page.locator("#f-prompt").input_value() == "kept after a failure"


def test_img2img_and_outpaint(page, http, tmp_path):
    mode(page, "img2img")
    page.locator("#f-image").set_input_files(picture(tmp_path, 48))
    form(page, prompt="a red circle", steps=8, strength=0.5, seed=2)
    page.locator("#size-preset").select_option("")  # the image's own size
    assert shown_image(generate(page).first).size == (48, 48)
    assert newest(http)["params"]["strength"] == 0.5
    mode(page, "outpaint")
    form(page, **{"extend-0": 16, "extend-3": 8})
    expect(page.locator("#image-size")).to_have_text("48 × 48 → 64 × 56")
    assert shown_image(generate(page).first).size == (64, 56)
    assert newest(http)["params"]["extend"] == [16, 0, 0, 8]


def test_lora_and_embedding_pickers_insert_their_names(page, http):
    mode(page, "txt2img")
    form(page, prompt="a red circle", steps=4, seed=1)
    page.locator("#f-prompt").press("End")
    page.locator("#lora-pick").select_option("ink")
    page.locator("#lora-insert").click()
    page.locator("#embedding-pick").select_option("shiny")
    page.locator("#embedding-insert").click()
    assert page.locator("#f-prompt").input_value() == "a red circle <lora:ink:1> shiny"
    generate(page)
    assert newest(http)["params"]["prompt"] == "a red circle <lora:ink:1> shiny"


def test_errors_appear_beside_their_field(page):
    mode(page, "txt2img")
    form(page, prompt=PROMPT, steps=500)
    page.locator("#generate").click()
    error = page.locator("[data-param=steps] .error")
    error.wait_for()
    assert "at most 200" in error.text_content()
    assert page.locator("#f-steps").get_attribute("aria-invalid") == "true"
    page.locator("#f-width").fill("65")  # said while typing, made a multiple of 8 when the field is left
    assert "multiple of 8" in page.locator("[data-param=width] .error").text_content()
    page.locator("#f-width").press("Tab")
    assert page.locator("#f-width").input_value() == "64"
    assert page.locator("[data-param=width] .error").count() == 0
    form(page, steps=6, width=64, height=64)


def test_form_survives_a_reload(page):
    form(page, prompt="typed before the reload", steps=9, clip_skip=2)
    reveal(page.locator("#hires-on")).check()
    page.reload()
    ready(page)
    assert page.locator("#f-prompt").input_value() == "typed before the reload"
    assert page.locator("#f-steps").input_value() == "9" and page.locator("#f-clip_skip").input_value() == "2"
    assert page.locator("#hires-on").is_checked()
    reveal(page.locator("#hires-on")).uncheck()


SETTINGS = {"prompt": "a blue triangle, (sharp:1.2)", "negative_prompt": "blurry", "sampler": "dpmpp_2m",
            "schedule": "karras", "steps": 5, "scale": 5.5, "seed": 1234, "width": 64, "height": 56, "clip_skip": 2,
            "subseed": 99, "subseed_strength": 0.25, "hires_scale": 1.5, "hires_steps": 3, "hires_denoise": 0.6,
            "hires_upscaler": "latent-nearest"}


def field_values(page) -> dict:
    return {name: page.locator(f"#f-{name}").input_value() for name in SETTINGS}


def test_drop_a_png_and_every_field_is_restored(page, http):
    job, image = api_image(http, {"task": "txt2img", **SETTINGS})
    data = http.get(job["images"][0]["url"]).content
    form(page, prompt="something else", negative_prompt="", steps=20, seed=-1)
    drop_file(page, "#history", data, "ours.png")
    page.get_by_text("Settings restored from ours.png.").wait_for()
    assert field_values(page) == {k: str(v) for k, v in SETTINGS.items()}
    assert page.locator("#hires-on").is_checked()
    # AUTOMATIC1111's infotext, as its PNGs carry it
    text = ("a cat in a hat\nNegative prompt: dog\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, "
            "Seed: 42, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.1")
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=info)
    drop_file(page, "#history", buffer.getvalue(), "a1111.png")
    page.get_by_text("Settings restored from a1111.png.").wait_for()
    got = {k: page.locator(f"#f-{k}").input_value() for k in
           ("prompt", "negative_prompt", "steps", "sampler", "schedule", "scale", "seed", "width", "height", "clip_skip")}
    assert got == {"prompt": "a cat in a hat", "negative_prompt": "dog", "steps": "25", "sampler": "dpmpp_2m",
                   "schedule": "karras", "scale": "6.5", "seed": "42", "width": "512", "height": "768", "clip_skip": "2"}
    assert "v1-5-pruned-emaonly is not on this server" in page.locator("#form-note").text_content()
    assert not page.locator("#hires-on").is_checked()


def test_use_these_settings_from_the_history_gives_the_same_image(page, http):
    mode(page, "txt2img")
    form(page, prompt="a yellow square", negative_prompt="", steps=6, seed=-1, sampler="dpmpp_2m_sde", schedule="",
         scale=4, width=64, height=64, clip_skip=1, subseed="", subseed_strength=0)
    reveal(page.locator("#hires-on")).uncheck()
    first = shown_image(generate(page).first)
    seed = newest(http)["images"][0]["seed"]
    page.locator("#seed-last").click()  # "reuse last"
    assert page.locator("#f-seed").input_value() == str(seed)
    form(page, prompt="changed", steps=3, seed=5, scale=9)
    page.locator("#history button.thumb").first.click()
    viewer = page.locator("#viewer")
    viewer.wait_for(state="visible")
    assert f"Seed: {seed}" in page.locator("#viewer-info").text_content()
    page.locator("#viewer-use").click()
    assert page.locator("#f-prompt").input_value() == "a yellow square"
    assert page.locator("#f-seed").input_value() == str(seed)
    again = shown_image(generate(page).first)
    assert np.array_equal(pixels(first), pixels(again))


def test_send_to_inpaint_and_download(page, http):
    page.locator("#history button.thumb").first.click()
    with page.expect_download() as download:
        page.locator("#viewer-download").click()
    job = newest(http)
    assert Path(download.value.path()).read_bytes() == http.get(job["images"][0]["url"]).content
    page.locator("#viewer-inpaint").click()
    expect(page.locator("input[name=task][value=inpaint]")).to_be_checked()
    page.locator("#mask-canvas").wait_for(state="visible")
    expect(page.locator("#image-size")).to_have_text("64 × 64")
    mode(page, "txt2img")


def test_a_prompt_of_html_is_text(page, http):
    attack = "<img src=x onerror=alert(1)>"
    form(page, prompt=attack, steps=4)
    generate(page)
    page.locator("#history button.thumb").first.click()
    assert attack in page.locator("#viewer-info").text_content()
    page.locator("#viewer-close").click()
    page.locator("#f-prompt").fill(attack + " queued")  # shown in the queue too
    generate(page)
    assert page.locator("img[src=x]").count() == 0 and page.locator("#history img").count() > 0
    assert page.dialogs == []


def test_every_control_has_a_label_and_the_keyboard_reaches_them(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button, canvas.mask')]
        .filter(e => !(e.labels?.length || e.getAttribute('aria-label') || e.getAttribute('aria-labelledby') ||
                       (e.tagName === 'BUTTON' && e.textContent.trim())))
        .map(e => e.id || e.name || e.outerHTML.slice(0, 60))""")
    assert unlabelled == []
    page.locator("#f-prompt").focus()
    reached = set()
    for _ in range(60):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("() => document.activeElement.id"))
    assert {"f-negative_prompt", "f-model", "f-sampler", "f-steps", "f-seed", "seed-random", "generate"} <= reached


def test_desktop_and_phone_widths(page, tmp_path):
    folder = SCREENSHOTS if str(SCREENSHOTS) not in ("", ".") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    form(page, prompt=PROMPT, steps=12, seed=11)
    page.locator("#size-preset").select_option("64x64")
    generate(page)
    page.screenshot(path=folder / "page-desktop.png", full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        page.screenshot(path=folder / "page-phone.png", full_page=True)
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_the_history_survives_a_restart(page, server, http):
    before = sum(len(j["images"]) for j in http.get("/v1/jobs?per_page=12").json()["jobs"])
    page.wait_for_function("n => document.querySelectorAll('#history img').length === n", arg=before)
    server.stop()
    server.start()
    page.reload()
    ready(page)  # the token was kept in the store: still signed in
    page.wait_for_function("n => document.querySelectorAll('#history img').length === n", arg=before)
    page.locator("#history-older").click()
    page.wait_for_function("() => document.getElementById('history-page').textContent === 'page 2'")
    page.locator("#sign-out").click()
    page.locator("#sign-in-user").wait_for(state="visible")


def test_no_request_leaves_the_origin(requests_seen, server):
    assert requests_seen
    elsewhere = [u for u in requests_seen if not u.startswith((server.url + "/", "data:", "blob:"))]
    assert elsewhere == []


# ---- the page's files and the API's parts it needs, over HTTP


def test_the_page_is_served_under_a_strict_policy(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    js = httpx.get(server.url + "/web/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert js.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(server.url + "/web/../pyproject.toml").status_code == 404


def test_the_page_never_parses_html():
    for path in WEB.glob("*.js"):
        text = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{path.name} uses {sink}"
    assert "<script>" not in (WEB / "index.html").read_text()  # no inline script: the policy forbids it anyway


def test_a_scripted_401_has_no_challenge_and_tokens_are_revoked(server):
    r = httpx.get(server.url + "/v1/me", headers={"Sec-Fetch-Mode": "cors"})
    assert r.status_code == 401 and "www-authenticate" not in r.headers  # no browser prompt over the page
    assert "www-authenticate" in httpx.get(server.url + "/v1/me").headers
    token = httpx.post(server.url + "/v1/tokens", auth=(USER, PASSWORD)).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(server.url + "/v1/me", headers=bearer).status_code == 200
    assert httpx.delete(server.url + "/v1/tokens", headers=bearer).json() == {"revoked": True}
    assert httpx.get(server.url + "/v1/me", headers=bearer).status_code == 401


def test_errors_name_their_field(http):
    for body, field in [({"steps": 500}, "steps"), ({"width": 65}, "width"), ({"sampler": "nope"}, "sampler"),
                        ({"schedule": "nope"}, "schedule"), ({"seed": -5}, "seed"), ({"model": "x"}, "model"),
                        ({"batch_size": 9}, "batch_size"), ({"prompt": "<lora:missing:1>"}, "prompt")]:
        r = http.post("/v1/jobs", json={"task": "txt2img", **body})
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)


def test_images_the_safety_checker_flagged_are_said_to_be(browser, tmp_path):
    from test_safety import fixed_checker

    checker = fixed_checker(tmp_path / "checker", -2.0)  # flags every image
    with Server(tmp_path / "out", f"--safety-checker={checker}") as server:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.goto(server.url + "/")
            ready(page)  # a loopback server without users: no sign-in
            form(page, prompt=PROMPT, steps=2, seed=3)
            page.locator("#size-preset").select_option("64x64")
            images = generate(page)
            page.get_by_text("Done: 1 image(s), 1 flagged by the safety checker (shown black).").wait_for()
            assert not pixels(shown_image(images.first)).any()
            note = page.locator("#results p.flagged")
            assert note.text_content() == "flagged by the safety checker: the image was replaced by a black one"
            images.first.click()
            assert page.locator("#viewer-info").text_content().startswith("flagged by the safety checker")
        finally:
            context.close()
