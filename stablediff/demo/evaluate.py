"""`stablediff eval-demo`: does the demo model draw what the prompt says? Held-out prompts are rendered and
each picture is judged by its pixels (shapes.judge); accuracy is reported per attribute."""
from stablediff.demo.shapes import caption, eval_scenes, judge

ATTRIBUTES = ("background", "colour", "shape", "position", "size")


def evaluate(model, n: int = 100, steps: int = 20, sampler: str = "DPM++ 2M", scale: float = 5.0, seed: int = 0,
             batch: int = 25, schedule: str | None = None) -> dict:
    """Accuracy per attribute over n held-out prompts (size only where the prompt names one), plus the
    prompts, what was judged, and the images."""
    scenes = eval_scenes(n, seed)
    prompts = [caption(s) for s in scenes]
    images = []
    for i in range(0, n, batch):
        images += model.txt2img(prompts[i:i + batch], steps=steps, sampler=sampler, schedule=schedule, scale=scale,
                                seed=[seed + j for j in range(i, min(i + batch, n))])
    judged = [judge(im) for im in images]
    accuracy = {}
    for name in ATTRIBUTES:
        pairs = [(getattr(s, name), j[name]) for s, j in zip(scenes, judged) if getattr(s, name) is not None]
        accuracy[name] = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
    return {"accuracy": accuracy, "prompts": prompts, "judged": judged, "images": images}


def table_row(label: str, accuracy: dict) -> str:
    return f"| {label} | " + " | ".join(f"{100 * accuracy[a]:.0f}%" for a in ATTRIBUTES) + " |"
