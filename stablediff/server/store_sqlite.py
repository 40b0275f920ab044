"""The job store in SQLite (the standard library's sqlite3): one file, WAL, one connection behind a lock; images
and uploads as files under the server's folder; previews in memory (the worker is in the server's process)."""
import json
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from stablediff.files import write_atomic
from stablediff.server.store import (COLUMNS, FINAL, MAX_ATTEMPTS, Job, SQLStore, check_room, choose_batch,
                                     image_file, input_file, job_from_row)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    task TEXT NOT NULL,
    params TEXT NOT NULL,
    batch_key TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    images TEXT NOT NULL DEFAULT '[]',
    progress TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL);
"""
def _write_bytes(path: Path, data: bytes, durable: bool = False) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), durable)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class SQLiteStore(SQLStore):
    def __init__(self, path: Path, outdir: Path):
        self.outdir = outdir
        self.previews: dict[str, tuple[int, bytes]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            # WAL with NORMAL: a commit survives the server's crash or kill -9 (the OS has it), and a progress write
            # costs no fsync (FULL on every one measured +0.3 s per demo image); accepting a job and recording its
            # result switch to FULL (_durable), so those survive a power cut too
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)

    def _durable(self, on: bool) -> None:
        self.db.execute(f"PRAGMA synchronous={'FULL' if on else 'NORMAL'}")

    @staticmethod
    def _job(row) -> Job:
        return job_from_row(row, json.loads)

    def _rows(self, sql: str, args=()) -> list:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def add(self, job: Job, max_queued: int, max_queued_per_user: int) -> Job:
        with self.lock:
            self._durable(True)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                waiting, mine = self.db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(owner = ?), 0) FROM jobs WHERE state IN ('queued', 'running')",
                    (job.owner,)).fetchone()
                check_room(waiting, mine, max_queued, max_queued_per_user)
                job.created = time.time()
                cur = self.db.execute(
                    "INSERT INTO jobs (id, owner, task, params, batch_key, state, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (job.id, job.owner, job.task, json.dumps(job.params), job.batch_key, "queued", job.created))
                job.seq = cur.lastrowid
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            finally:
                self._durable(False)
        return job

    def claim(self, max_images: int, worker: str = "", models=None) -> list[Job]:
        """A batch of queued jobs (store.choose_batch), all running when this returns."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                rows = self.db.execute(f"SELECT {COLUMNS} FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 500").fetchall()
                chosen = choose_batch([self._job(r) for r in rows], max_images, models)
                now = time.time()
                for job in chosen:
                    self.db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1 "
                                    "WHERE id = ?", (now, job.id))
                    job.state, job.started, job.attempts = "running", now, job.attempts + 1
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return chosen

    def progress(self, job_ids: list[str], progress: dict, worker: str = "") -> bool:
        """Record a step of running jobs; True if one of them is to be cancelled (the worker's check, in the same
        visit)."""
        with self.lock:
            self.db.executemany("UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running'",
                                [(json.dumps(progress), i) for i in job_ids])
            marks = ",".join("?" * len(job_ids))
            return bool(self.db.execute(f"SELECT 1 FROM jobs WHERE id IN ({marks}) AND cancel = 1 LIMIT 1",
                                        job_ids).fetchall())

    def beat(self, worker: str, job_ids: list[str]) -> None:
        pass  # the one worker is the server's own: its jobs run again when the server starts (recover)

    def set_preview(self, job_id: str, step: int, png: bytes) -> None:
        self.previews[job_id] = (step, png)

    def preview(self, job_id: str) -> tuple[int, bytes] | None:
        return self.previews.get(job_id)

    def finish(self, job_id: str, state: str, images: list | None = None, error: str | None = None,
               files: list[bytes] | None = None, worker: str = "") -> bool:
        """Record a running job's end, once: False if it was not running (a result is never written twice). Its
        files (PNGs) are on the disk, each whole, before it is done."""
        assert state in FINAL
        self.previews.pop(job_id, None)
        if files:
            folder = image_file(self.outdir, job_id, 0).parent
            if folder.is_dir():  # what a run cut short by a crash left (a temporary file): this run's result replaces it
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for n, data in enumerate(files):
                _write_bytes(image_file(self.outdir, job_id, n), data, durable=True)
        with self.lock:
            self._durable(True)
            try:
                cur = self.db.execute("UPDATE jobs SET state = ?, finished = ?, images = ?, error = ? "
                                      "WHERE id = ? AND state = 'running'",
                                      (state, time.time(), json.dumps(images or []), error, job_id))
            finally:
                self._durable(False)
        return cur.rowcount == 1

    def image(self, job_id: str, n: int) -> bytes | None:
        return _read(image_file(self.outdir, job_id, n))

    def keep_input(self, digest: str, png: bytes) -> None:
        path = input_file(self.outdir, digest)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_bytes(path, png)

    def input(self, digest: str) -> bytes | None:
        return _read(input_file(self.outdir, digest))

    def requeue(self, job_ids: list[str], count_attempt: bool = True, worker: str = "") -> None:
        """Running jobs back to the queue in their place (count_attempt False: this run does not count)."""
        for i in job_ids:
            self.previews.pop(i, None)
        with self.lock:
            self.db.executemany("UPDATE jobs SET state = 'queued', started = NULL, progress = '{}', "
                                f"attempts = attempts - {0 if count_attempt else 1} WHERE id = ? AND state = 'running'",
                                [(i,) for i in job_ids])

    def request_cancel(self, job_id: str) -> str:
        """Cancel a queued job at once; mark a running one for its worker to stop. Returns the state after."""
        with self.lock:
            self.db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ? AND state = 'queued'",
                            (time.time(), job_id))
            self.db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND state = 'running'", (job_id,))
            return self.db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

    def cancel_requested(self, job_ids: list[str]) -> bool:
        marks = ",".join("?" * len(job_ids))
        return bool(self._rows(f"SELECT 1 FROM jobs WHERE id IN ({marks}) AND cancel = 1 LIMIT 1", job_ids))

    def recover(self) -> tuple[int, int]:
        """After a stop or a crash: jobs left running run again, or fail once they have been cut short
        MAX_ATTEMPTS times. Returns (requeued, failed)."""
        with self.lock:
            failed = self.db.execute(
                "UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE state = 'running' AND attempts >= ?",
                (time.time(), f"the server stopped while this job ran, {MAX_ATTEMPTS} times; it was not tried again",
                 MAX_ATTEMPTS)).rowcount
            requeued = self.db.execute("UPDATE jobs SET state = 'queued', started = NULL, progress = '{}' "
                                       "WHERE state = 'running'").rowcount
            cancelled = self.db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE state = 'queued' "
                                        "AND cancel = 1", (time.time(),)).rowcount
        return requeued - cancelled, failed

    def setting(self, key: str, default=None):
        rows = self._rows("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_setting(self, key: str, value) -> None:
        with self.lock:
            self.db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                            "excluded.value", (key, json.dumps(value)))

    def add_token(self, owner: str, digest: str) -> None:
        with self.lock:
            self.db.execute("INSERT INTO tokens (digest, owner, created) VALUES (?, ?, ?)", (digest, owner, time.time()))

    def remove_token(self, digest: str) -> bool:
        with self.lock:
            return self.db.execute("DELETE FROM tokens WHERE digest = ?", (digest,)).rowcount > 0

    def close(self) -> None:
        with self.lock:
            self.db.close()
