"""`stablediff eval-demo`: does the demo model draw what the prompt says? Held-out prompts are rendered and
each picture is judged by its pixels (shapes.judge); accuracy is reported per attribute."""
import torch

from stablediff.demo.shapes import caption, draw, eval_scenes, judge
from stablediff.pipelines.common import decode, to_pixels

ATTRIBUTES = ("background", "colour", "shape", "position", "size")


def accuracy(scenes, judged: list[dict]) -> dict:
    """Per attribute, the share of pictures judged as their scene says (size only where the scene names one)."""
    result = {}
    for name in ATTRIBUTES:
        pairs = [(getattr(s, name), j[name]) for s, j in zip(scenes, judged) if getattr(s, name) is not None]
        result[name] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return result


def evaluate(model, n: int = 100, steps: int = 20, sampler: str = "DPM++ 2M", scale: float = 5.0, seed: int = 0,
             batch: int = 25, schedule: str | None = None, held_out: bool = True) -> dict:
    """Accuracy per attribute over n held-out prompts (held_out=False: prompts of the training combinations),
    plus the prompts, what was judged, and the images."""
    scenes = eval_scenes(n, seed, held_out)
    prompts = [caption(s) for s in scenes]
    images = []
    for i in range(0, n, batch):
        images += model.txt2img(prompts[i:i + batch], steps=steps, sampler=sampler, schedule=schedule, scale=scale,
                                seed=[seed + j for j in range(i, min(i + batch, n))])
    judged = [judge(im) for im in images]
    return {"accuracy": accuracy(scenes, judged), "prompts": prompts, "judged": judged, "images": images}


@torch.no_grad()
def vae_round_trip(model, n: int = 100, seed: int = 0) -> dict:
    """The ceiling that the VAE sets on what the evaluator can see: the evaluator's scenes drawn, encoded (the
    posterior mean), decoded and judged, with no diffusion at all."""
    scenes = eval_scenes(n, seed)
    pixels = to_pixels([draw(s) for s in scenes], model.device)
    mean, _ = model.vae.encode(pixels.to(next(model.vae.parameters()).dtype))
    images = decode(model, mean.float() * model.vae.config.scaling_factor)
    judged = [judge(im) for im in images]
    return {"accuracy": accuracy(scenes, judged), "judged": judged, "images": images}


def percent(value: float | None) -> str:
    """An accuracy as a whole percentage; "-" where no scene named the attribute."""
    return "-" if value is None else f"{100 * value:.0f}%"


def table_row(label: str, result: dict) -> str:
    return f"| {label} | " + " | ".join(percent(result[a]) for a in ATTRIBUTES) + " |"
