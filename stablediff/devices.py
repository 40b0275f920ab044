"""Device and precision choice. Nothing here runs at import time."""
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
