"""Captioned pictures of simple scenes, drawn procedurally, and a judge that reads a scene back from pixels.

A scene is one shape (circle, square, triangle) of one colour on a plain background of another, with an
optional size and position. Pictures are drawn at 4x and box-filtered down, so edges are anti-aliased.
Some (colour, shape, background) combinations never appear in training (HELD_OUT); the evaluator asks for
exactly those, so its accuracy measures generalisation, not recall.
"""
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (35, 70, 225), "yellow": (245, 220, 40),
           "white": (245, 245, 245), "black": (15, 15, 15), "purple": (135, 45, 175), "orange": (245, 135, 20)}
SHAPES = ("circle", "square", "triangle")
# "cross", a shape the demo model never saw, for fine-tuning it (bench/finetune_demo.py): a plus sign, each bar a third
# as thick as it is long; the judge reads it too
CROSS_BAR = 1 / 3
# position name -> centre as a fraction of the side (x, y)
POSITIONS = {"center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
             "bottom": (0.5, 0.75), "top left": (0.25, 0.25), "top right": (0.75, 0.25),
             "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
# size name -> half the shape's extent, as a fraction of the side; unnamed sizes fall between
SIZES = {"small": 0.12, "large": 0.21}
JITTER = 0.03
# what a caption names, each with its values (None: left unnamed); the text encoder's first stage learns to read them
VOCABULARY = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(COLOURS),
              "position": [None, *POSITIONS], "size": [None, *SIZES]}
TRIPLES = [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]
HELD_OUT = frozenset(random.Random(2026).sample(TRIPLES, 12))


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str | None  # named in the caption, else None
    position: str | None
    cx: float  # geometry, as fractions of the side
    cy: float
    r: float


def sample_scene(rng: random.Random, held_out: bool = False, name_position: float = 0.8,
                 name_size: float = 0.6) -> Scene:
    """A random scene from the training combinations (held_out=False) or from the held-out ones."""
    while True:
        colour, shape, background = rng.choice(TRIPLES)
        if ((colour, shape, background) in HELD_OUT) == held_out:
            break
    size = rng.choice(list(SIZES)) if rng.random() < name_size else None
    r = SIZES[size] if size else rng.uniform(SIZES["small"], SIZES["large"])
    position = rng.choice(list(POSITIONS)) if rng.random() < name_position else None
    if position:
        cx, cy = (p + rng.uniform(-JITTER, JITTER) for p in POSITIONS[position])
    else:
        cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
    return Scene(shape, colour, background, size, position, cx, cy, r)


def draw(scene: Scene, size: int = SIZE, supersample: int = 4) -> Image.Image:
    n = size * supersample
    image = Image.new("RGB", (n, n), COLOURS[scene.background])
    x, y, r = scene.cx * n, scene.cy * n, scene.r * n
    pen, fill = ImageDraw.Draw(image), COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "square":
        pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "cross":
        t = r * CROSS_BAR
        pen.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        pen.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    else:  # upright; fills half its bounding box
        pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    return image.resize((size, size), Image.BOX)


_WHERE = {"center": ("in the center", "in the middle", "at the center"),
          "left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
          "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom")}


def _where(position: str, rng: random.Random) -> str:
    if position in _WHERE:
        return rng.choice(_WHERE[position])
    return rng.choice((f"at the {position}", f"in the {position} corner", f"at the {position}"))


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """Plain English, phrased at random (rng) or in the canonical form "a [size] <colour> <shape> [where] on a
    <colour> background" (rng=None)."""
    size = f"{scene.size} " if scene.size else ""
    where = ""
    if scene.position:
        where = " " + (_where(scene.position, rng) if rng else _canonical_where(scene.position))
    thing, bg = f"{size}{scene.colour} {scene.shape}", scene.background
    if rng is None:
        return f"a {thing}{where} on a {bg} background"
    templates = (f"a {thing}{where} on a {bg} background", f"a {thing} on a {bg} background{where}",
                 f"{thing}{where}, {bg} background", f"a {bg} background with a {thing}{where}",
                 f"a picture of a {thing}{where} on {bg}", f"{thing} on {bg}{where}")
    return rng.choice(templates)


def _canonical_where(position: str) -> str:
    return {"center": "in the center", "left": "on the left", "right": "on the right"}.get(position, f"at the {position}")


def eval_scenes(n: int, seed: int = 0, held_out: bool = True) -> list[Scene]:
    """n scenes, each naming a position: from the held-out combinations (the evaluator's prompts) or, to compare
    with, from the training ones."""
    rng = random.Random(seed)
    return [sample_scene(rng, held_out=held_out, name_position=1.0, name_size=0.5) for _ in range(n)]


def _nearest(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    table = np.array([COLOURS[c] for c in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


def judge(image: Image.Image) -> dict:
    """What the picture shows, read from its pixels: background and shape colour (nearest named colour),
    position (the shape's box centre, by thirds), shape (how much of its box it fills, and for the sparse ones, the
    upright triangle's top half against the cross's even halves), size (box side)."""
    a = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BOX), dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    top = np.percentile(dist, 99.5)
    found = {"background": _nearest(bg), "colour": None, "shape": None, "position": None, "size": None}
    if top < 40:  # nothing stands out from the background
        return found
    mask = dist > top / 2
    # drop specks: keep pixels with at least two of their four neighbours in the mask
    p = np.pad(mask, 1)
    mask &= (p[:-2, 1:-1].astype(int) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) >= 2
    if mask.sum() < 4:
        return found
    ys, xs = np.nonzero(mask)
    core = dist > top * 0.75
    found["colour"] = _nearest(np.median(a[core & mask], axis=0) if (core & mask).any() else np.median(a[mask], axis=0))
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (h * w)
    found["shape"] = "circle" if fill < 0.89 else "square"
    if fill < 0.64:  # a triangle has a quarter of itself above the middle of its box; a cross, half
        top = (ys < ys.min() + h / 2).sum() / len(ys)
        found["shape"] = "triangle" if top < 0.375 else "cross"
    thirds = lambda v: min(int(v / (SIZE / 3)), 2)
    col, row = thirds((xs.min() + xs.max() + 1) / 2), thirds((ys.min() + ys.max() + 1) / 2)
    horizontal, vertical = ("left", "", "right")[col], ("top", "", "bottom")[row]
    found["position"] = f"{vertical} {horizontal}".strip() or "center"
    found["size"] = "small" if max(h, w) < 0.33 * SIZE else "large"
    return found


class ShapesDataset:
    """n scenes fixed by the seed; pictures drawn on demand, captions phrased afresh on every draw."""

    vocabulary = VOCABULARY

    def __init__(self, n: int, seed: int = 0):
        rng = random.Random(seed)
        self.scenes = [sample_scene(rng) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.scenes)

    def image(self, i: int) -> Image.Image:
        return draw(self.scenes[i])

    def caption(self, i: int, rng: random.Random) -> str:
        return caption(self.scenes[i], rng)

    def labels(self, i: int) -> dict[str, int]:
        """What scene i's captions name, as indices into VOCABULARY's value lists."""
        return {k: values.index(getattr(self.scenes[i], k)) for k, values in VOCABULARY.items()}
