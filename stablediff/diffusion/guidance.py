"""Denoisers around denoisers: classifier-free guidance."""
import torch


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale * (D_c - D_u), one batched model call.

    cond: {"context": text states, "uncond": negative-prompt states, "extra": other model inputs}.
    """

    def __init__(self, inner, scale: float):
        self.inner, self.scale = inner, scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        if self.scale == 1.0 or cond.get("uncond") is None:
            return self.inner(x, sigma, cond)
        extra = {k: torch.cat([v, v]) for k, v in cond.get("extra", {}).items()}
        both = {"context": torch.cat([cond["uncond"], cond["context"]]), "extra": extra}
        uncond, text = self.inner(torch.cat([x, x]), sigma, both).chunk(2)
        return uncond + self.scale * (text - uncond)
