"""SDXL's refiner: the base model walks the schedule down to the switch, the refiner walks the rest from the base's
latents (diffusers' denoising_end / denoising_start, AUTOMATIC1111's "Refiner switch at")."""
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from stablediff.adapters.lora import take_tags
from stablediff.errors import UserError
from stablediff.pipelines import common


@dataclass
class Refiner:
    """A loaded model (StableDiffusion) to finish the images, and the fraction of the schedule after which it takes
    over: the base runs the steps whose training timestep is at least round(1000 * (1 - switch))."""

    model: Any
    switch: float = 0.8

    def check(self) -> None:
        if not 0 < self.switch < 1:
            raise UserError(f"the refiner switch must be between 0 and 1, the fraction of the steps the base model "
                            f"runs (got {self.switch:g})")
        if self.model.unet.config.in_channels != 4:
            raise UserError(f"the refiner's UNet takes {self.model.unet.config.in_channels} input channels; a refiner "
                            "continues latents and needs an ordinary 4-channel model")


def switch_step(denoiser, sigmas: torch.Tensor, switch: float, n_train: int = 1000) -> int:
    """How many of the steps along `sigmas` the base runs: those at timesteps >= the cutoff (diffusers' rule)."""
    cutoff = round(n_train - switch * n_train)
    return int((denoiser.sigma_to_t(sigmas[:-1]).round() >= cutoff).sum())


def sample(model, job: common.Job, x: torch.Tensor, sigmas: torch.Tensor, refiner: Refiner | None,
           callback: Callable | None = None) -> tuple[torch.Tensor, Any]:
    """common.sample, with the refiner (if any) taking over at the switch; the latents and the model whose VAE is
    to decode them (the one that ran the last step, as in diffusers and the webui). The refiner's sampler starts
    afresh (a multistep sampler's history is not carried over, as in diffusers); the images' noise generators go on."""
    if refiner is None:
        return common.sample(model, job, x, sigmas, callback=callback), model
    k = switch_step(model.denoiser(), sigmas, refiner.switch)
    if k > 0:
        latents = common.sample(model, job, x, sigmas[:k + 1], callback=callback)
        x = latents * (1 + sigmas[k] ** 2) ** 0.5
    if k == len(sigmas) - 1:
        return latents, model
    other = refiner.model
    other.lora_merger.sync(other, other.loras)  # the prompts' LoRA tags are the base model's
    prompts = [take_tags(p, model.lora_dir)[0] for p in job.prompts]
    texts = common.condition(other, prompts, job.negatives, job.steps, job.width, job.height)
    late = (lambda i, *a: callback(i + k, *a)) if callback is not None else None
    return common.sample(other, replace(job, texts=texts), x, sigmas[k:], callback=late), other


def infotext(refiner: Refiner | None) -> dict:
    if refiner is None:
        return {}
    name = refiner.model.name + (f" [{refiner.model.model_hash}]" if refiner.model.model_hash else "")
    return {"Refiner": name, "Refiner switch at": f"{refiner.switch:g}"}
