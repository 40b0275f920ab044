"""Each 3x3 convolution of SD's UNet (a guided step, batch 2) and VAE decoder at one image size, timed as the
direct convolution (torch's, as diffusers runs it) and by our Winograd F(4x4, 3x3), with which one our models
take (stablediff.nn.winograd.applies). The evidence for its thresholds.

    python bench/winograd.py [--size 512] [--reps 3]

Appends a table to BENCHMARKS.md.
"""
import argparse
import collections
import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from report import append, machine
from speed import paired


def conv_shapes(size: int) -> collections.Counter:
    """(model, n, c, k, h, w) -> how many times a 3x3 stride-1 convolution meets that input in one UNet step
    (batch 2) and one VAE decode at size x size pixels (random weights: only the shapes matter)."""
    from stablediff.models.unet import SD1_UNET, UNet
    from stablediff.models.vae import SD_VAE, AutoencoderKL

    shapes = collections.Counter()

    def counter(name):
        def hook(module, inputs, _):
            if module.kernel_size == (3, 3) and module.stride == (1, 1):
                shapes[(name, *inputs[0].shape[:2], module.out_channels, *inputs[0].shape[2:])] += 1
        return hook

    s = size // 8
    with torch.device("meta"):
        unet, vae = UNet(SD1_UNET), AutoencoderKL(SD_VAE)
    for name, model in (("UNet", unet), ("VAE", vae)):
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(counter(name))
    with torch.no_grad():
        meta = functools.partial(torch.empty, device="meta")
        unet(meta(2, 4, s, s), meta(2), meta(2, 77, 768))
        vae.decode(meta(1, 4, s, s))
    return shapes


def main() -> None:
    from stablediff.nn import winograd

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    rows, totals = [], collections.defaultdict(lambda: [0.0, 0.0])
    for (model, n, c, k, h, w), count in sorted(conv_shapes(args.size).items()):
        g = torch.Generator().manual_seed(0)
        x, weight = torch.randn(n, c, h, w, generator=g), torch.randn(k, c, 3, 3, generator=g) / (3 * c ** 0.5)
        bias = torch.randn(k, generator=g)
        with torch.no_grad():
            taken = winograd.applies(torch.nn.Conv2d(c, k, 3, padding=1, device="meta"), x)  # shape only
            direct, wino = paired(lambda: F.conv2d(x, weight, bias, padding=1), lambda: winograd.conv3x3(
                F.pad(x, (1, 1, 1, 1)), winograd.filters(weight), bias), args.reps)
        totals[model][0] += count * direct
        totals[model][1] += count * (wino if taken else direct)
        rows.append(f"| {model} | {n} x {c} x {h} x {w} -> {k} | {count} | {direct * 1e3:.0f} ms | "
                    f"{wino * 1e3:.0f} ms | {wino / direct:.2f}x | {'Winograd' if taken else 'direct'} |")
        print(rows[-1], flush=True)
    lines = [f"Machine: {machine()}, {torch.get_num_threads()} threads.",
             f"Command: `python bench/winograd.py {' '.join(sys.argv[1:])}`. Every 3x3 stride-1 convolution of a "
             f"guided UNet step (batch 2) and a VAE decode at {args.size}x{args.size}, random fp32 inputs and weights; "
             "median of the runs after a warm-up, the two timed in turn. Winograd's time includes its filter "
             "transform, redone at every call.", "",
             "| model | input -> outputs | per step | direct | Winograd | ratio | ours takes |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    lines += [f"All 3x3 convolutions of one {model} {'step' if model == 'UNet' else 'decode'}: direct {d:.2f} s, "
              f"as our models run them {o:.2f} s ({o / d:.2f}x)." for model, (d, o) in totals.items()]
    append(f"Winograd 3x3 convolutions against direct ones, {args.size}x{args.size}", lines)


if __name__ == "__main__":
    main()
