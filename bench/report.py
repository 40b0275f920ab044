"""What every bench script shares: the machine it ran on, a command timed as its own process with its peak memory,
and a section appended to BENCHMARKS.md."""
import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU, cores, memory and the versions that matter, in one line."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def append(title: str, lines: list[str]) -> None:
    """Append a dated section to BENCHMARKS.md and print it."""
    text = "\n".join([f"\n## {title} ({datetime.date.today()})\n", *lines])
    with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)


def run_process(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stdout) of cmd run as its own process; its own peak, from wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd)
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (status {status})")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, out
