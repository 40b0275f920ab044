"""What both APIs do with jobs, once: accept (check, store the inputs, queue), describe, cancel, wait. Routes only
translate HTTP to these and back; nothing here touches torch."""
import asyncio
import base64
import binascii
import hashlib
import io
import json
import random
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from stablediff import checks, tasks
from stablediff.adapters.files import embedding_files, lora_file, lora_files
from stablediff.errors import UserError, about
from stablediff.safety import FLAGGED, check_watermark_size
from stablediff.server.auth import User
from stablediff.server.store import FINAL, Job, Store

_LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class TooLarge(UserError):
    """A request or one of its images is larger than the server takes (413)."""


class NotFound(UserError):
    """No such job or image of this user's (404): another user's is not found either."""


@dataclass
class Limits:
    max_queued: int = 100
    max_queued_per_user: int = 20
    max_pixels: int = checks.MAX_PIXELS
    max_steps: int = 150
    max_images: int = 16  # per job: batch_size x n_iter
    max_prompt: int = 5000  # characters
    max_upload: int = 20 * 2**20  # bytes of one request
    max_batch: int = 4  # images rendered together, from one job or several


class Changes:
    """Wakes what waits on a job (a blocking AUTOMATIC1111 call, an event stream) when the worker reports that it
    changed, from the worker's thread: no polling, which took the worker's CPU and GIL (20% per demo image)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.waiting: dict[str, set] = {}

    def notify(self, job_ids) -> None:
        with self.lock:
            entries = [e for job_id in job_ids for e in self.waiting.get(job_id, ())]
        for loop, event in entries:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, timeout: float) -> None:
        """Until the job changes, or `timeout` seconds (a change made elsewhere is seen then)."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self.lock:
            self.waiting.setdefault(job_id, set()).add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self.lock:
                self.waiting[job_id].discard(entry)
                if not self.waiting[job_id]:
                    del self.waiting[job_id]


@dataclass
class Services:
    """The server's parts, as the routes see them."""

    store: Store
    worker: object | None  # worker.Worker; None: `stablediff worker` processes render (a shared queue)
    outdir: Path
    models: dict[str, Path]
    limits: Limits
    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    default_model: str = ""
    models_dir: Path | None = None
    watermark: str | None = None  # every image is watermarked: it must be large enough
    settings: dict = field(default_factory=dict)  # AUTOMATIC1111's options that apply to every job (clip skip)
    changes: Changes = field(default_factory=Changes)

    def wake(self) -> None:
        """A job was queued: the server's own worker looks at once (others look within a fraction of a second)."""
        if self.worker is not None:
            self.worker.wake.set()

    def model_name(self) -> str:
        name = self.store.setting("sd_model_checkpoint", self.default_model)
        return name if name in self.models else self.default_model

    def refresh_models(self) -> None:
        self.models.update(find_models(self.models[self.default_model], self.models_dir))


def find_models(model: Path, models_dir: Path | None) -> dict[str, Path]:
    """The models a job may name: the server's own, and the checkpoints and diffusers folders of --models-dir. A
    job names one of these keys; no name from a request is ever used as a path."""
    found = {model.name: model}
    if models_dir is not None and models_dir.is_dir():
        for path in sorted(models_dir.iterdir()):
            if path.suffix in MODEL_SUFFIXES and path.is_file() or (path / "model_index.json").is_file():
                found.setdefault(path.name, path)
    return found


def decode_image(value, what: str, limits: Limits):
    """A PIL image from base64 (raw or a data: URI) or bytes, within the pixel limit; a 4xx for anything else."""
    from PIL import Image

    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise UserError(f"{what}: not base64 (send a PNG or JPEG as base64, a data: URI or a multipart upload)") from None
    if not isinstance(value, (bytes, bytearray)):
        raise UserError(f"{what}: expected an image as base64 text")
    try:
        image = Image.open(io.BytesIO(value))
        if image.width * image.height > limits.max_pixels:
            raise TooLarge(f"{what} is {image.width}x{image.height}, over the server's {limits.max_pixels:,} pixels")
        image.load()
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{what}: not an image the server can read ({str(e)[:120]})") from None
    return image


def _input(image) -> tuple[str, object]:
    """An uploaded image as the job refers to it: (the hash of its pixels, the image to keep under that name)."""
    rgb = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
    return hashlib.sha256(rgb.mode.encode() + repr(rgb.size).encode() + rgb.tobytes()).hexdigest(), rgb


def _keep_inputs(svc: Services, inputs: dict) -> None:
    """The images of an accepted job as PNGs in the store, where any worker finds them (an identical one is kept
    once)."""
    for digest, image in inputs.items():
        out = io.BytesIO()
        image.save(out, format="PNG")
        svc.store.keep_input(digest, out.getvalue())


