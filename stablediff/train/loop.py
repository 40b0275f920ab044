"""What every training run shares: AdamW (or bitsandbytes' 8-bit AdamW) with warm-up and cosine decay, EMA weights,
bf16 autocast where the hardware does bf16 matrix work natively, checkpoints to resume from (written atomically, read
back with the weights-only unpickler), and a progress bar with the loss. Given an accelerate Accelerator, the steps
go through it: data-parallel over the processes `accelerate launch` started (DDP, gradients averaged), its mixed
precision (fp16 with loss scaling), and only the main process writes.

A run is deterministic in its step number: the loss function draws its data and noise from a generator
seeded by the step, so a resumed run continues exactly where the checkpoint left it.
"""
import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stablediff.errors import UserError
from stablediff.files import write_atomic


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware (CUDA with bf16; CPUs with AVX512-BF16 or AMX). Elsewhere
    bf16 is emulated and far slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" made "bf16" where bf16 is native on `device`, else "fp32"; "bf16" and "fp32" as they are."""
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast for precision "bf16", or "auto" where bf16 is native; else full precision."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class EMA:
    """An exponential moving average of a module's floating-point weights, in fp32, with the usual warm-up
    (the decay grows as (1 + step) / (10 + step) until it reaches `decay`)."""

    def __init__(self, module: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        keep = min(self.decay, (1 + step) / (10 + step))
        pairs = [(self.shadow[k], v) for k, v in module.state_dict().items() if k in self.shadow]
        torch._foreach_lerp_([s for s, _ in pairs], [v.float() for _, v in pairs], 1 - keep)

    def weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged weights in place of the raw ones."""
        return {k: self.shadow.get(k, v).to(v.dtype) for k, v in module.state_dict().items()}


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to `floor` of the base rate (or, for "constant", the base rate)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def accelerator(device: torch.device, precision: str, unused: bool = False):
    """An accelerate Accelerator for a run on `device` (or, under `accelerate launch`, this process's device) with
    mixed precision "fp32", "bf16", "fp16" or "auto"; unused: some trained weights may get no gradient in a step (DDP
    then looks for them after each forward). One process may train several times with different precisions
    (the Python API, the tests): accelerate keeps its settings process-wide, so they are reset first (the process
    group that `accelerate launch` set up stays)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState, GradientState

    precision = resolve_precision(precision, device)
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU (its loss scaling is CUDA's); on the CPU use bf16 or fp32")
    AcceleratorState._reset_state()
    GradientState._reset_state()
    # device_placement off: the modules are where the run put them (`device`, or this process's under a launch)
    return Accelerator(cpu=device.type == "cpu", mixed_precision={"fp32": "no"}.get(precision, precision),
                       device_placement=False,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


def optimizer(groups: list[dict], kind: str, lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay: torch's fused one, or ("adamw8bit") bitsandbytes' with 8-bit moments (a quarter
    of the optimizer's memory), where bitsandbytes is installed and runs."""
    if kind == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UserError("--optimizer adamw8bit needs bitsandbytes: pip install 'stablediff[adam8bit]'") from None
        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, weight_decay=0.0)
    device = groups[0]["params"][0].device
    # fused: one kernel for all parameters (on CPU several times faster than the loop over them)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))


class _Steps(nn.Module):
    """The trained modules with the loss as forward, so that what accelerate wraps around a model (DDP's gradient
    averaging, mixed precision's autocast) sees each step go through it."""

    def __init__(self, modules: dict[str, nn.Module], loss_fn: Callable[[int], torch.Tensor]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.loss_fn = loss_fn

    def forward(self, step: int) -> torch.Tensor:
        return self.loss_fn(step)


@contextlib.contextmanager
def checkpointing(modules: list[nn.Module], kinds: tuple[type, ...]):
    """Activation checkpointing: inside, each module of `kinds` in `modules` keeps only its inputs for the backward
    pass and runs again there (torch.utils.checkpoint, non-reentrant: hooks and frozen weights work as usual), so a
    step holds one block's activations at a time, for about a third more compute."""
    from torch.utils.checkpoint import checkpoint

    wrapped = [m for module in modules for m in module.modules() if isinstance(m, kinds)]
    for m in wrapped:
        m.forward = lambda *args, _f=m.forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)
    try:
        yield
    finally:
        for m in wrapped:
            del m.forward  # the class's own again


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and how to start over
        raise UserError(f"{path}: not a readable training checkpoint ({str(e).splitlines()[0][:160]}); "
                        "delete it to start this stage over") from None


@dataclass
class Run:
    """One training stage: the modules it trains, for how many steps, and where it checkpoints."""

    name: str
    modules: dict[str, nn.Module]
    steps: int
    lr: float
    checkpoint: Path | None = None
    warmup: int = 100
    ema_decay: float | None = 0.999  # None: no EMA weights are kept (they cost a copy of the modules in fp32)
    every: int = 200  # steps between checkpoints
    clip_grad: float = 1.0
    module_lr: dict[str, float] = field(default_factory=dict)  # a module's own base rate, in place of lr
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # each step's wall time, in this process
    schedule: str = "cosine"  # after the warm-up: "cosine" (down to a tenth) or "constant"
    floor: float = 0.1  # where the cosine ends, as a share of the base rate
    accumulate: int = 1  # micro-batches per step, their gradients summed (loss_fn gets step * accumulate + k)
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes)
    accelerator: object = None  # an accelerate Accelerator (see accelerator()); None: this process alone, as it is
    after_step: Callable[[int], None] | None = None  # called in the main process with each finished step's number

    def factor(self, step: int) -> float:
        """The learning rate at `step`, as a share of the base rate."""
        return lr_factor(step, self.steps, self.warmup, self.floor, self.schedule)

    def _gradients(self, loss_fn: Callable[[int], torch.Tensor], step: int) -> float:
        """The step's gradients (summed over its micro-batches, each loss / accumulate; averaged over the processes),
        and its mean loss."""
        total = 0.0
        for k in range(self.accumulate):
            loss = loss_fn(step if self.accumulate == 1 else step * self.accumulate + k)
            if not torch.isfinite(loss):
                raise UserError(f"{self.name}: the loss became {loss.item()} at step {step}; "
                                "lower the learning rate (--lr) and resume")
            scaled = loss if self.accumulate == 1 else loss / self.accumulate
            scaled.backward() if self.accelerator is None else self.accelerator.backward(scaled)
            total += loss.detach()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, "mean")
        return float(total) / self.accumulate

    def train(self, loss_fn: Callable[[int], torch.Tensor], progress: bool = True) -> dict[str, EMA]:
        """Run loss_fn(step) -> loss from the checkpoint's step (or 0) to `steps` (with `accumulate` > 1, loss_fn of
        each micro-batch's number); returns each module's EMA (none without ema_decay)."""
        from tqdm import tqdm

        params = [p for m in self.modules.values() for p in m.parameters()]
        groups = [{"params": list(m.parameters()), "lr": self.module_lr.get(name, self.lr)}
                  for name, m in self.modules.items()]
        opt = optimizer(groups, self.optimizer, self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)
        acc, main = self.accelerator, self.accelerator is None or self.accelerator.is_main_process
        for m in self.modules.values():  # (before DDP, which averages the gradients of what trains when it starts)
            m.train().requires_grad_(True)
        if acc is not None:  # (the schedule stays ours: accelerate's would step once per process)
            step_fn, opt = acc.prepare(_Steps(self.modules, loss_fn), opt)
            loss_fn = step_fn
        scaler = getattr(acc, "scaler", None)
        emas = {name: EMA(m, self.ema_decay) for name, m in self.modules.items()} if self.ema_decay is not None else {}
        start = 0
        if self.checkpoint is not None and self.checkpoint.is_file():
            state = load_checkpoint(self.checkpoint)
            for name, m in self.modules.items():
                m.load_state_dict(state["modules"][name])
                if name in emas and name in state["ema"]:  # (a run resumed with EMA newly on starts it here)
                    emas[name].shadow = state["ema"][name]
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["schedule"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start, self.losses = state["step"], list(state["losses"])

        def save(step):
            if self.checkpoint is not None and main:
                state = {"step": step, "losses": self.losses, "optimizer": opt.state_dict(),
                         "schedule": sched.state_dict(), "modules": {n: m.state_dict() for n, m in self.modules.items()},
                         "ema": {n: e.shadow for n, e in emas.items()},
                         "scaler": scaler.state_dict() if scaler is not None else None}
                write_atomic(self.checkpoint, lambda tmp: torch.save(state, tmp))

        bar = tqdm(total=self.steps, initial=start, desc=self.name, unit="step", disable=not progress or not main)
        try:  # Ctrl-C leaves the last checkpoint as it was: resuming repeats at most `every` steps, exactly
            for step in range(start, self.steps):
                began = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = self._gradients(loss_fn, step)
                if acc is None:
                    torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
                else:  # (first unscaling fp16's gradients)
                    acc.clip_grad_norm_(params, self.clip_grad)
                opt.step()
                sched.step()
                for name, ema in emas.items():
                    ema.update(self.modules[name], step)
                self.losses.append(loss)
                self.seconds.append(time.perf_counter() - began)
                recent = self.losses[-50:]
                bar.update(1)
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}",
                                lr=f"{self.lr * self.factor(step + 1):.1e}")
                if (step + 1) % self.every == 0 or step + 1 == self.steps:
                    save(step + 1)
                if self.after_step is not None and main:
                    self.after_step(step + 1)
        finally:
            bar.close()
        for m in self.modules.values():
            m.eval().requires_grad_(False)
        return emas
