"""The job store: the one source of truth for both APIs. A job's life, written down once:

    queued -> running -> done | failed | cancelled
    queued -> cancelled
    running -> queued   (the server stopped while it ran: it runs again, at most MAX_ATTEMPTS times)

A result is recorded once: `finish` only moves a job that is running, and its images are on disk before it does.
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


class Store:
    """What the server and the worker need of a job store; store_sqlite.SQLiteStore implements it."""

    def add(self, job: Job, max_queued: int, max_queued_per_user: int) -> Job: ...
    def get(self, job_id: str) -> Job | None: ...
    def jobs_of(self, owner: str | None, limit: int, offset: int) -> list[Job]: ...
    def position(self, job: Job) -> int: ...
    def claim(self, max_images: int) -> list[Job]: ...
    def progress(self, job_ids: list[str], progress: dict) -> None: ...
    def finish(self, job_id: str, state: str, images: list | None = None, error: str | None = None) -> bool: ...
    def requeue(self, job_ids: list[str], count_attempt: bool = True) -> None: ...
    def request_cancel(self, job_id: str) -> str: ...
    def cancel_requested(self, job_ids: list[str]) -> bool: ...
    def recover(self) -> tuple[int, int]: ...
    def setting(self, key: str, default=None): ...
    def set_setting(self, key: str, value) -> None: ...
    def add_token(self, owner: str, digest: str) -> None: ...
    def token_owner(self, digest: str) -> str | None: ...
    def remove_token(self, digest: str) -> bool: ...
