"""Denoisers around denoisers: classifier-free guidance, and inpainting with an ordinary model."""
import torch


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale * (D_c - D_u), one batched model call.

    cond: {"context": text states, "uncond": negative-prompt states, "concat": extra input channels,
    "extra": other model inputs}.
    """

    def __init__(self, inner, scale: float):
        self.inner, self.scale = inner, scale

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        if self.scale == 1.0 or cond.get("uncond") is None:
            return self.inner(x, sigma, cond)
        extra = {k: torch.cat([v, v]) for k, v in cond.get("extra", {}).items()}
        both = {"context": torch.cat([cond["uncond"], cond["context"]]), "extra": extra}
        if cond.get("concat") is not None:
            both["concat"] = torch.cat([cond["concat"], cond["concat"]])
        uncond, text = self.inner(torch.cat([x, x]), sigma, both).chunk(2)
        return uncond + self.scale * (text - uncond)


class MaskedDenoiser:
    """Inpainting with an ordinary model: where mask is 0 the state follows the original's latents noised to the
    current sigma (x = m * x + (1 - m) * (x0 + sigma * noise)) and the estimate is the original itself, so the
    known region ends exactly at x0 while the model repaints where mask is 1."""

    def __init__(self, inner, x0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
        self.inner, self.x0, self.mask, self.noise = inner, x0, mask, noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        known = self.x0 + self.noise * sigma
        x = self.mask * x + (1 - self.mask) * known
        return self.mask * self.inner(x, sigma, cond) + (1 - self.mask) * self.x0
