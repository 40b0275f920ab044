"""Large VAE decodes: time, peak memory, and the difference from a whole-image decode, stablediff's banded decode
against diffusers' tiled one (enable_tiling), on the full-size SD VAE with random weights.

Each case runs in its own process, so its peak RSS (from wait4) is its own; each writes its image, and the
parent compares a banded or tiled image with the same side's whole decode at the same size.

    python bench/vae_memory.py [--sizes 1024 2048] [--whole-up-to 1024] [--sides stablediff diffusers]
"""
import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from report import append, machine, run_process

CHILD = """
import sys, time, numpy as np, torch
side, mode, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
z = torch.nn.functional.interpolate(z[:, :, ::8, ::8], size=z.shape[-2:], mode="bicubic") + 0.3 * z
with torch.no_grad():
    if side == "stablediff":
        from stablediff.models.vae import SD_VAE, AutoencoderKL
        vae = AutoencoderKL(SD_VAE).eval()
        start = time.perf_counter()
        x = vae.decode(z, banded=mode != "whole")
    else:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512).eval()  # as SD 1.5's VAE config: enable_tiling's tiles are 512 pixels
        if mode != "whole":
            vae.enable_tiling()
        start = time.perf_counter()
        x = vae.decode(z).sample
seconds = time.perf_counter() - start
from stablediff.pipelines.common import to_uint8
np.save(out, to_uint8(x[0]).numpy())
print(seconds)
"""


PARTIAL = {"stablediff": "banded", "diffusers": "tiled"}  # each side's way to decode in less memory


def run(side: str, mode: str, size: int, workdir: Path) -> tuple[float, float, Path]:
    """(seconds of the decode, peak RSS in GiB of the whole process, the image file)."""
    out = workdir / f"{side}-{mode}-{size}.npy"
    _, rss, seconds = run_process([sys.executable, "-c", CHILD, side, mode, str(size), str(out)],
                                  cwd=Path(__file__).parent)
    return float(seconds), rss, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--whole-up-to", type=int, default=1024, help="whole-image decodes only up to this size")
    parser.add_argument("--sides", nargs="+", default=list(PARTIAL), choices=list(PARTIAL))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for size in args.sizes:
            for side in args.sides:
                tiled = PARTIAL[side]
                whole = run(side, "whole", size, workdir) if size <= args.whole_up_to else None
                part = run(side, tiled, size, workdir)
                diff = "-"
                if whole:
                    d = np.abs(np.load(part[2]).astype(int) - np.load(whole[2]).astype(int))
                    diff = f"mean {d.mean():.2f}, max {d.max()}"
                    rows.append(f"| {size}x{size} | {side} | whole | {whole[0]:.1f} s | {whole[1]:.2f} GiB | - |")
                    print(rows[-1], flush=True)
                rows.append(f"| {size}x{size} | {side} | {tiled} | {part[0]:.1f} s | {part[1]:.2f} GiB | {diff} |")
                print(rows[-1], flush=True)
    append("Large VAE decodes: banded vs tiled, time and peak memory", [
        f"Machine: {machine()}.",
        f"Command: `python bench/vae_memory.py {' '.join(sys.argv[1:])}`. Full-size SD VAE, random weights (each side "
        "its own), fp32, one image from smooth random latents; each case in its own process. Peak RSS is the "
        "process's (torch and the VAE's weights included). The difference is from the same side's whole-image "
        "decode, in 8-bit levels.\n",
        "| size | side | decode | time | peak RSS | difference from whole |", "|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
