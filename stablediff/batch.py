"""`stablediff batch`: many jobs from a file, in this process or on a Ray cluster (Ray Data: an actor per GPU, or per
node where there are none, loads the model once and renders jobs one by one). Every job has an id (its own, or the
hash of what it asks), its images are written whole under that id, then its record; the record is the commit: a
rerun skips every job whose record says done, and a task retried after a lost actor finds it too. A job that fails
is recorded with its one-line reason; the rest go on. At the end manifest.jsonl lists every job of the file.

Seeds are per image, so a job makes the same pixels on any worker of any cluster as alone in this process."""
import base64
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from stablediff import checks, tasks
from stablediff.errors import UserError, about, failure

MANIFEST = "manifest.jsonl"
RECORDS = "jobs"  # OUTDIR/jobs/ID.json: one job's end, written after its images
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


@dataclass
class BatchJob:
    id: str
    task: str
    params: dict
    line: int
    inputs: dict  # reference -> PNG/JPEG bytes as base64 (the job carries its pictures to any machine)

    def as_dict(self) -> dict:
        return vars(self)


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1,2,10-19`: seeds and inclusive ranges."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        try:
            out += list(range(int(low), int(high) + 1)) if high else [int(low)]
        except ValueError:
            raise UserError(f"--seeds {text}: give seeds and ranges, e.g. 1,2,10-19") from None
    return checks.check_seed_list(out, "--seeds")


def read_jobs(path: Path, seeds: list[int] | None = None, max_pixels: int = checks.MAX_PIXELS) -> list[BatchJob]:
    """The jobs of a JSON Lines file (an object a line: the parameters the server's /v1/jobs takes, with `task`
    (default txt2img), `model`, `id`, and input images as paths relative to the file), or of a prompts file (a
    prompt a line; # comments). --seeds: every line once per seed. The same job twice is one job."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    jsonl = path.suffix in (".jsonl", ".ndjson") or next((ln.lstrip()[:1] == "{" for ln in lines if ln.strip()), False)
    jobs, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        try:
            body = json.loads(line) if jsonl else {"prompt": line.strip()}
        except ValueError as e:
            raise UserError(f"{path} line {number}: not JSON ({e.msg}); write one job object a line") from None
        if not isinstance(body, dict):
            raise UserError(f"{path} line {number}: a job is a JSON object, {{\"prompt\": \"...\"}}")
        for seed in seeds or [None]:
            job = _job(dict(body, **({"seed": seed} if seed is not None else {})), number, path.parent, max_pixels,
                       with_seed=seeds is not None and len(seeds) > 1)
            if job.id not in seen:
                seen.add(job.id)
                jobs.append(job)
    if not jobs:
        raise UserError(f"{path}: no jobs in it (a prompt a line, or a JSON object a line)")
    return jobs


def _job(body: dict, number: int, base: Path, max_pixels: int, with_seed: bool) -> BatchJob:
    try:
        task = body.pop("task", "txt2img")
        if task not in tasks.TASKS:
            raise UserError(f"task {task!r}: give one of {', '.join(tasks.TASKS)}")
        model, given_id = body.pop("model", None), body.pop("id", None)
        if given_id is not None and not (isinstance(given_id, str) and _ID.fullmatch(given_id)):
            raise UserError(f"id {given_id!r}: letters, digits, '.', '_' and '-', at most 100 (it names the files)")
        inputs = {}
        for name, p in tasks.params(task).items():
            if p.kind is tasks.IMAGE and body.get(name) is not None:
                with about(name):
                    data = _read_input(base, body[name], name)
                    body[name] = hashlib.sha256(data).hexdigest()
                    inputs[body[name]] = base64.b64encode(data).decode()
        params = tasks.validate(task, body, max_pixels)
        asked = json.dumps({"task": task, "model": model, **params}, sort_keys=True, default=list)
        job_id = given_id or hashlib.sha256(asked.encode()).hexdigest()[:20]
        params["seed"] = checks.seeds(params["seed"], params["batch_size"] * params["n_iter"])[0]
        params["model"] = model
    except UserError as e:
        where = f" ({e.field})" if e.field else ""
        raise UserError(f"line {number}{where}: {e}") from None
    return BatchJob(job_id, task, params, number, inputs)


def _read_input(base: Path, value, name: str) -> bytes:
    if not isinstance(value, str):
        raise UserError(f"{name}: give the image's path, relative to the jobs file")
    path = base / value
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{name} {value}: cannot be read ({e.strerror or e})") from None


# --- where the results go: a local folder or any file system pyarrow reaches (s3://, gs://, hdfs://) -------------

def filesystem(outdir: str):
    """(pyarrow file system, root path) of a folder or URI, the folder made."""
    from pyarrow import fs

    try:
        system, root = fs.FileSystem.from_uri(outdir if "://" in outdir else str(Path(outdir).resolve()))
        system.create_dir(f"{root}/{RECORDS}", recursive=True)
    except Exception as e:  # pyarrow's errors: an unknown scheme, no access
        raise UserError(f"--outdir {outdir}: cannot be written ({str(e).splitlines()[0][:200]})") from None
    return system, root


def write_file(system, path: str, data: bytes) -> None:
    """A whole file: a local one under a temporary name then renamed (the name is the job's, so a retry after a
    lost worker takes the same one and leaves none behind); an object store publishes an object whole on close."""
    from pyarrow import fs

    local = isinstance(system, fs.LocalFileSystem)
    tmp = f"{path.rsplit('/', 1)[0]}/.{path.rsplit('/', 1)[1]}.tmp" if local else path
    with system.open_output_stream(tmp) as out:
        out.write(data)
    if local:
        system.move(tmp, path)


def read_file(system, path: str) -> bytes | None:
    from pyarrow import fs

    if system.get_file_info(path).type != fs.FileType.File:
        return None
    with system.open_input_stream(path) as f:
        return f.read()


def done_records(system, root: str) -> dict[str, dict]:
    """The records of jobs that are done, by id."""
    from pyarrow import fs

    found = {}
    for info in system.get_file_info(fs.FileSelector(f"{root}/{RECORDS}", allow_not_found=True)):
        if info.type == fs.FileType.File and info.base_name.endswith(".json"):
            record = json.loads(read_file(system, info.path))
            if record.get("state") == "done":
                found[record["id"]] = record
    return found


class Renderer:
    """Renders jobs and writes their results: one in this process, or one per Ray actor (Ray Data calls it with a
    batch of jobs as JSON text and gets their records back)."""

    def __init__(self, outdir: str, model: str, models_dir: str | None = None, threads: int | None = None,
                 **load_options):
        from stablediff.server.jobs import find_models

        if threads:
            import torch

            torch.set_num_threads(threads)
        self.system, self.root = filesystem(outdir)
        self.models = find_models(Path(model), Path(models_dir) if models_dir else None)
        self.default, self.load_options, self.loaded = Path(model).name, load_options, None

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        return {"record": np.array([json.dumps(self.one(BatchJob(**json.loads(text)))) for text in batch["job"]])}

    def model(self, name: str | None):
        from stablediff.api import StableDiffusion

        name = name or self.default
        if name not in self.models:
            raise UserError(f"model {name!r} is not here; there are: {', '.join(self.models)} (--models-dir)")
        if self.loaded is None or self.loaded[0] != name:
            self.loaded = None
            self.loaded = (name, StableDiffusion.load(self.models[name], **self.load_options))
        return self.loaded[1]

    def one(self, job: BatchJob) -> dict:
        """Render one job alone (so it is what it is in any run) and write its PNGs, then its record."""
        from PIL import Image

        from stablediff.files import png_bytes
        from stablediff.render import render

        record_path = f"{self.root}/{RECORDS}/{job.id}.json"
        if (found := read_file(self.system, record_path)) is not None and json.loads(found)["state"] == "done":
            return json.loads(found)  # a task run again after its actor was lost: this job was finished

        def load_input(ref):
            return None if ref is None else Image.open(io.BytesIO(base64.b64decode(job.inputs[ref]))).convert("RGB")
        record = {"id": job.id, "line": job.line, "task": job.task, "model": job.params["model"] or self.default}
        try:
            images = render(self.model(job.params["model"]), [job], load_input)[job.id]
            names = [f"{job.id}.png"] if len(images) == 1 else [f"{job.id}-{n}.png" for n in range(len(images))]
            for name, image in zip(names, images):
                write_file(self.system, f"{self.root}/{name}", png_bytes(image, image.info.get("parameters")))
            record.update(state="done", files=names, seeds=[job.params["seed"] + n for n in range(len(images))],
                          infotexts=[image.info.get("parameters", "") for image in images])
        except UserError as e:
            record.update(state="failed", error=str(e))
        except Exception as e:  # this job fails with its reason; the others go on
            record.update(state="failed", error=failure(e))
        write_file(self.system, record_path, json.dumps(record).encode())
        return record


def run(jobs: list[BatchJob], outdir: str, renderer: dict, ray_address: str | None = None, use_ray: bool = False,
        actors: int | None = None, cpus_per_actor: float | None = None, progress: bool = True) -> dict:
    """Render the jobs not done yet; write the manifest. Returns {"done", "failed", "skipped"} counts."""
    from tqdm import tqdm

    system, root = filesystem(outdir)
    done = done_records(system, root)
    todo = [j for j in jobs if j.id not in done]
    records = dict(done)
    with tqdm(total=len(todo), desc="jobs", unit="job", disable=not progress or not todo) as bar:
        results = _on_ray(todo, outdir, renderer, ray_address, actors, cpus_per_actor) if use_ray and todo else \
            _here(todo, outdir, renderer)
        for record in results:
            records[record["id"]] = record
            bar.update(1)
    lines = [json.dumps(records.get(j.id, {"id": j.id, "line": j.line, "state": "failed", "error": "not rendered"}))
             for j in jobs]
    write_file(system, f"{root}/{MANIFEST}", ("\n".join(lines) + "\n").encode())
    failed = sum(records.get(j.id, {}).get("state") != "done" for j in jobs)
    return {"done": len(todo) - failed, "failed": failed, "skipped": len(jobs) - len(todo)}


def _here(todo: list[BatchJob], outdir: str, renderer: dict):
    if not todo:
        return
    import torch

    threads = torch.get_num_threads()
    try:
        work = Renderer(outdir, **renderer)
        for job in todo:
            yield work.one(job)
    finally:  # --threads is this run's (a caller in Python keeps its own count)
        torch.set_num_threads(threads)


def _on_ray(todo: list[BatchJob], outdir: str, renderer: dict, address: str | None, actors: int | None,
            cpus_per_actor: float | None):
    """Ray Data: the jobs as rows (one a block, so they spread over the actors), map_batches over a pool of actors
    that each hold a Renderer; Ray restarts a lost actor and retries its task (max_restarts and max_task_retries are
    Ray Data's -1), and the retry finds the records of what was finished."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'stablediff[ray]'") from None
    import logging

    where = f"--ray {address}" if address else "--ray"
    if address and "://" not in address:
        _reachable(address, where)
    try:
        # "auto": the cluster `ray start` made on this machine; never a new one of Ray's own, which would listen on
        # every interface for as long as this runs
        ray.init(address=address or "auto", logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"{where}: no Ray cluster to join ({str(e).splitlines()[0][:200]}); start one "
                        "with `ray start --head` (and `ray start --address HEAD:6379` on each other machine)") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our bar counts the jobs; Ray Data's own plans stay quiet
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))
        count = actors or gpus or nodes
        if gpus:
            per_actor = {"num_gpus": 1, "num_cpus": cpus_per_actor or 1}
        else:
            per_actor = {"num_cpus": cpus_per_actor or max(1, int(resources.get("CPU", 1)) // count)}
        if not gpus:
            renderer = dict(renderer, threads=renderer.get("threads") or max(1, int(per_actor["num_cpus"])),
                            device="cpu")
        rows = ray.data.from_items([{"job": json.dumps(j.as_dict())} for j in todo], override_num_blocks=len(todo))
        results = rows.map_batches(Renderer, fn_constructor_args=(outdir,), fn_constructor_kwargs=renderer,
                                   batch_size=1, compute=ray.data.ActorPoolStrategy(size=count), **per_actor)
        for row in results.iter_rows():
            yield json.loads(row["record"])
    finally:
        ray.shutdown()


def _reachable(address: str, where: str) -> None:
    """A HOST:PORT that answers within seconds (Ray itself retries an unreachable head for many minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: nothing answers there ({getattr(e, 'strerror', None) or e}); give the head's "
                        "HOST:PORT that `ray start --head` printed, and check that it is running") from None
