"""Fine-tuning the demo model a shape it has never seen: five pictures of a purple cross (shapes.draw's "cross"; the
judge reads it on every drawn scene), captioned "a purple sks shape on a <colour> background" with white, yellow and
green backgrounds. Each method (LoRA and DreamBooth, each without and with prior preservation, and textual inversion)
is trained with `stablediff finetune`'s code and judged by its pixels:
- "sks": 100 seeds of "a purple sks shape on a <colour> background" over the four colours absent from the five
  pictures (red, blue, black, orange): how often it draws the cross (and the background asked for);
- circle, square, triangle: the held-out prompts of `stablediff eval-demo` (300 of them, the same seeds for every
  model): how often each shape asked for is drawn, against the base model's rate (drift, which prior preservation
  holds back). Prior preservation's class pictures: 200 captions of the training scenes, drawn by the base model.
Puts the table at the top of BENCHMARKS.md and writes docs/images/finetune-demo.png (the five pictures, then what
the DreamBooth model with prior preservation draws).

    python bench/finetune_demo.py [--workdir /tmp/finetune-demo] [--steps 1200]
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import ROOT, machine, prepend  # noqa: E402

from stablediff.api import DEMO_MODEL, StableDiffusion  # noqa: E402
from stablediff.demo.evaluate import evaluate  # noqa: E402
from stablediff.demo.shapes import SHAPES, Scene, caption, draw, eval_scenes, judge, sample_scene  # noqa: E402
from stablediff.train.finetune import finetune  # noqa: E402
from stablediff.train.settings import FinetuneSettings  # noqa: E402

SEEN, UNSEEN = ["white", "yellow", "green", "white", "yellow"], ["red", "blue", "black", "orange"]
PROMPT = "a purple sks shape"


def instance_pictures(folder: Path) -> Path:
    """Five purple crosses near the centre, of varied sizes, each with its caption beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i, background in enumerate(SEEN):
        scene = Scene("cross", "purple", background, None, None, 0.5 + rng.uniform(-0.05, 0.05),
                      0.5 + rng.uniform(-0.05, 0.05), rng.uniform(0.14, 0.21))
        draw(scene).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{PROMPT} on a {background} background", encoding="utf-8")
    return folder


def sks(model, n: int = 100) -> tuple[float, float, list[Image.Image]]:
    """The share of n seeds of the instance prompt on unseen backgrounds drawn as a cross, and with that background."""
    prompts = [f"{PROMPT} on a {UNSEEN[i % len(UNSEEN)]} background" for i in range(n)]
    images = []
    for i in range(0, n, 25):
        images += model.txt2img(prompts[i:i + 25], steps=20, sampler="DPM++ 2M", scale=5.0, seed=list(range(i, i + 25)))
    judged = [judge(im) for im in images]
    cross = sum(j["shape"] == "cross" for j in judged) / n
    background = sum(j["background"] == UNSEEN[i % len(UNSEEN)] for i, j in enumerate(judged)) / n
    return cross, background, images


