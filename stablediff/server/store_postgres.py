"""The job store in PostgreSQL (psycopg 3 and its pool), shared by any number of `stablediff serve` front ends and
`stablediff worker` processes on any machines. Workers claim jobs with row locks (FOR UPDATE SKIP LOCKED: two never
take one job), beat while they run them, and a job whose worker has not beaten for `timeout` seconds (by the
database's clock) is queued again by the next worker that looks for work. A job's images are rows written in the
transaction that marks it done, so it is done exactly when its results are stored, once. Every change is announced
with NOTIFY, so a server wakes what waits on a job that a worker elsewhere renders."""
import logging
import threading
import time
from contextlib import contextmanager

from stablediff.errors import UserError
from stablediff.server.store import (COLUMNS, FINAL, MAX_ATTEMPTS, Job, SQLStore, check_room, choose_batch,
                                     job_from_row)

log = logging.getLogger("stablediff.server")
CHANNEL = "stablediff_jobs"
NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"  # the database's clock: one for every machine
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT UNIQUE NOT NULL,
    owner TEXT NOT NULL,
    task TEXT NOT NULL,
    params JSONB NOT NULL,
    batch_key TEXT NOT NULL,
    state TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    started DOUBLE PRECISION,
    finished DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel BOOLEAN NOT NULL DEFAULT FALSE,
    error TEXT,
    images JSONB NOT NULL DEFAULT '[]',
    progress JSONB NOT NULL DEFAULT '{}',
    worker TEXT,
    beat DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE TABLE IF NOT EXISTS images (job_id TEXT NOT NULL, n INTEGER NOT NULL, png BYTEA NOT NULL,
                                   PRIMARY KEY (job_id, n));
