"""Training losses, for any model of SD's architecture: the autoencoder's, the text encoder's caption reading,
and latent diffusion's."""
import torch
import torch.nn.functional as F
from torch import nn

from stablediff.diffusion.schedules import TrainSchedule
from stablediff.models.unet import ResBlock, SpatialTransformer, UNet


def init_fresh(module: nn.Module) -> nn.Module:
    """Initialise a model built for training from scratch: embeddings as CLIP's (normal, std 0.02; our
    modules skip that init because checkpoints overwrite it), and the UNet's residual outputs at zero, as
    CompVis' zero_module does, so each block starts as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        zero = []
        if isinstance(m, ResBlock):
            zero = [m.out_layers[-1]]
        elif isinstance(m, SpatialTransformer):
            zero = [m.proj_out]
        elif isinstance(m, UNet):
            zero = [m.out[-1]]
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float = 1e-5) -> torch.Tensor:
    """L1 + L2 reconstruction of images in [-1, 1] from a posterior sample, plus a small KL to N(0, 1)."""
    mean, logvar = vae.encode(images)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean)
    recon = vae.decode(mean + (0.5 * logvar).exp() * noise).float()
    kl = 0.5 * (mean.float().square() + logvar.float().exp() - 1 - logvar.float()).mean()
    return (recon - images).abs().mean() + (recon - images).square().mean() + kl_weight * kl


def rows(generator: torch.Generator | list[torch.Generator], n: int, draw) -> torch.Tensor:
    """draw(generator, k) -> k rows, for a batch of n: one draw, or, given a generator per row, a draw from each (so
    that a row's noise does not depend on the batch it is in: a batch split over processes draws as it does whole)."""
    if isinstance(generator, torch.Generator):
        return draw(generator, n)
    return torch.cat([draw(g, 1) for g in generator])


def diffusion_loss(unet, text_encoder, latents: torch.Tensor, ids: torch.Tensor, schedule: TrainSchedule,
                   generator: torch.Generator | list[torch.Generator], noise_offset: float = 0.0,
                   min_snr_gamma: float | None = None, text_skip: int | None = None,
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The noise-prediction (or v) loss at timesteps drawn uniformly from the discrete training schedule.
    latents: scaled latents (B,4,h,w); ids: (B,77) token ids of the captions; generator: one, or one per row (see
    rows). noise_offset: a per-channel constant added to the noise (darker darks and lighter lights, as in kohya's
    --noise_offset); min_snr_gamma: each sample's loss weighted min(SNR, gamma) / SNR (Hang et al. 2023; / (SNR + 1)
    for v); text_skip: the text encoder's layers skipped (clip skip - 1 past its own); tokens: (B,77,D) token
    embeddings in place of the ids' own (textual inversion's vectors written in)."""
    b, c = latents.shape[:2]
    t = rows(generator, b, lambda g, k: torch.randint(0, schedule.num_train_timesteps, (k,), generator=g,
                                                      device=g.device))
    a = schedule.alphas_cumprod().float()[t.cpu()].to(latents.device)[:, None, None, None]
    noise = rows(generator, b, lambda g, k: torch.randn((k, *latents.shape[1:]), generator=g, device=g.device))
    noise = noise.to(latents)
    if noise_offset:
        noise = noise + noise_offset * rows(generator, b, lambda g, k: torch.randn(
            (k, c, 1, 1), generator=g, device=g.device)).to(latents)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = noise if schedule.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
    context = text_encoder(ids) if text_skip is None and tokens is None else text_encoder(ids, text_skip, tokens)
    pred = unet(x_t.contiguous(memory_format=torch.channels_last), t.float().to(latents.device), context)
    if min_snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    snr = (a / (1 - a)).flatten()
    weight = snr.clamp(max=min_snr_gamma) / (snr if schedule.prediction == "epsilon" else snr + 1)
    return ((pred.float() - target.float()).square().mean(dim=(1, 2, 3)) * weight).mean()


def caption_loss(text_encoder, heads: nn.ModuleDict, ids: torch.Tensor, end_id: int,
                 labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed cross-entropy of what each caption names (labels: attribute -> (B,) class indices), each
    read by its linear head from every state at and after the caption's end token. A causal text encoder has
    read the whole caption into those states, and they are most of the 77 that the UNet's cross-attention
    sees (SD 1.x pads with the end token): trained so, every one of them says what the caption asks for.
    ids: (B, T) token ids."""
    after = (ids == end_id).cumsum(1) > 0
    states, rows = text_encoder(ids)[after], after.sum(1)
    return sum(F.cross_entropy(head(states).float(), labels[name].repeat_interleave(rows))
               for name, head in heads.items())
