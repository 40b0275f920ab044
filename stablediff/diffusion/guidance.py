"""Denoisers around denoisers: classifier-free guidance, and inpainting with an ordinary model."""
import torch


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): D_u + scale * (D_c - D_u), one batched model call.
    With composable prompts (Liu et al. 2022, "a AND b:0.5") each image has several conditional rows and
    D = D_u + sum_j scale * w_j * (D_j - D_u), as the webui computes it.

    cond: {"context": text states (one row per image, or per prompt part), "uncond": negative-prompt states,
    "parts": per image [(context row, weight), ...] or None, "concat": extra input channels, "extra": other inputs,
    and for SDXL "vector" and "uncond_vector", the rows of the UNet's added vector that go with context and uncond}.
    interval: (low, high), the sigmas at which guidance applies; at the others, scale 1: the prompt's prediction
    alone, one model call without the negative rows (Kynkaanniemi et al. 2024, "Applying guidance in a limited
    interval improves sample and distribution quality in diffusion models"). None: every sigma.
    """

    def __init__(self, inner, scale: float, interval: tuple[float, float] | None = None):
        self.inner, self.scale, self.interval = inner, scale, interval

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        parts = cond.get("parts")
        scale = self.scale
        if self.interval is not None and not self.interval[0] <= float(sigma.reshape(-1)[0]) <= self.interval[1]:
            scale = 1.0
        if parts is None and (scale == 1.0 or cond.get("uncond") is None):
            return self.inner(x, sigma, cond)
        n = x.shape[0]
        parts = parts or [[(i, 1.0)] for i in range(n)]
        owner = torch.tensor([i for i, p in enumerate(parts) for _ in p], device=x.device)
        rows = torch.tensor([r for p in parts for r, _ in p], device=cond["context"].device)
        index = torch.cat([torch.arange(n, device=x.device), owner])
        # one batch: each latent once, with its rows of text (the model runs what comes before the text once)
        both = {"context": torch.cat([cond["uncond"], cond["context"][rows]]), "rows": index,
                "concat": cond.get("concat"), "extra": cond.get("extra", {})}
        if cond.get("vector") is not None:  # SDXL: pooled text and size conditioning, one row per text row
            both["vector"] = torch.cat([cond["uncond_vector"], cond["vector"][rows]])
        out = self.inner(x, sigma, both)
        uncond, text = out[:n], out[n:]
        if len(text) == n and all(p[0][1] == 1.0 for p in parts):
            return uncond + scale * (text - uncond)
        guided = uncond.clone()
        for k, (i, weight) in enumerate((i, w) for i, p in enumerate(parts) for _, w in p):
            guided[i] += (text[k] - uncond[i]) * (weight * scale)
        return guided


class PromptSchedule:
    """Prompt editing and alternation: the text conditioning changes with the step. `per_step[i]` holds the text
    inputs of step i of `sigmas`; a call at sigma belongs to the step whose interval [sigmas[i+1], sigmas[i]) holds
    it (a second-order sampler's evaluation at exactly sigmas[i+1] counts as the next step's)."""

    def __init__(self, inner, sigmas: torch.Tensor, per_step: list[dict]):
        self.inner, self.per_step = inner, per_step
        self.starts = sigmas[:-1].double().cpu()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])
        step = int((self.starts >= s * (1 - 1e-6)).sum()) - 1
        return self.inner(x, sigma, {**cond, **self.per_step[min(max(step, 0), len(self.per_step) - 1)]})


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