CREATE TABLE IF NOT EXISTS inputs (digest TEXT PRIMARY KEY, png BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS previews (job_id TEXT PRIMARY KEY, step INTEGER NOT NULL, png BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value JSONB NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (digest TEXT PRIMARY KEY, owner TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
"""
_SCHEMA_LOCK = 7_860_001  # advisory locks: processes starting together create the tables one at a time,
_ADD_LOCK = 7_860_002  # and the queue's limits are checked by one front end at a time


class PostgresStore(SQLStore):
    shared, mark = True, "%s"

    def __init__(self, url: str, timeout: float = 60):
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise UserError("a PostgreSQL queue needs psycopg: pip install 'stablediff[postgres]'") from None
        self.url, self.timeout, self.reaped = url, timeout, 0.0
        self.listening, self.stopping = threading.Event(), threading.Event()
        try:
            psycopg.connect(url, connect_timeout=10).close()
        except psycopg.Error as e:
            raise UserError(f"--db: cannot reach PostgreSQL at {_safe(url)} ({str(e).splitlines()[0][:200]}); "
                            "is the server running, and are the address, user, password and database right?") from None
        # commits do not wait for the disk (a step's progress, a preview: what a crash of the database may lose),
        # except those of _durable transactions: a job accepted, a result, a token, a setting
        self.pool = ConnectionPool(url, min_size=1, max_size=8, open=True,
                                   kwargs={"autocommit": True, "options": "-c synchronous_commit=off"})
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(SCHEMA)

    _job = staticmethod(job_from_row)  # psycopg decodes JSONB itself

    @contextmanager
    def _durable(self):
        """A transaction whose commit is on the database's disk when it returns."""
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL synchronous_commit = on")
            yield conn

    def _rows(self, sql: str, args=()) -> list:
        with self.pool.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def _run(self, sql: str, args=()) -> int:
        with self.pool.connection() as conn:
            return conn.execute(sql, args).rowcount

    @staticmethod
    def _notify(conn, job_ids) -> None:
        conn.execute("SELECT pg_notify(%s, i) FROM unnest(%s::text[]) AS i", (CHANNEL, list(job_ids)))

    def add(self, job: Job, max_queued: int, max_queued_per_user: int) -> Job:
        from psycopg.types.json import Jsonb

        with self._durable() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ADD_LOCK,))  # one add at a time: the counts hold
            waiting, mine = conn.execute(
                "SELECT COUNT(*), COUNT(*) FILTER (WHERE owner = %s) FROM jobs WHERE state IN ('queued', 'running')",
                (job.owner,)).fetchone()
            check_room(waiting, mine, max_queued, max_queued_per_user)
            job.created = time.time()
            job.seq = conn.execute(
                "INSERT INTO jobs (id, owner, task, params, batch_key, state, created) VALUES (%s, %s, %s, %s, %s, "
                "'queued', %s) RETURNING seq",
                (job.id, job.owner, job.task, Jsonb(job.params), job.batch_key, job.created)).fetchone()[0]
        return job

    def claim(self, max_images: int, worker: str = "", models=None) -> list[Job]:
        """A batch of the queued jobs no other worker holds (store.choose_batch), running on `worker` when this
        returns. Jobs of workers that stopped beating are queued again first (at most once a second)."""
        if time.monotonic() - self.reaped > 1:
            self.recover()
        with self.pool.connection() as conn, conn.transaction():
            where, args = ("AND params->>'model' = ANY(%s)", (list(models),)) if models is not None else ("", ())
            rows = conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE state = 'queued' {where} ORDER BY seq LIMIT 100 "
                                "FOR UPDATE SKIP LOCKED", args).fetchall()
            chosen = choose_batch([self._job(r) for r in rows], max_images, models)
            if chosen:
                now = time.time()
                conn.execute(f"UPDATE jobs SET state = 'running', started = %s, attempts = attempts + 1, worker = %s, "
                             f"beat = {NOW} WHERE id = ANY(%s)", (now, worker, [j.id for j in chosen]))
                for job in chosen:
                    job.state, job.started, job.attempts = "running", now, job.attempts + 1
                self._notify(conn, [j.id for j in chosen])
        return chosen

    def beat(self, worker: str, job_ids: list[str]) -> None:
        if job_ids:
            self._run(f"UPDATE jobs SET beat = {NOW} WHERE id = ANY(%s) AND worker = %s AND state = 'running'",
                      (job_ids, worker))

    def progress(self, job_ids: list[str], progress: dict, worker: str = "") -> bool:
        """A step of jobs running on `worker` (a worker whose jobs went to another says nothing of them), and
        whether one of them is to be cancelled: one round trip a step."""
        from psycopg.types.json import Jsonb

        mine = "AND worker = %s" if worker else ""
        rows = self._rows(f"WITH stepped AS (UPDATE jobs SET progress = %s WHERE id = ANY(%s) AND state = 'running' "
                          f"{mine} RETURNING id, cancel) SELECT cancel, pg_notify(%s, id) FROM stepped",
                          (Jsonb(progress), job_ids, *((worker,) if worker else ()), CHANNEL))
        return any(cancel for cancel, _ in rows)

    def set_preview(self, job_id: str, step: int, png: bytes) -> None:
        self._run("INSERT INTO previews (job_id, step, png) VALUES (%s, %s, %s) ON CONFLICT (job_id) DO UPDATE SET "
                  "step = excluded.step, png = excluded.png", (job_id, step, png))

    def preview(self, job_id: str) -> tuple[int, bytes] | None:
        rows = self._rows("SELECT step, png FROM previews WHERE job_id = %s", (job_id,))
        return (rows[0][0], bytes(rows[0][1])) if rows else None

    def finish(self, job_id: str, state: str, images: list | None = None, error: str | None = None,
               files: list[bytes] | None = None, worker: str = "") -> bool:
        """The job's end and its images in one transaction, only while it runs on this worker: a worker whose job
        was given to another (it stopped beating) records nothing."""
        from psycopg.types.json import Jsonb

        assert state in FINAL
        with self._durable() as conn:
            mine = "AND worker = %s" if worker else ""
            done = conn.execute(f"UPDATE jobs SET state = %s, finished = %s, images = %s, error = %s "
                                f"WHERE id = %s AND state = 'running' {mine}",
                                (state, time.time(), Jsonb(images or []), error, job_id,
                                 *((worker,) if worker else ()))).rowcount == 1
            if done:
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO images (job_id, n, png) VALUES (%s, %s, %s)",
                                    [(job_id, n, data) for n, data in enumerate(files or [])])
                conn.execute("DELETE FROM previews WHERE job_id = %s", (job_id,))
                self._notify(conn, [job_id])
        return done

    def image(self, job_id: str, n: int) -> bytes | None:
        rows = self._rows("SELECT png FROM images WHERE job_id = %s AND n = %s", (job_id, n))
        return bytes(rows[0][0]) if rows else None

    def keep_input(self, digest: str, png: bytes) -> None:
        self._run("INSERT INTO inputs (digest, png) VALUES (%s, %s) ON CONFLICT DO NOTHING", (digest, png))

    def input(self, digest: str) -> bytes | None:
        rows = self._rows("SELECT png FROM inputs WHERE digest = %s", (digest,))
        return bytes(rows[0][0]) if rows else None

    def requeue(self, job_ids: list[str], count_attempt: bool = True, worker: str = "") -> None:
        with self.pool.connection() as conn, conn.transaction():
            mine = "AND worker = %s" if worker else ""
            conn.execute(f"UPDATE jobs SET state = 'queued', started = NULL, progress = '{{}}', worker = NULL, "
                         f"attempts = attempts - {0 if count_attempt else 1} WHERE id = ANY(%s) AND state = 'running' "
                         f"{mine}", (job_ids, *((worker,) if worker else ())))
            conn.execute("DELETE FROM previews WHERE job_id = ANY(%s)", (job_ids,))
            self._notify(conn, job_ids)

    def request_cancel(self, job_id: str) -> str:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("UPDATE jobs SET state = 'cancelled', finished = %s WHERE id = %s AND state = 'queued'",
                         (time.time(), job_id))
            conn.execute("UPDATE jobs SET cancel = TRUE WHERE id = %s AND state = 'running'", (job_id,))
            self._notify(conn, [job_id])
            return conn.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()[0]

    def cancel_requested(self, job_ids: list[str]) -> bool:
        return bool(self._rows("SELECT 1 FROM jobs WHERE id = ANY(%s) AND cancel LIMIT 1", (job_ids,)))

    def recover(self) -> tuple[int, int]:
        """Jobs whose worker has not beaten for `timeout` seconds run again (or fail, once cut short MAX_ATTEMPTS
        times); a queued job marked cancelled is cancelled. Jobs of live workers are left alone. (requeued, failed)"""
        self.reaped = time.monotonic()
        stale = f"state = 'running' AND (beat IS NULL OR beat < {NOW} - %s)"
        with self.pool.connection() as conn, conn.transaction():
            failed = [r[0] for r in conn.execute(
                f"UPDATE jobs SET state = 'failed', finished = %s, error = %s, worker = NULL WHERE {stale} AND "
                "attempts >= %s RETURNING id",
                (time.time(), f"its worker stopped while it ran, {MAX_ATTEMPTS} times; it was not tried again",
                 self.timeout, MAX_ATTEMPTS)).fetchall()]
            requeued = [r[0] for r in conn.execute(
                f"UPDATE jobs SET state = 'queued', started = NULL, progress = '{{}}', worker = NULL WHERE {stale} "
                "RETURNING id", (self.timeout,)).fetchall()]
            conn.execute("UPDATE jobs SET state = 'cancelled', finished = %s WHERE state = 'queued' AND cancel",
                         (time.time(),))
            if failed or requeued:
                log.warning("%d job(s) of stopped workers queued again, %d failed", len(requeued), len(failed))
                self._notify(conn, failed + requeued)
        return len(requeued), len(failed)

    def setting(self, key: str, default=None):
        rows = self._rows("SELECT value FROM settings WHERE key = %s", (key,))
        return rows[0][0] if rows else default

    def set_setting(self, key: str, value) -> None:
        from psycopg.types.json import Jsonb

        with self._durable() as conn:
            conn.execute("INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
                         "excluded.value", (key, Jsonb(value)))

    def add_token(self, owner: str, digest: str) -> None:
        with self._durable() as conn:
            conn.execute("INSERT INTO tokens (digest, owner, created) VALUES (%s, %s, %s)", (digest, owner, time.time()))

    def remove_token(self, digest: str) -> bool:
        return self._run("DELETE FROM tokens WHERE digest = %s", (digest,)) > 0

    def listen(self, callback) -> None:
        """A thread on a connection of its own: each NOTIFY of another process calls callback([job_id])."""
        threading.Thread(target=self._listen, args=(callback,), name="stablediff-listen", daemon=True).start()
        self.listening.wait(15)

    def _listen(self, callback) -> None:
        import psycopg

        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    while not self.stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            callback([note.payload])
            except psycopg.Error as e:  # the database went away: what waits polls meanwhile; listen again
                log.warning("lost the PostgreSQL notifications (%s); listening again", str(e).splitlines()[0])
                self.listening.set()
                time.sleep(1)

    def close(self) -> None:
        self.stopping.set()
        self.pool.close()


def _safe(url: str) -> str:
    """The address without its password, for messages."""
    import re

    return re.sub(r"(//[^:/@]+):[^@]*@", r"\1:***@", url)
