"""The safety checker's cost per image, ours against diffusers' StableDiffusionSafetyChecker (with transformers'
CLIPImageProcessor) on the same full-size random weights (CLIP ViT-L/14, 17 + 3 concepts), side by side in one run;
and the invisible watermark's embedding and read-back. Appends to BENCHMARKS.md.

    python bench/safety.py [--repeats 5]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, prepend  # noqa: E402


def full_size_checker(folder: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                  image_size=224)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=768))
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, 768))
        checker.special_care_embeds.copy_(torch.randn(3, 768))
    checker.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor().save_pretrained(folder / "feature_extractor")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from stablediff import safety
    from stablediff.checkpoints.safety_checker import load
    from stablediff.models.safety_checker import verdicts

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        full_size_checker(folder)
        theirs = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker").eval()
        processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
        ours, prep = load(folder)
    rows, worst = [], 0.0
    for batch in (1, 4):
        images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(batch)]

        def run_ours():
            with torch.no_grad():
                return verdicts(*(t.numpy() for t in ours(prep(images))), *ours.thresholds())

        def run_theirs():
            pixels = processor(images, return_tensors="pt").pixel_values
            with torch.no_grad():
                return theirs(clip_input=pixels, images=[np.asarray(im) for im in images])[1]

        assert [v.flagged for v in run_ours()] == list(run_theirs())
        with torch.no_grad():
            a = ours.clip(prep(images))
            b = theirs.visual_projection(theirs.vision_model(processor(images, return_tensors="pt").pixel_values)[1])
        worst = max(worst, (a - b).abs().max().item())
        t_ours, t_theirs = timed(run_ours, args.repeats), timed(run_theirs, args.repeats)
        rows.append(f"| {batch} x 512x512 | {t_ours * 1000 / batch:.0f} ms | {t_theirs * 1000 / batch:.0f} ms | "
                    f"{t_ours / t_theirs:.2f}x |")
    photo = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    marks = []
    for size in (512, 1024):
        image = photo.resize((size, size))
        stamp = timed(lambda: safety.stamp(image, safety.WATERMARK), args.repeats)
        marked = safety.stamp(image, safety.WATERMARK)
        read = timed(lambda: safety.read_watermark(marked, len(safety.WATERMARK)), args.repeats)
        marks.append(f"{size}x{size}: embed {stamp * 1000:.0f} ms, read back {read * 1000:.0f} ms")
    prepend("Safety checker and watermark: cost per image", [
        f"Machine: {machine()}.",
        f"Command: `python bench/safety.py --repeats {args.repeats}`. The full-size checker (CLIP ViT-L/14 tower, "
        "random weights of the real shape, built and saved by diffusers), fp32 on the CPU, preprocessing included; "
        f"median of {args.repeats} runs after a warm-up, both sides in this one process. The same flags on both sides; "
        f"image embeddings within {worst:.1e} of diffusers'.",
        "",
        "| batch | ours per image | diffusers per image | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        "Watermark (invisible-watermark's dwtDct, the library itself on both counts): " + "; ".join(marks) + ". "
        "Against a 512x512 SD 1.5 image of 20 steps (tens of seconds on this CPU), either is small.",
    ])


if __name__ == "__main__":
    main()
