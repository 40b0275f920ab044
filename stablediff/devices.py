"""Device and precision choice. Nothing here runs at import time."""
import ctypes
import functools
import platform
import sys

import torch

from stablediff.errors import UserError

PRECISIONS = ("autocast", "full", "fp32", "fp16", "bf16")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    return device


def resolve_dtype(precision: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """autocast: fp16 on CUDA, fp32 elsewhere; full and fp32 are float32."""
    if isinstance(precision, torch.dtype):
        return precision
    precision = precision or "autocast"
    if precision == "autocast":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"full": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise UserError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    return table[precision]


def weight_layout(device: torch.device, dtype: torch.dtype, part: str = "unet") -> torch.memory_format:
    """The memory format for a part's convolution weights: channels-last where it measured faster. Each convolution's
    output then follows its weight's layout.
    - bf16 on the CPU: oneDNN's convolutions work in that layout and NCHW costs a reorder around each one (SD 1.5 at
      512x512 on a 2-core AVX512-BF16 CPU: a guided UNet step 4.4 s against 5.2 s, a VAE decode 4.6 s against
      7.1 s; BENCHMARKS.md).
    - the fp32 UNet on AVX512 CPUs (winograd.SLOWER_ON): with its weights packed once (nn.packed), a guided SD 1.5
      512x512 step took 4.15 s against 4.49 s unpacked and 4.78 s in NCHW (one process, in turn; its convolutions
      1.82 s against 2.27 s in NCHW), within 4e-6 of the NCHW result. Winograd's convolutions, where they run there
      (Intel's CPUs), work in this layout too. The packed copies cost the conv weights' memory again (SD 1.5:
      1.9 GiB in fp32, 0.9 GiB in bf16, where linear weights are packed too; BENCHMARKS.md). The fp32 VAE stays
      NCHW: there oneDNN's channels-last fp32 convolutions were 2-7x less exact (a 128x128 decode 7.7e-4 from
      float64, against 1e-5).
    CUDA is left as it was. The loader converts each weight to its dtype and layout in one copy (SD 1.5 loaded in
    bf16: 1.5-1.6 s against 2.2-4.1 s with the layout changed afterwards)."""
    from stablediff.nn import winograd

    if device.type != "cpu":
        return torch.contiguous_format
    if dtype == torch.bfloat16 or (dtype == torch.float32 and part == "unet"
                                   and torch.backends.cpu.get_cpu_capability() in winograd.SLOWER_ON):
        return torch.channels_last
    return torch.contiguous_format


@functools.cache
def intel_cpu() -> bool:
    """Whether the CPU is Intel's, where MKL (PyTorch's BLAS on x86) takes its own AVX512 and AMX code; on other
    vendors' CPUs it takes slower generic code (see nn.attention.fused_kernel_faster)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() == "GenuineIntel" for line in f if line.startswith("vendor_id")),
                        False)
    except OSError:  # not Linux
        return "Intel" in platform.processor()


def keep_freed_memory(device: torch.device, on: bool = True) -> bool:
    """On the CPU, on Linux with glibc: keep freed memory in the process for the next tensor instead of handing it
    back to the kernel. glibc maps each allocation over 32 MB (a 512x512 activation is 64-256 MB) fresh from the
    kernel and unmaps it when freed, so every such tensor is faulted in page by page anew: in one bf16 512x512 VAE
    decode on a 2-core CPU, 669,000 page faults and 1.3 s of system time, the decode 4.05 s against 3.24 s with this
    set; in one fp32 guided 512x512 UNet step, 780,000 page faults, 8.0 s against 7.3 s (BENCHMARKS.md). What
    preloading tcmalloc is often advised for, with the process's own allocator. Process-wide, and changes no result.
    on=False sets back the thresholds glibc reaches by itself once large blocks have been freed (32 MB to map, 64 MB
    kept). True when it was set."""
    libc = _glibc()
    if device.type != "cpu" or libc is None:
        return False
    mmap_threshold, trim_threshold = (1 << 30, (1 << 31) - 1) if on else (32 << 20, 64 << 20)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def one_heap(device: torch.device) -> bool:
    """On the CPU with glibc, keep the threads started after this on the main heap (M_ARENA_MAX 1), where
    keep_freed_memory's thresholds keep large blocks. glibc gives a second thread heaps of its own of at most 64 MB,
    so a thread rendering (the server's worker) mapped each large tensor anew: SD 1.5 at 512x512 took 17.6 s an image
    in a thread against 13.7-14.4 s in the main thread; with one heap, 15.0 s against 14.5-15.5 s (BENCHMARKS.md).
    True when it was set."""
    libc = _glibc()
    return device.type == "cpu" and libc is not None and bool(libc.mallopt(_M_ARENA_MAX, 1))


def give_back_freed_memory(device: torch.device) -> None:
    """On the CPU with glibc, hand the freed memory that keep_freed_memory keeps back to the kernel (malloc_trim).
    Before a VAE decode after the UNet's steps: otherwise the decode's large blocks are carved out of the holes the
    steps left, and an fp32 512x512 txt2img peaked at 6.3 GiB against 5.3 GiB with the default allocator; with the
    memory given back first, 5.5 GiB, and the decode 7.1 s against 13.7 s with the default allocator."""
    libc = _glibc()
    if device.type == "cpu" and libc is not None:
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt's parameter numbers in <malloc.h>


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return libc


def compile_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile `module` in place (its state dict and weights stay shared, so LoRA merges still apply).
    The compiling happens at the first call for each input shape: minutes on a CPU. On CPUs inductor writes C++,
    so a compiler must be on the PATH; say so now, not at the first step."""
    import shutil

    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++", "cl")):
        raise UserError("--compile needs a C++ compiler (g++ or clang++) on the PATH for CPU kernels; "
                        "install one or leave out --compile")
    module.compile(dynamic=False)  # one static graph per image size, each compiled when first met
    return module
