"""The worker: the only code of the server that calls the model. It takes jobs from the store (a batch of those
that can share one), renders them, writes their images whole and only then marks them done; it reports each step,
a preview every few steps, and stops within a step when a job is cancelled or the server stops."""
import gc
import io
import shutil
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from stablediff import tasks
from stablediff.errors import UserError, out_of_memory
from stablediff.files import write_png
from stablediff.server.store import Store, image_file, input_file

log = logging.getLogger("stablediff.server")

# AUTOMATIC1111's "Approx cheap" preview: a fixed 4x3 matrix on the sampler's latent x0, no bias, then (x+1)/2
CHEAP_APPROX = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


class Cancelled(Exception):
    """A job of the running batch was cancelled."""


class Stopping(Exception):
    """The server is stopping: the running batch goes back to the queue."""


@dataclass
class Live:
    """What the worker knows of a running job between store updates: its preview."""

    preview: bytes | None = None  # a PNG at the latent's size
    preview_step: int = 0
    started: float = field(default_factory=time.time)


def preview_png(latent) -> bytes:
    """A (4, h, w) latent as a small PNG by the cheap approximation (no VAE call)."""
    import torch
    from PIL import Image

    rgb = torch.einsum("chw,cr->hwr", latent.float().cpu(), torch.tensor(CHEAP_APPROX))
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class Worker:
    def __init__(self, store: Store, outdir: Path, models: dict[str, Path], *, device: str = "auto",
                 dtype: str | None = None, lora_dir: Path | None = None, embeddings_dir: Path | None = None,
                 safety_checker: Path | None = None, watermark: str | None = None, max_batch: int = 4, max_pixels: int, preview_every: int = 2, on_change=lambda job_ids: None):
        self.store, self.outdir, self.models, self.on_change = store, outdir, models, on_change
        self.load_options = dict(device=device, dtype=dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                 safety_checker=safety_checker, watermark=watermark)
        self.max_batch, self.max_pixels, self.preview_every = max_batch, max_pixels, preview_every
        self.live: dict[str, Live] = {}
        self.loaded: tuple[str, object] | None = None
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self.run, name="stablediff-worker", daemon=True)

    # --- the loop -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        from stablediff.devices import one_heap, resolve_device

        one_heap(resolve_device(self.load_options["device"]))  # before the thread starts: it renders on the main heap
        self.thread.start()
        threading.Thread(target=self.hash_models, name="stablediff-hashes", daemon=True).start()

    def stop(self, timeout: float = 60) -> None:
        """Stop within a step: a batch cut short goes back to the queue, nothing half-written is left."""
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout)

    def run(self) -> None:
        try:  # the default model, before the first job asks for it; a model that cannot load fails its jobs
            self.model(next(iter(self.models)))
        except Exception as e:
            log.error("the model could not be loaded: %s", e)
        while not self.stopping.is_set():
            try:
                jobs = self.store.claim(self.max_batch)
            except Exception:  # the store failed to answer (a locked or full disk): say so, and try again
                log.exception("could not take a job from the queue")
                jobs = []
            if not jobs:
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            self.run_batch(jobs)

    def hash_models(self) -> None:
        """AUTOMATIC1111's model hashes for its /sd-models titles, computed once and cached in the user cache."""
        from stablediff.checkpoints.hashing import cached_hash, compute_hash

        for path in self.models.values():
            if self.stopping.is_set():
                return
            if path.is_file() and cached_hash(path) is None:
                compute_hash(path)

    def run_batch(self, jobs) -> None:
        ids = [j.id for j in jobs]
        for job in jobs:
            self.live[job.id] = Live()
        try:
            results = self.render(jobs)
            for job in jobs:  # images on disk first, then the state
                self.store.finish(job.id, "done", self.write(job, results[job.id]))
            self.on_change(ids)
            return
        except Cancelled:
            for job in jobs:
                if self.store.cancel_requested([job.id]):
                    self.store.finish(job.id, "cancelled", error="cancelled while it ran")
            self.store.requeue([i for i in ids if self.store.get(i).state == "running"], count_attempt=False)
        except Stopping:
            self.store.requeue(ids, count_attempt=False)
        except UserError as e:
            self._fail(ids, str(e))
        except Exception as e:  # the job fails with its reason; the server keeps serving
            self._fail(ids, _failure(e))
        finally:
            for i in ids:
                self.live.pop(i, None)
        self.on_change(ids)
        self._free_memory()  # after a batch cut short: what it held goes back (a finished one's is reused as it is)

    def _fail(self, ids: list[str], reason: str) -> None:
        for i in ids:
            self.store.finish(i, "failed", error=reason)

    def _free_memory(self) -> None:
        """What a batch (finished, failed or cut short) held goes back: to the CUDA cache's owner, or the system."""
        gc.collect()
        if self.loaded is not None:
            import torch

            from stablediff.devices import give_back_freed_memory

            device = self.loaded[1].device
            give_back_freed_memory(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # --- rendering ------------------------------------------------------------------------------------------------

    def model(self, name: str):
        """The model `name`, loaded (one at a time: another is let go first)."""
        if self.loaded is None or self.loaded[0] != name:
            from stablediff.api import StableDiffusion

            self.loaded = None  # the model before goes first: two need not fit at once
            gc.collect()
            model = StableDiffusion.load(self.models[name], **self.load_options)
            model.max_pixels = self.max_pixels
            self.loaded = (name, model)
        return self.loaded[1]

    def render(self, jobs) -> dict[str, list]:
        """Every job's images: one call of the Python API per batch, n_iter batches (the same for every job of a
        batch key); job j's image i of batch k has the seed it has alone, seed_j + k * batch_size_j + i."""
        first = jobs[0].params
        model = self.model(first["model"])
        prompts, negatives, owner_of = [], [], []
        for job in jobs:
            n = job.params["batch_size"]
            prompts += [job.params["prompt"]] * n
            negatives += [job.params["negative_prompt"]] * n
            owner_of += [job.id] * n
        steps = tasks.sampling_steps(jobs[0].task, first)
        out = {job.id: [] for job in jobs}
        iterations = first["n_iter"]
        for it in range(iterations):
            batch_seeds = [j.params["seed"] + it * j.params["batch_size"] + i for j in jobs
                           for i in range(j.params["batch_size"])]
            callback = self._callback(jobs, owner_of, steps, it, iterations, len(prompts))
            images = self.call(model, jobs[0].task, first, prompts, negatives, batch_seeds, callback)
            for job_id, image in zip(owner_of, images):
                out[job_id].append(image)
        return out

    def _callback(self, jobs, owner_of: list[str], steps: int, it: int, iterations: int, per_batch: int):
        ids = [j.id for j in jobs]
        firsts = {job_id: owner_of.index(job_id) for job_id in ids}
        done = [0]

        def callback(i, x, denoised):
            if self.stopping.is_set():
                raise Stopping
            if self.store.cancel_requested(ids):
                raise Cancelled
            done[0] += 1
            self.store.progress(ids, {"step": min(done[0], steps), "steps": steps, "image": it * per_batch + 1,
                                      "images": iterations * per_batch, "batch": it + 1, "batches": iterations,
                                      "at": time.time()})
            if self.preview_every and done[0] % self.preview_every == 0 and denoised is not None:
                for job_id, row in firsts.items():
                    live = self.live.get(job_id)
                    if live is not None:
                        live.preview, live.preview_step = preview_png(denoised[row]), done[0]
            self.on_change(ids)
        return callback

    def call(self, model, task: str, p: dict, prompts, negatives, seeds, callback):
        """One batch through the Python API, the parameters as tasks.py names them."""
        from stablediff.pipelines.hires import Hires

        shared = {k: p[k] for k in ("steps", "sampler", "schedule", "scale", "eta", "clip_skip", "subseed",
                                     "subseed_strength")}
        shared.update(seed=seeds, callback=callback)
        image = self.input(p.get("image"))
        if task == "txt2img":
            hires = Hires(p["hires_scale"], p["hires_steps"], p["hires_denoise"], p["hires_upscaler"]) \
                if p["hires_scale"] else None
            return model.txt2img(prompts, negatives, width=p["width"], height=p["height"], hires=hires, **shared)
        if task == "upscale":
            return model.upscale(image, prompts, negatives, noise_level=p["noise_level"], tile=p["tile"],
                                 overlap=p["overlap"], **shared)
        if task == "outpaint":
            return model.outpaint(image, prompts, negatives, extend=p["extend"], mask_blur=p["mask_blur"],
                                  fill=p["fill"], **shared)
        shared.update(width=p["width"], height=p["height"], strength=p["strength"], resize_mode=p["resize_mode"])
        if task == "img2img":
            return model.img2img(image, prompts, negatives, **shared)
        if task == "depth2img":
            depth = self.input(p.get("depth_map"))
            return model.depth2img(image, prompts, negatives, depth_map=depth.convert("F") if depth else None, **shared)
        return model.inpaint(image, self.input(p["mask"]).convert("L"), prompts, negatives, fill=p["fill"],
                             mask_blur=p["mask_blur"], invert_mask=p["invert_mask"], only_masked=p["only_masked"],
                             padding=p["padding"], **shared)

    def input(self, ref: str | None):
        """An uploaded image by its reference (its SHA-256, stored under inputs/ when the job was accepted)."""
        from PIL import Image

        if ref is None:
            return None
        with Image.open(input_file(self.outdir, ref)) as image:
            return image.convert("RGB")

    def write(self, job, images) -> list[dict]:
        """The job's PNGs, each whole (renamed into place), exactly as the command line writes them."""
        folder = image_file(self.outdir, job.id, 0).parent
        if folder.is_dir():  # what a run cut short by a crash left (a temporary file): this run's result replaces it
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        out = []
        for n, image in enumerate(images):
            write_png(image, image_file(self.outdir, job.id, n), image.info.get("parameters"), durable=True)
            out.append({"n": n, "seed": job.params["seed"] + n, "infotext": image.info.get("parameters", ""),
                        **{k: image.info[k] for k in ("nsfw", "watermark") if k in image.info}})
        return out

    def memory(self) -> dict:
        """The accelerator's memory as AUTOMATIC1111's /memory reports it."""
        if "torch" not in sys.modules:
            return {"error": "no model loaded yet"}
        import torch

        if not torch.cuda.is_available():
            return {"error": "no CUDA device"}
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
        return {"system": {"free": free, "used": total - free, "total": total},
                "active": {"current": stats.get("active_bytes.all.current", 0), "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)}}


def _failure(e: Exception) -> str:
    """One line for a job that failed on something other than its request."""
    line = out_of_memory(e) if isinstance(e, (MemoryError, RuntimeError)) else None
    if line is None:
        log.error("a job failed:\n%s", "".join(traceback.format_exception(e)))
        line = f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else 'no message'})"
    return line
