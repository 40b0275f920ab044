"""A real `stablediff serve` under uvicorn on a free loopback port, for the tests to speak HTTP to, and
`stablediff worker` processes; always stopped."""
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


# A Ray cluster of the tests' own: on loopback only (Ray binds the head to 127.0.0.1, not the machine's address, with
# clusters "off") and with token authentication on a token of this run's, so a ~/.ray/auth_token left by some other
# cluster (Ray turns tokens on for any process that finds that file) can neither lock the nodes out nor let them in.
# Built at each call, so it carries what the run has set since import (the tests' private XDG_CACHE_HOME).
_RAY_TOKEN = secrets.token_hex(16)


def ray_env() -> dict:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": _RAY_TOKEN}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A `stablediff COMMAND` process of its own (so a test can kill -9 it), its output in a log file; always
    stopped: SIGTERM, then kill -9 after `timeout`."""

    proc = None

    def _spawn(self, log: Path, command: list[str]) -> None:
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "stablediff.cli", *command], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Server(_Process):
    """`stablediff serve ARGS` on 127.0.0.1."""

    def __init__(self, outdir: Path, *args, port: int | None = None):
        self.outdir, self.args, self.port = outdir, [str(a) for a in args], port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "Server":
        self._spawn(self.outdir.parent / f"{self.outdir.name}-server-{self.port}.log",
                    ["serve", "--outdir", str(self.outdir), "--port", str(self.port), *self.args])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.output()}")
            try:
                httpx.get(self.url + "/v1/me", timeout=2)
                return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s: {self.output()}")


class Worker(_Process):
    """`stablediff worker ARGS`, started once it says it takes jobs."""

    def __init__(self, log: Path, *args):
        self.log_path, self.args = log, [str(a) for a in args]

    def start(self, timeout: float = 120) -> "Worker":
        self._spawn(self.log_path, ["worker", *self.args])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}: {self.output()}")
            if "taking jobs" in self.output():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the worker did not start within {timeout} s: {self.output()}")
