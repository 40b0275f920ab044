"""What every bench script writes: the machine it ran on, and a section appended to BENCHMARKS.md."""
import datetime
import os
import platform
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
