"""What every bench script shares: the machine it ran on, a command timed as its own process with its peak memory,
and a section appended to BENCHMARKS.md."""
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
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
    isa = torch.backends.cpu.get_cpu_capability()  # machines of one name differ: AVX2 only, AVX512, AMX
    isa += (" with AVX512-BF16" * torch.cpu._is_avx512_bf16_supported()
            + " with AMX" * torch.cpu._is_amx_tile_supported())
    return (f"{cpu} ({isa}), {os.cpu_count()} cores, {memory:.0f} GiB{gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (1 to 99), interpolated between the two nearest values."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def append(title: str, lines: list[str]) -> None:
    """Append a dated section to BENCHMARKS.md and print it."""
    text = "\n".join([f"\n## {title} ({datetime.date.today()})\n", *lines])
    with open(ROOT / "BENCHMARKS.md", "a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)


def prepend(title: str, lines: list[str]) -> None:
    """Put a dated section at the top of BENCHMARKS.md (after its opening paragraph), where a reader looks first,
    and print it."""
    text = "\n".join([f"## {title} ({datetime.date.today()})\n", *lines]) + "\n"
    path = ROOT / "BENCHMARKS.md"
    head, sep, rest = path.read_text(encoding="utf-8").partition("\n## ")
    path.write_text(f"{head.rstrip()}\n\n{text}\n{sep.lstrip()}{rest}" if sep else f"{head.rstrip()}\n\n{text}",
                    encoding="utf-8")
    print(text)


# Forks the command from a small process and prints its peak RSS (KiB) last on stderr. A child started straight
# from a bench script starts its peak at the script's own resident size (the kernel carries it over the exec), so
# a script holding models would read its own size for every command it times.
_LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))"""


def give_back_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc's malloc_trim; a no-op elsewhere), so
    that processes timed next are not short of the memory and file cache this script held."""
    import torch

    from stablediff.devices import give_back_freed_memory

    gc.collect()
    give_back_freed_memory(torch.device("cpu"))


def run_process(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB, stdout) of cmd run as its own process, with its own peak."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCH, *cmd], capture_output=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (status {proc.returncode})")
    return time.perf_counter() - start, int(proc.stderr.split()[-1]) / 2**20, proc.stdout.decode()
