"""Device and precision choice. Nothing here runs at import time."""
import ctypes
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


def fast_layout(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Channels-last weights where they measured faster: bf16 on the CPU, where oneDNN's convolutions work in that
    layout and NCHW costs a reorder around each one (SD 1.5 at 512x512 on a 2-core AVX512-BF16 CPU: a guided UNet
    step 4.4 s against 5.2 s, a VAE decode 4.6 s against 7.1 s; BENCHMARKS.md). Each convolution's output then
    follows its weight's layout. fp32 stays NCHW: the layout of our Winograd convolutions, and on an AVX512 CPU,
    where channels-last sped the fp32 VAE decode up by a third, oneDNN's channels-last fp32 convolutions were 2-7x
    less exact (a 128x128 decode 7.7e-4 from float64, against 1e-5 in NCHW). CUDA is left as it was."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        module.to(memory_format=torch.channels_last)
    return module


def reuse_freed_memory(device: torch.device, dtype: torch.dtype) -> bool:
    """For bf16 on the CPU, on Linux with glibc: keep freed memory in the process for the next tensor instead of
    handing it back to the kernel. glibc maps each allocation over 32 MB (a 512x512 activation is 64-256 MB) fresh
    from the kernel and unmaps it when freed, so every such tensor is faulted in page by page anew: in one bf16
    512x512 VAE decode on a 2-core CPU, 669,000 page faults and 1.3 s of system time, the decode 4.05 s against
    3.24 s with this set, at the same peak memory (BENCHMARKS.md). What preloading tcmalloc is often advised for,
    with the process's own allocator. Not in fp32: there the decode's larger blocks fragment the kept memory, and
    its peak rose from 5.0 to 6.2 GiB. Process-wide, and changes no result. True when it was set."""
    if device.type != "cpu" or dtype != torch.bfloat16 or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers in <malloc.h>
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, (1 << 31) - 1))


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