def per_shape(model, n: int = 300) -> dict[str, float]:
    """How often each shape asked for in the held-out prompts is drawn."""
    scenes, judged = eval_scenes(n), evaluate(model, n)["judged"]
    return {s: sum(j["shape"] == s for sc, j in zip(scenes, judged) if sc.shape == s) /
            sum(sc.shape == s for sc in scenes) for s in SHAPES}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/finetune-demo")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--prior-steps", type=int, default=1200, help="steps with prior preservation (half of each "
                        "step's pictures are the class's)")
    parser.add_argument("--precision", default="fp32", help="of the training (fp32)")
    args = parser.parse_args()
    work = Path(args.workdir)
    pics = instance_pictures(work / "pictures")
    prng = random.Random(1)
    classes = tuple(caption(sample_scene(prng)) for _ in range(200))
    base = StableDiffusion.load(DEMO_MODEL)
    base_cross, base_bg, _ = sks(base)
    base_shapes = per_shape(base)
    lora = dict(method="lora", lr=3e-3)
    runs = [("LoRA", lora), ("LoRA + prior preservation", dict(lora, prior=1)),
            ("DreamBooth", dict(method="dreambooth", lr=1e-4)),
            ("DreamBooth + prior preservation", dict(method="dreambooth", lr=1e-4, prior=1)),
            ("textual inversion",
             dict(method="textual-inversion", lr=5e-3, token="sks", init_word="square", vectors=2))]
    rows = [f"| base model | - | {100 * base_cross:.0f}% | {100 * base_bg:.0f}% | " +
            " | ".join(f"{100 * base_shapes[s]:.0f}%" for s in SHAPES) + " | - |"]
    shown = None
    for label, options in runs:
        prior = options.pop("prior", 0)
        settings = FinetuneSettings(resolution=64, steps=args.prior_steps if prior else args.steps, batch_size=4,
                                    seed=0, precision=args.precision, **options,
                                    **(dict(class_prompt=classes, num_class_images=len(classes)) if prior else {}))
        name = label.replace(" + ", "-").replace(" ", "-").lower()
        out = work / (f"{name}.safetensors" if settings.method != "textual-inversion" else "embeddings/sks.safetensors")
        started = time.time()
        if not out.exists():
            finetune(DEMO_MODEL, pics, out, work / f"{name}-work", settings, torch.device("cpu"), progress=False)
        seconds = time.time() - started
        if settings.method == "lora":
            model = StableDiffusion.load(DEMO_MODEL).use_loras([(out, 1.0)])
        elif settings.method == "dreambooth":
            model = StableDiffusion.load(out)
        else:
            model = StableDiffusion.load(DEMO_MODEL, embeddings_dir=out.parent)
        cross, background, images = sks(model)
        shapes = per_shape(model)
        if label == "DreamBooth + prior preservation":
            shown = images[:10]
        rank = f" --rank {settings.rank}" if settings.method == "lora" else ""
        rows.append(f"| {label} | {settings.method} --lr {settings.lr:g}{rank} --steps {settings.steps} --batch-size 4"
                    f"{' + 200 class pictures' if prior else ''} | {100 * cross:.0f}% | {100 * background:.0f}% | " +
                    " | ".join(f"{100 * shapes[s]:.0f}% ({100 * (shapes[s] - base_shapes[s]):+.0f})" for s in SHAPES) +
                    f" | {seconds:.0f} s |")
        print(rows[-1], flush=True)
    if shown:
        sheet = Image.new("RGB", (64 * 10, 64 * 2 + 4), (255, 255, 255))
        for i, p in enumerate(sorted(pics.glob("*.png"))):
            sheet.paste(Image.open(p), (64 * i, 0))
        for i, im in enumerate(shown):
            sheet.paste(im, (64 * i, 68))
        sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
        sheet.save(ROOT / "docs" / "images" / "finetune-demo.png")
    prepend("Fine-tuning the demo model a new shape (LoRA, DreamBooth, textual inversion)", [
        f"Machine: {machine()}.",
        f"Command: `python bench/finetune_demo.py {' '.join(sys.argv[1:])}`.".replace(" `.", "`."),
        "Five 64x64 pictures of a purple cross (a shape the demo model never saw; the judge reads it on every drawn "
        f"scene) captioned \"{PROMPT} on a <white|yellow|green> background\". \"sks\": 100 seeds of "
        f"\"{PROMPT} on a <red|blue|black|orange> background\" (colours absent from the pictures), judged cross / "
        "judged the background asked for. Circle, square, triangle: of 300 held-out prompts asking for each, the "
        "share drawn as that shape (in brackets: points against the base model). DPM++ 2M, 20 steps, guidance 5. "
        "Prior preservation: 200 captions of training scenes drawn by the base model. Training in "
        f"--precision {args.precision}. Time: the training, on the CPU.",
        "", "| model | settings | sks drawn as a cross | unseen background | circle | square | triangle | training |",
        "|---|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
