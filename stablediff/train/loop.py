"""What every training run shares: AdamW with warm-up and cosine decay, EMA weights, bf16 autocast where the
hardware does bf16 matrix work natively, checkpoints to resume from (written atomically, read back with
the weights-only unpickler), and a progress bar with the loss.

A run is deterministic in its step number: the loss function draws its data and noise from a generator
seeded by the step, so a resumed run continues exactly where the checkpoint left it.
"""
import contextlib
import math
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
    schedule: str = "cosine"  # after the warm-up: "cosine" (down to a tenth) or "constant"
    floor: float = 0.1  # where the cosine ends, as a share of the base rate
    accumulate: int = 1  # micro-batches per step, their gradients summed (loss_fn gets step * accumulate + k)

    def factor(self, step: int) -> float:
        """The learning rate at `step`, as a share of the base rate."""
        return lr_factor(step, self.steps, self.warmup, self.floor, self.schedule)

    def _gradients(self, loss_fn: Callable[[int], torch.Tensor], step: int) -> float:
        """The step's gradients (summed over its micro-batches, each loss / accumulate), and its mean loss."""
        total = 0.0
        for k in range(self.accumulate):
            loss = loss_fn(step if self.accumulate == 1 else step * self.accumulate + k)
            if not torch.isfinite(loss):
                raise UserError(f"{self.name}: the loss became {loss.item()} at step {step}; "
                                "lower the learning rate (--lr) and resume")
            (loss if self.accumulate == 1 else loss / self.accumulate).backward()
            total += loss.item()
        return total / self.accumulate

    def train(self, loss_fn: Callable[[int], torch.Tensor], progress: bool = True) -> dict[str, EMA]:
        """Run loss_fn(step) -> loss from the checkpoint's step (or 0) to `steps` (with `accumulate` > 1, loss_fn of
        each micro-batch's number); returns each module's EMA (none without ema_decay)."""
        from tqdm import tqdm

        params = [p for m in self.modules.values() for p in m.parameters()]
        groups = [{"params": list(m.parameters()), "lr": self.module_lr.get(name, self.lr)}
                  for name, m in self.modules.items()]
        # fused: one kernel for all parameters (on CPU several times faster than the loop over them)
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.0, fused=params[0].device.type in ("cpu", "cuda"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)
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
            start, self.losses = state["step"], list(state["losses"])

        def save(step):
            if self.checkpoint is not None:
                state = {"step": step, "losses": self.losses, "optimizer": opt.state_dict(),
                         "schedule": sched.state_dict(), "modules": {n: m.state_dict() for n, m in self.modules.items()},
                         "ema": {n: e.shadow for n, e in emas.items()}}
                write_atomic(self.checkpoint, lambda tmp: torch.save(state, tmp))

        for m in self.modules.values():
            m.train().requires_grad_(True)
        bar = tqdm(total=self.steps, initial=start, desc=self.name, unit="step", disable=not progress)
        try:  # Ctrl-C leaves the last checkpoint as it was: resuming repeats at most `every` steps, exactly
            for step in range(start, self.steps):
                opt.zero_grad(set_to_none=True)
                loss = self._gradients(loss_fn, step)
                torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
                opt.step()
                sched.step()
                for name, ema in emas.items():
                    ema.update(self.modules[name], step)
                self.losses.append(loss)
                recent = self.losses[-50:]
                bar.update(1)
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}",
                                lr=f"{self.lr * self.factor(step + 1):.1e}")
                if (step + 1) % self.every == 0 or step + 1 == self.steps:
                    save(step + 1)
        finally:
            bar.close()
        for m in self.modules.values():
            m.eval().requires_grad_(False)
        return emas
