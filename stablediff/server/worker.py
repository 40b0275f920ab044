"""The worker: the only code of the server that calls the model, in the server's process or alone (`stablediff
worker`, on a shared PostgreSQL queue). It takes jobs from the store (a batch of those that can share one), renders
them, and stores their images with their done state; it reports each step, a preview every few steps, beats while it
renders (a shared queue), and stops within a step when a job is cancelled or it is told to stop."""
import gc
import io
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from stablediff import tasks
from stablediff.errors import UserError, failure
from stablediff.files import png_bytes
from stablediff.render import render
from stablediff.server.store import Store

log = logging.getLogger("stablediff.server")

# AUTOMATIC1111's "Approx cheap" preview: a fixed 4x3 matrix on the sampler's latent x0, no bias, then (x+1)/2
CHEAP_APPROX = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


class Cancelled(Exception):
    """A job of the running batch was cancelled."""


class Stopping(Exception):
    """The server is stopping: the running batch goes back to the queue."""


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
    def __init__(self, store: Store, models: dict[str, Path], *, device: str = "auto",
                 dtype: str | None = None, lora_dir: Path | None = None, embeddings_dir: Path | None = None,
                 safety_checker: Path | None = None, watermark: str | None = None, max_batch: int = 4,
                 max_pixels: int, preview_every: int = 2, on_change=lambda job_ids: None, beat_every: float = 5):
        self.store, self.models, self.on_change = store, models, on_change
        self.load_options = dict(device=device, dtype=dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                                 safety_checker=safety_checker, watermark=watermark)
        self.max_batch, self.max_pixels, self.preview_every = max_batch, max_pixels, preview_every
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # its jobs' `worker` in the store
        self.beat_every = beat_every
        self.running: list[str] = []  # the jobs of the batch it renders now, for its heartbeat
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
        if self.store.shared:
            threading.Thread(target=self.heartbeat, name="stablediff-heartbeat", daemon=True).start()

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
                jobs = self.store.claim(self.max_batch, self.id, set(self.models))
            except Exception:  # the store failed to answer (a locked or full disk): say so, and try again
                log.exception("could not take a job from the queue")
                jobs = []
            if not jobs:
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            self.run_batch(jobs)

    def heartbeat(self) -> None:
        """While a batch runs, the store hears from this worker every beat_every seconds, whatever the model is
        doing (a long VAE decode too): a worker that stops beating has its jobs run elsewhere."""
        while not self.stopping.wait(self.beat_every):
            try:
                self.store.beat(self.id, list(self.running))
            except Exception as e:
                log.warning("could not send a heartbeat: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)

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
        self.running = ids
        try:
            results = self.render(jobs)
            for job in jobs:  # the images are stored with the state (SQLite: on disk first)
                entries, files = self.encode(job, results[job.id])
                self.store.finish(job.id, "done", entries, files=files, worker=self.id)
            self.on_change(ids)
            return
        except Cancelled:
            for job in jobs:
                if self.store.cancel_requested([job.id]):
                    self.store.finish(job.id, "cancelled", error="cancelled while it ran", worker=self.id)
            self.store.requeue([i for i in ids if self.store.get(i).state == "running"], count_attempt=False,
                               worker=self.id)
        except Stopping:
            self.store.requeue(ids, count_attempt=False, worker=self.id)
        except UserError as e:
            self._fail(ids, str(e))
        except Exception as e:  # the job fails with its reason; the server keeps serving
            self._fail(ids, failure(e))
        finally:
            self.running = []
        self.on_change(ids)
        self._free_memory()  # after a batch cut short: what it held goes back (a finished one's is reused as it is)

    def _fail(self, ids: list[str], reason: str) -> None:
        for i in ids:
            self.store.finish(i, "failed", error=reason, worker=self.id)

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
        first = jobs[0].params
        model = self.model(first["model"])
        steps = tasks.sampling_steps(jobs[0].task, {**first, "steps": first["steps"] or model.sampling["steps"]})
        return render(model, jobs, self.input,
                      lambda owner_of, it, iterations, per_batch: self._callback(jobs, owner_of, steps, it, iterations,
                                                                                 per_batch))

    def _callback(self, jobs, owner_of: list[str], steps: int, it: int, iterations: int, per_batch: int):
        ids = [j.id for j in jobs]
        firsts = {job_id: owner_of.index(job_id) for job_id in ids}
        done = [0]

        def callback(i, x, denoised):
            if self.stopping.is_set():
                raise Stopping
            done[0] += 1
            if self.store.progress(ids, {"step": min(done[0], steps), "steps": steps, "image": it * per_batch + 1,
                                         "images": iterations * per_batch, "batch": it + 1, "batches": iterations,
                                         "at": time.time()}, worker=self.id):
                raise Cancelled
            if self.preview_every and done[0] % self.preview_every == 0 and denoised is not None:
                for job_id, row in firsts.items():
                    self.store.set_preview(job_id, done[0], preview_png(denoised[row]))
            self.on_change(ids)
        return callback

    def input(self, ref: str | None):
        """An uploaded image by its reference (the SHA-256 it was kept under in the store when the job was accepted)."""
        from PIL import Image

        if ref is None:
            return None
        data = self.store.input(ref)
        if data is None:
            raise UserError(f"the job's input image {ref[:12]}... is missing from the queue's store")
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    def encode(self, job, images) -> tuple[list[dict], list[bytes]]:
        """The job's image entries and PNGs, the PNGs exactly as the command line writes them."""
        entries = [{"n": n, "seed": job.params["seed"] + n, "infotext": image.info.get("parameters", ""),
                    **{k: image.info[k] for k in ("nsfw", "watermark") if k in image.info}}
                   for n, image in enumerate(images)]
        return entries, [png_bytes(image, image.info.get("parameters")) for image in images]

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
