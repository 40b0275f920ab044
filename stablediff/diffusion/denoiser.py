"""A discrete-time eps or v model as a denoiser D(x, sigma, cond) -> x0 (Karras et al. 2022, sec. 3)."""
import torch

from stablediff.diffusion.schedules import TrainSchedule


class Denoiser:
    """Wraps unet(x, t, context, rows, **extra) trained on `sched`; the sampler state x stays in fp32. With
    cond["rows"] the context has its own rows, each naming the row of x it conditions, and so has the result."""

    def __init__(self, unet, sched: TrainSchedule, quantize: bool = False):
        self.unet, self.prediction, self.quantize = unet, sched.prediction, quantize
        self.sigmas = sched.sigmas().float()  # ascending in t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) training timestep of sigma, interpolating linearly in log sigma."""
        log_sigma = sigma.float().clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        dists = log_sigma[None] - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        return t.round() if self.quantize else t

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        sigma = sigma.reshape(-1).float().expand(x.shape[0]).to(x.device)
        s = sigma[:, None, None, None]
        c_in = (s**2 + 1) ** -0.5
        dtype = next(self.unet.parameters()).dtype
        extra = cond.get("extra", {})
        inp = x * c_in
        if cond.get("concat") is not None:  # inpainting/depth models: extra input channels, not scaled
            inp = torch.cat([inp, cond["concat"]], dim=1)
        rows = cond.get("rows")  # the x row of each context row, where latents are shared (UNet.forward)
        if cond.get("vector") is not None:  # SDXL: one row per row of context
            extra = {**extra, "vector": cond["vector"]}
        out = self.unet(inp.to(dtype), self.sigma_to_t(sigma), cond["context"].to(dtype), rows=rows, **extra).float()
        if rows is not None:
            x, s, c_in = x[rows], s[rows], c_in[rows]
        if self.prediction == "v":
            return x / (s**2 + 1) - out * s * c_in
        return x - out * s
