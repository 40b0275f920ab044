"""The job store: the one source of truth for both APIs. A job's life, written down once:

    queued -> running -> done | failed | cancelled
    queued -> cancelled
    running -> queued   (the server stopped while it ran: it runs again, at most MAX_ATTEMPTS times)

A result is recorded once: `finish` only moves a job that is running (on this worker), and its images are stored
before it does (SQLite: files under the server's folder; PostgreSQL: rows of the same transaction).

Two implementations: store_sqlite.SQLiteStore (one server and its own worker) and store_postgres.PostgresStore (any
number of servers and `stablediff worker` processes on any machines: workers claim with row locks, send heartbeats,
and a job whose worker stopped beating goes back to the queue).
"""
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")
MAX_ATTEMPTS = 3  # a job whose run was cut short by a stop this often is failed, not tried again


@dataclass
class Job:
    id: str
    owner: str
    task: str
    params: dict
    batch_key: str
    state: str = "queued"
    seq: int = 0
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    cancel: bool = False
    error: str | None = None
    images: list = field(default_factory=list)  # [{"n": 0, "seed": ..., "infotext": ...}]
    progress: dict = field(default_factory=dict)  # {"step", "steps", "image", "images"}


def image_file(outdir: Path, job_id: str, n: int) -> Path:
    """Where the server keeps image n of a job (the worker writes it, both APIs read it)."""
    return outdir / "images" / job_id / f"{n}.png"


def input_file(outdir: Path, digest: str) -> Path:
    """Where the server keeps an input image of a job, by the hash of its pixels (one file for equal ones)."""
    return outdir / "inputs" / f"{digest}.png"


class QueueFull(Exception):
    """More jobs are waiting than the limit allows (for this user, or in all)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


COLUMNS = "seq, id, owner, task, params, batch_key, state, created, started, finished, attempts, cancel, error, images, progress"


def job_from_row(row, decode=lambda value: value) -> Job:
    """A Job from a row of COLUMNS; decode turns a JSON column into its value (SQLite keeps text)."""
    seq, id_, owner, task, params, key, state, created, started, finished, attempts, cancel, error, images, progress = row
    return Job(id=id_, owner=owner, task=task, params=decode(params), batch_key=key, state=state, seq=seq,
               created=created, started=started, finished=finished, attempts=attempts, cancel=bool(cancel),
               error=error, images=decode(images), progress=decode(progress))


def check_room(waiting: int, mine: int, max_queued: int, max_queued_per_user: int) -> None:
    """QueueFull unless a job more fits: `waiting` jobs queued or running in all, `mine` of its user's."""
    if waiting >= max_queued:
        raise QueueFull(f"the queue is full ({waiting} jobs waiting, the limit is {max_queued}); "
                        "try again when some have finished", 30)
    if mine >= max_queued_per_user:
        raise QueueFull(f"you have {mine} jobs waiting, the limit per user is {max_queued_per_user}; "
                        "wait for them or cancel some", 10)


def choose_batch(queued: list[Job], max_images: int, models=None) -> list[Job]:
    """Of the queued jobs (oldest first), the oldest one this worker can render (its model among `models`; None:
    any) and the jobs after it that can share its batch (the same batch key, at most max_images images in all), never
    passing over an earlier job of the same owner: each user's jobs finish in the order they were sent."""
    chosen, blocked, images = [], set(), 0
    for job in queued:
        if models is not None and job.params.get("model") not in models:
            continue  # another worker's: it neither joins nor blocks
        size = job.params.get("batch_size", 1)
        fits = not chosen or (job.batch_key == chosen[0].batch_key and images + size <= max_images)
        if fits and job.owner not in blocked:
            chosen.append(job)
            images += size
        else:
            blocked.add(job.owner)
    return chosen


def open_store(db: str | None, outdir: Path, timeout: float = 60):
    """The store a server or worker was given: a postgresql:// address, else the SQLite file (default
    OUTDIR/queue.sqlite3). timeout: seconds without a heartbeat after which a worker's jobs run again elsewhere."""
    if db and db.startswith(("postgresql://", "postgres://")):
        from stablediff.server.store_postgres import PostgresStore

        return PostgresStore(db, timeout=timeout)
    from stablediff.server.store_sqlite import SQLiteStore

    return SQLiteStore(Path(db) if db else outdir / "queue.sqlite3", outdir)


class Store:
    """What the server and the worker need of a job store."""

    shared = False  # True: other processes (workers, servers) use it too

    def add(self, job: Job, max_queued: int, max_queued_per_user: int) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def jobs_of(self, owner: str | None, limit: int, offset: int) -> list[Job]: ...
    def position(self, job: Job) -> int: ...
    def claim(self, max_images: int, worker: str = "", models=None) -> list[Job]: ...
    def beat(self, worker: str, job_ids: list[str]) -> None: ...
    def progress(self, job_ids: list[str], progress: dict, worker: str = "") -> bool: ...  # True: one is cancelled
    def set_preview(self, job_id: str, step: int, png: bytes) -> None: ...
    def preview(self, job_id: str) -> tuple[int, bytes] | None: ...
    def finish(self, job_id: str, state: str, images: list | None = None, error: str | None = None,
               files: list[bytes] | None = None, worker: str = "") -> bool: ...
    def image(self, job_id: str, n: int) -> bytes | None: ...
    def keep_input(self, digest: str, png) -> None: ...
    def input(self, digest: str) -> bytes | None: ...
    def requeue(self, job_ids: list[str], count_attempt: bool = True, worker: str = "") -> None: ...
    def request_cancel(self, job_id: str) -> str: ...
    def cancel_requested(self, job_ids: list[str]) -> bool: ...
    def recover(self) -> tuple[int, int]: ...
    def setting(self, key: str, default=None): ...
    def set_setting(self, key: str, value) -> None: ...
    def add_token(self, owner: str, digest: str) -> None: ...
    def token_owner(self, digest: str) -> str | None: ...
    def remove_token(self, digest: str) -> bool: ...

    def listen(self, callback) -> None:
        """callback(job_ids) whenever a job changes in another process (a remote worker's step, its end)."""
    def close(self) -> None: ...


class SQLStore(Store):
    """The reads both SQL stores make alike; `mark` is their driver's parameter mark, `_rows(sql, args)` their query
    and `_job(row)` their row of COLUMNS as a Job."""

    mark = "?"

    def get(self, job_id: str) -> Job | None:
        rows = self._rows(f"SELECT {COLUMNS} FROM jobs WHERE id = {self.mark}", (job_id,))
        return self._job(rows[0]) if rows else None

    def jobs_of(self, owner: str | None, limit: int, offset: int) -> list[Job]:
        where, args = (f"WHERE owner = {self.mark}", (owner,)) if owner is not None else ("", ())
        return [self._job(r) for r in self._rows(f"SELECT {COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT "
                                                 f"{self.mark} OFFSET {self.mark}", (*args, limit, offset))]

    def position(self, job: Job) -> int:
        """How many jobs will start before this one (0: it is next, or running)."""
        if job.state != "queued":
            return 0
        return self._rows(f"SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < {self.mark}", (job.seq,))[0][0]

    def token_owner(self, digest: str) -> str | None:
        rows = self._rows(f"SELECT owner FROM tokens WHERE digest = {self.mark}", (digest,))
        return rows[0][0] if rows else None
