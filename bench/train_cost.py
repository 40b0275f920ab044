"""Where `stablediff train`'s time goes: each stage of the recipe (the real stage functions, on the demo's config
and drawn scenes) timed per step, with its FLOPs and how near that runs to the machine's matmul peak, and the
whole default recipe's minutes estimated from those rates.

    python bench/train_cost.py [--steps 20] [--precision auto|fp32|bf16]

Appends a table to BENCHMARKS.md.
"""
import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from report import append, machine
from speed import flops, matmul_peak, once as timed


def stages(settings):
    """(name -> (steps in the default recipe, run(settings, steps, work) training that stage for `steps`), the
    VAE they train). The VAE runs as in the recipe: 80% of its steps on 32-pixel crops, then whole pictures."""
    from stablediff.checkpoints.original import (clip_from_yaml, config_text, parse_yaml, schedule_from_yaml,
                                                 unet_from_yaml, vae_from_yaml)
    from stablediff.models.clip_text import ClipTextConfig, ClipTextModel
    from stablediff.models.tokenizer import ClipTokenizer
    from stablediff.models.unet import UNet
    from stablediff.models.vae import AutoencoderKL
    from stablediff.train import recipe
    from stablediff.train.objectives import init_fresh

    params = parse_yaml(config_text(settings.config), settings.config)
    cpu = torch.device("cpu")
    vae = init_fresh(AutoencoderKL(vae_from_yaml(params)))
    text_encoder = init_fresh(ClipTextModel(clip_from_yaml(params, ClipTextConfig())))
    unet = init_fresh(UNet(unet_from_yaml(params["unet_config"]["params"]))).to(memory_format=torch.channels_last)
    tokenizer, data = ClipTokenizer(), recipe.dataset(replace(settings, images=2000))
    latents = torch.randn(len(data), 4, 16, 16), torch.full((len(data), 4, 16, 16), 0.1)
    schedule = schedule_from_yaml(params)
    return {
        "VAE (crops, then whole pictures)": (settings.vae_steps, lambda s, n, w: recipe.train_vae(
            vae, data, replace(s, vae_steps=n), w, cpu, False)),
        "text encoder reading captions": (settings.text_steps, lambda s, n, w: recipe.train_text(
            text_encoder, tokenizer, data, replace(s, text_steps=n), w, cpu, False)),
        "text encoder + UNet": (settings.steps, lambda s, n, w: recipe.train_diffusion(
            text_encoder, unet, tokenizer, data, latents, 1.0, schedule, replace(s, steps=n), w, cpu, False)),
    }, vae


def main() -> None:
    from stablediff.train import recipe
    from stablediff.train.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="n, a multiple of 5: each stage is timed over n and 2n steps")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the recipe's --precision (auto: bf16 where this CPU does it natively)")
    args = parser.parse_args()
    if args.steps < 5 or args.steps % 5:  # else n and 2n VAE steps split into crops and whole pictures unlike 80/20
        parser.error("--steps must be a multiple of 5")
    settings = recipe.concrete(Settings(precision=args.precision), torch.device("cpu"))  # auto as train resolves it
    bf16 = settings.precision == "bf16"
    peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32)
    rows, minutes = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        runs, vae = stages(settings)
        for i, (name, (recipe_steps, run)) in enumerate(runs.items()):
            work = {tag: Path(tmp) / f"{i}-{tag}" for tag in ("flops", "warm", "short", "long")}
            for path in work.values():
                path.mkdir()
            run(settings, 2, work["warm"])
            # the difference of a run of n steps and one of 2n: a run's setup and final checkpoint cancel out
            short = timed(lambda: run(settings, args.steps, work["short"]))
            long = timed(lambda: run(settings, 2 * args.steps, work["long"]))
            seconds = (long - short) / args.steps
            step_flops = flops(lambda: run(settings, args.steps, work["flops"])) / args.steps
            minutes += recipe_steps * seconds / 60
            rows.append(f"| {name} | {recipe_steps:,} | {step_flops / 1e9:.1f} GFLOP | {seconds:.3f} s | "
                        f"{step_flops / seconds / 1e9:.0f} GFLOP/s ({step_flops / seconds / peak:.0%}) | "
                        f"{recipe_steps * seconds / 60:.1f} min |")
        # encoding with the VAE that the first stage trained, as the recipe does
        cpu, sample = torch.device("cpu"), replace(settings, images=1000)
        data = recipe.dataset(sample)
        one = replace(sample, images=1)
        picture_flops = flops(lambda: recipe.encode_dataset(vae, recipe.dataset(one), one, Path(tmp), cpu))
        for batch in (16, 250):
            (Path(tmp) / "latents.pt").unlink(missing_ok=True)
            seconds = timed(lambda: recipe.encode_dataset(vae, data, sample, Path(tmp), cpu, batch=batch))
            seconds /= len(data)
            if batch == 16:
                minutes += settings.images * seconds / 60
            rows.append(f"| encoding the dataset, batch {batch}{'' if batch == 16 else ' (before)'} | "
                        f"{settings.images:,} pictures | {picture_flops / 1e9:.2f} GFLOP | {seconds * 1e3:.1f} ms | "
                        f"{picture_flops / seconds / 1e9:.0f} GFLOP/s ({picture_flops / seconds / peak:.0%}) | "
                        f"{settings.images * seconds / 60:.1f} min |")
    append("Demo model: the training recipe's cost per stage", [
        f"Machine: {machine()}; matmul peak {peak / 1e9:.0f} GFLOP/s in {'bf16' if bf16 else 'fp32'}.",
        f"Command: `python bench/train_cost.py --steps {args.steps} --precision {args.precision}`"
        f"{' (bf16 autocast here)' if bf16 else ''}. Each stage of the default recipe "
        f"(`{settings.command()}`) run by its own function (optimizer, gradient clipping and EMA included; drawn "
        f"scenes, random latents); the time per step is that of {2 * args.steps} steps less that of {args.steps}, "
        "FLOPs counted by torch.utils.flop_counter (matrix products, convolutions and attention), the rate against "
        "the matmul peak; the stage's minutes are its recipe steps at that rate.",
        "",
        "| stage | recipe steps | work per step | time per step | rate (of peak) | minutes |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"The whole default recipe at these rates: about {minutes:.0f} minutes.",
    ])


if __name__ == "__main__":
    main()