def _check_loras(svc: Services, prompt: str, negative: str) -> list[str]:
    """The prompt's LoRA tags in order (name and weights: the batch key, as one batch merges one list of them), each
    tag of either prompt naming a file of the LoRA folder (no name may reach outside it)."""
    tags = [m.strip() for m in _LORA_TAG.findall(prompt)]
    for name in sorted({tag.split(":")[0].strip() for tag in tags + _LORA_TAG.findall(negative)}):
        checks.check_name(name, f"<lora:{name}>")  # with no LoRA folder too: a bad name is said as such
        if svc.lora_dir is None or lora_file(svc.lora_dir, name) is None:
            raise UserError(f"<lora:{name}>: no such LoRA on this server (GET /v1/loras lists them)")
    return tags


def submit(svc: Services, user: User, body: dict, uploads: dict | None = None) -> Job:
    """Check a request and queue it: its task, model and parameters, its images stored, seeds drawn."""
    body = dict(body)
    task = body.pop("task", None)
    if task not in tasks.TASKS:
        raise UserError(f"task {task!r}: send one of {', '.join(tasks.TASKS)}")
    model = body.pop("model", None) or svc.model_name()
    if not isinstance(model, str) or model not in svc.models:
        with about("model"):
            raise UserError(f"model {model!r} is not on this server; it has: {', '.join(svc.models)}")
    inputs = {}
    for name, p in tasks.params(task).items():
        given = (uploads or {}).get(name, body.get(name))
        if p.kind is tasks.IMAGE and given is not None:
            with about(name):
                body[name], image = _input(decode_image(given, name, svc.limits))
                inputs[body[name]] = image
                if task == "upscale" and name == "image":  # what it makes: 4x each side
                    checks.check_pixels(image.width * 4, image.height * 4, svc.limits.max_pixels,
                                        "the server's --max-pixels")
    params = tasks.validate(task, body, svc.limits.max_pixels)
    _check_limits(params, svc.limits)
    _check_watermark(svc, params)
    with about("prompt"):
        loras = _check_loras(svc, params["prompt"], params["negative_prompt"])
    _keep_inputs(svc, inputs)  # only once every check has passed: a refused request leaves no file
    with about("seed"):
        params["seed"] = checks.seeds(params["seed"], params["batch_size"] * params["n_iter"])[0]
    if params["subseed_strength"] and params["subseed"] in (None, -1):
        params["subseed"] = random.randrange(2**32)
    params["model"] = model
    job = Job(id=uuid.uuid4().hex, owner=user.name, task=task, params=params, batch_key=batch_key(task, params, loras))
    return svc.store.add(job, svc.limits.max_queued, svc.limits.max_queued_per_user)


def _check_limits(p: dict, limits: Limits) -> None:
    for name in ("steps", "hires_steps"):
        if (p.get(name) or 0) > limits.max_steps:
            with about(name):
                raise UserError(f"{name} {p[name]}: this server takes at most {limits.max_steps}")
    if p["batch_size"] * p["n_iter"] > limits.max_images:
        with about("n_iter"):
            raise UserError(f"batch_size x n_iter = {p['batch_size'] * p['n_iter']}: this server makes at most "
                            f"{limits.max_images} images per job")
    if p["batch_size"] > limits.max_batch:
        with about("batch_size"):
            raise UserError(f"batch_size {p['batch_size']}: this server renders at most {limits.max_batch} at once; "
                            "use n_iter for more")
    for name in ("prompt", "negative_prompt"):
        if len(p[name]) > limits.max_prompt:
            with about(name):
                raise TooLarge(f"{name} is {len(p[name]):,} characters; this server takes at most "
                               f"{limits.max_prompt:,}")
    if p.get("hires_scale") and p.get("width") and p.get("height"):
        from stablediff.pipelines.hires import Hires

        with about("hires_scale"):
            checks.check_pixels(*Hires(p["hires_scale"]).size(p["width"], p["height"]), limits.max_pixels,
                                "the server's --max-pixels")


def _check_watermark(svc: Services, p: dict) -> None:
    """Where the server watermarks, a txt2img job's images are large enough for it (other sizes are the inputs' and
    are checked as the job runs)."""
    if svc.watermark is None or not (p.get("width") and p.get("height")) or "extend" in p or "noise_level" in p:
        return
    size = (p["width"], p["height"])
    if p.get("hires_scale"):
        from stablediff.pipelines.hires import Hires

        size = Hires(p["hires_scale"]).size(*size)
    with about("width"):
        check_watermark_size(*size)


