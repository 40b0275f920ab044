"""SDXL speed on the CPU, stablediff vs diffusers, side by side in one process on the same full-size SDXL-shaped
random weights: a guided 1024x1024 UNet step (batch 2: negative and prompt, with the pooled text and size vector)
and a 1024x1024 VAE decode, each side timed in turn after a warm-up call.

    python bench/sdxl.py [--precision bf16|fp32] [--reps 2]

The weights are diffusers' (its SDXL 1.0 UNet and VAE configs, random), loaded into ours through the same key
maps and fast layouts as a real file. Needs the test extra and about 16 GB of memory in bf16 (26 GB in fp32).
Appends a table to BENCHMARKS.md.
"""
import argparse
import sys

import torch

from report import machine, prepend
from speed import CPU, DTYPES, as_processes, flops, matmul_peak, paired

# SDXL 1.0's UNet and VAE, as in its diffusers folder
UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
VAE = dict(block_out_channels=(128, 256, 512, 512), in_channels=3, out_channels=3, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
           sample_size=1024, scaling_factor=0.13025)


def build(dtype: torch.dtype):
    """diffusers' UNet and VAE with random weights, and ours with the same weights."""
    from diffusers import AutoencoderKL as TheirVAE
    from diffusers import UNet2DConditionModel

    from stablediff.api import _build
    from stablediff.checkpoints.diffusers_folder import unet_config, vae_config
    from stablediff.checkpoints.keymaps import unet_prefixes, vae_prefixes
    from stablediff.models.unet import UNet
    from stablediff.models.vae import AutoencoderKL

    torch.manual_seed(0)
    theirs = {}
    for name, cls, config in (("unet", UNet2DConditionModel, UNET), ("vae", TheirVAE, VAE)):
        torch.set_default_dtype(dtype)  # initialised in the run's dtype: a full-size fp32 copy is not needed
        theirs[name] = cls(**config).eval().requires_grad_(False)
        torch.set_default_dtype(torch.float32)
    ucfg, vcfg = unet_config(theirs["unet"].config), vae_config(theirs["vae"].config)
    ours = {"unet": _build(UNet, ucfg, theirs["unet"].state_dict(), unet_prefixes(ucfg), "unet", dtype, CPU),
            "vae": _build(AutoencoderKL, vcfg, theirs["vae"].state_dict(), vae_prefixes(vcfg), "vae", dtype, CPU)}
    return ours, theirs


def unet_steps(ours, theirs, dtype: torch.dtype):
    """One guided step at 1024x1024 on each side, on the same inputs."""
    from stablediff.diffusion.denoiser import Denoiser
    from stablediff.diffusion.guidance import CFGDenoiser
    from stablediff.diffusion.schedules import TrainSchedule
    from stablediff.models.unet import size_vector

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 128, 128, generator=g)
    context, pooled = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 1280, generator=g)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    vector = torch.cat([pooled, size_vector(ids, 256)], 1)
    sigma = torch.tensor(5.0)
    inner = Denoiser(ours, TrainSchedule())
    denoiser = CFGDenoiser(inner, 7.5)
    cond = {"context": context[1:].to(dtype), "uncond": context[:1].to(dtype), "vector": vector[1:],
            "uncond_vector": vector[:1]}
    t = inner.sigma_to_t(sigma.reshape(1))

    def ours_step():
        with torch.no_grad():
            return denoiser(x, sigma, cond)

    def theirs_step():  # as ours, the denoised latents: x - sigma * the guided noise prediction
        with torch.no_grad():
            latent = torch.cat([x, x]).to(dtype) / (sigma**2 + 1) ** 0.5
            added = {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}
            u, c = theirs(latent, t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample.chunk(2)
            return x - sigma * (u + 7.5 * (c - u)).float()
    return ours_step, theirs_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="bf16", choices=DTYPES)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    dtype = DTYPES[args.precision]
    peak = matmul_peak(dtype)
    ours, theirs = build(dtype)
    rows = []
    ours_step, theirs_step = unet_steps(ours["unet"], theirs["unet"], dtype)
    with torch.no_grad():
        a, b = ours_step(), theirs_step()
        diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    rows.append(("guided UNet step, 1024x1024", *paired(*as_processes(ours_step, theirs_step), args.reps),
                 flops(theirs_step)))
    print(rows[-1], flush=True)
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        decode_ours, decode_theirs = (lambda: ours["vae"].decode(z)), (lambda: theirs["vae"].decode(z).sample)
        rows.append(("VAE decode, 1024x1024", *paired(*as_processes(decode_ours, decode_theirs), args.reps),
                     flops(decode_theirs)))
    print(rows[-1], flush=True)
    lines = [f"Machine: {machine()}, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.0f} GFLOP/s in "
             f"{args.precision}.", f"Command: `python bench/sdxl.py {' '.join(sys.argv[1:])}`. "
             "Full-size SDXL 1.0-shaped random weights (diffusers' UNet and VAE, the same tensors loaded into ours); median of the runs after a "
             "warm-up, the two sides in turn; the limit is the FLOPs (counted on diffusers' side) at the matmul peak. "
             f"The two guided outputs differ by at most {diff:.3g} where they reach {scale:.3g} "
             f"({diff / scale:.2%} of it).", "",
             "| what | stablediff | diffusers | ratio | arithmetic limit | stablediff / limit |",
             "|---|---|---|---|---|---|"]
    for what, a, b, n in rows:
        lines.append(f"| {what} | {a:.2f} s | {b:.2f} s | {a / b:.2f}x | {n / peak:.2f} s ({n / 1e12:.2f} TFLOP) | "
                     f"{a / (n / peak):.1f}x |")
    prepend(f"SDXL speed, {args.precision}: stablediff vs diffusers on the CPU", lines)


if __name__ == "__main__":
    main()