def batch_key(task: str, params: dict, loras: list[str]) -> str:
    """Jobs of equal keys can share one UNet batch: everything but the prompts, seeds and image counts is equal."""
    if params["subseed_strength"]:  # variation seeds count on across a batch's images: such a job renders alone
        return uuid.uuid4().hex
    shared = {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt", "seed", "batch_size", "subseed")}
    text = json.dumps({"task": task, "loras": loras, **shared}, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def owned(svc: Services, user: User, job_id: str) -> Job:
    """The job, if this user may see it (its owner, or an admin); else NotFound, as if there were none."""
    job = svc.store.get(job_id) if re.fullmatch(r"[0-9a-f]{32}", job_id or "") else None
    if job is None or (job.owner != user.name and not user.admin):
        raise NotFound(f"no job {job_id}")
    return job


def eta_seconds(job: Job) -> float | None:
    """Seconds left: the time per step so far times the steps to go (this batch and the batches after)."""
    p = job.progress
    if job.state != "running" or not p.get("step") or not job.started:
        return None
    per_step = (p["at"] - job.started) / (p["step"] + (p["batch"] - 1) * p["steps"])
    return round(per_step * (p["steps"] - p["step"] + (p["batches"] - p["batch"]) * p["steps"]), 2)


def describe(svc: Services, job: Job, base: str = "/v1") -> dict:
    """A job as GET /v1/jobs/{id} gives it."""
    progress = {k: job.progress[k] for k in ("step", "steps", "image", "images", "batch", "batches")
                if k in job.progress}
    images = {name for name, p in tasks.params(job.task).items() if p.kind is tasks.IMAGE}  # references, not data
    return {"id": job.id, "task": job.task, "state": job.state, "position": svc.store.position(job),
            "progress": progress, "eta_seconds": eta_seconds(job), "error": job.error, "model": job.params.get("model"),
            "created": job.created, "started": job.started, "finished": job.finished,
            "images": [image_entry(im, f"{base}/images/{job.id}/{im['n']}.png") for im in job.images],
            "inputs": {k: f"{base}/jobs/{job.id}/inputs/{k}.png" for k in images if job.params.get(k)},
            "params": {k: v for k, v in job.params.items() if k not in images}}


def image_entry(im: dict, url: str) -> dict:
    """One image of a job as the API gives it: where it is, its seed and infotext, and, where the server screens or
    watermarks, whether the safety checker flagged it (then it is black, and `warning` says so) and whether the
    watermark reads back from it (null: not screened, not watermarked)."""
    entry = {"url": url, "seed": im["seed"], "infotext": im["infotext"], "nsfw_content_detected": im.get("nsfw"),
             "watermark": im.get("watermark")}
    if im.get("nsfw"):
        entry["warning"] = f"{FLAGGED}: the image was replaced by a black one"
    return entry


def cancel(svc: Services, user: User, job_id: str) -> str:
    owned(svc, user, job_id)
    state = svc.store.request_cancel(job_id)
    svc.changes.notify([job_id])
    return state


def image_png(svc: Services, user: User, job_id: str, n: int) -> bytes:
    job = owned(svc, user, job_id)
    data = svc.store.image(job.id, n) if any(im["n"] == n for im in job.images) else None
    if data is None:
        raise NotFound(f"job {job_id} has no image {n}")
    return data


def input_png(svc: Services, user: User, job_id: str, name: str) -> bytes:
    """A job's input image (its `image`, `mask`, ...) as the server keeps it: a PNG by the hash of its pixels."""
    job = owned(svc, user, job_id)
    p = tasks.params(job.task).get(name)
    data = svc.store.input(job.params[name]) if p is not None and p.kind is tasks.IMAGE and job.params.get(name) \
        else None
    if data is None:
        raise NotFound(f"job {job_id} has no input image {name!r}")
    return data


async def wait(svc: Services, job_id: str) -> Job:
    """The job once it has ended (done, failed or cancelled)."""
    while True:
        job = svc.store.get(job_id)
        if job.state in FINAL:
            return job
        await svc.changes.wait(job_id, 1.0)


def running_of(svc: Services, user: User) -> Job | None:
    """The user's job that is running now (an admin: any), for AUTOMATIC1111's /progress and /interrupt."""
    for job in svc.store.jobs_of(None if user.admin else user.name, 50, 0):
        if job.state == "running":
            return job
    return None


def preview(svc: Services, job: Job) -> bytes | None:
    found = svc.store.preview(job.id)
    return found[1] if found is not None else None


def lora_names(svc: Services) -> list[dict]:
    if svc.lora_dir is None:
        return []
    return [{"name": p.stem, "path": str(p.relative_to(svc.lora_dir))} for p in lora_files(svc.lora_dir)]


def embedding_names(svc: Services) -> list[str]:
    if svc.embeddings_dir is None:
        return []
    return sorted(embedding_files(svc.embeddings_dir))
