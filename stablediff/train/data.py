"""A folder of pictures to fine-tune on, as kohya's sd-scripts read it: each picture with an optional same-named
`.txt` caption; pictures in `N_name` subfolders count N times (and are captioned `name` where they have no caption
of their own); `--instance-prompt` captions the rest. Pictures are sorted into aspect-ratio buckets near the
training resolution's area, resized to cover their bucket, then cropped (centre or random) and optionally
flipped."""
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from stablediff.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"(\d+)_(.+)")


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    repeats: int = 1
    size: tuple[int, int] = (0, 0)  # the picture's own (width, height)


def _caption(picture: Path, folder_name: str | None, instance_prompt: str | None) -> str | None:
    text = picture.with_suffix(".txt")
    if text.is_file():
        return text.read_text(encoding="utf-8", errors="replace").strip()
    return instance_prompt or folder_name


def _size(picture: Path) -> tuple[int, int] | str:
    """The picture's size, or why it cannot be read."""
    try:
        with Image.open(picture) as image:
            image.verify()
        with Image.open(picture) as image:
            return ImageOps.exif_transpose(image).size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e).splitlines()[0][:80] or type(e).__name__


def read_folder(folder: Path, instance_prompt: str | None = None) -> list[Example]:
    """Every picture of the folder (and of its N_name subfolders), with its caption and repeats."""
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder of pictures")
    places = [(folder, 1, None)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _REPEATS.fullmatch(sub.name)
        places.append((sub, int(m.group(1)), m.group(2).replace("_", " ")) if m else (sub, 1, None))
    examples, bad, uncaptioned = [], [], []
    for place, repeats, name in places:
        for picture in sorted(p for p in place.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            size = _size(picture)
            caption = _caption(picture, name, instance_prompt)
            if isinstance(size, str):
                bad.append(f"{picture.name} ({size})")
            elif caption is None:
                uncaptioned.append(picture.name)
            else:
                examples.append(Example(picture, caption, repeats, size))
    if bad:
        raise UserError(f"{len(bad)} picture(s) in {folder} cannot be read: {', '.join(bad[:3])}"
                        f"{' ...' if len(bad) > 3 else ''}; remove or replace them")
    if uncaptioned:
        raise UserError(f"{len(uncaptioned)} picture(s) in {folder} have no caption ({', '.join(uncaptioned[:3])}): "
                        "add NAME.txt beside each, put them in an N_name folder, or give --instance-prompt")
    if not examples:
        raise UserError(f"--images {folder}: no pictures ({', '.join(IMAGE_SUFFIXES)}) in it or its N_name folders")
    return examples


def buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) sizes on a `step` grid with about resolution^2 pixels (never more), aspect ratios up to
    max_ratio either way: kohya's bucketing."""
    out = {(resolution, resolution)}
    width = step
    while width <= resolution * max_ratio:
        height = min(resolution * resolution // width // step * step, int(resolution * max_ratio) // step * step)
        if height >= step and max(width / height, height / width) <= max_ratio:
            out.add((width, height))
        width += step
    return sorted(out)


def bucket_for(size: tuple[int, int], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket nearest the picture's aspect ratio (in log ratio), the larger on a tie."""
    ratio = math.log(size[0] / size[1])
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def load(example: Example, bucket: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random) -> Image.Image:
    """The picture resized to cover its bucket, cropped to it (centred, or at a random place), flipped when asked
    and the coin says so; RGB."""
    with Image.open(example.path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = bucket
    scale = max(w / image.width, h / image.height)
    image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.LANCZOS)
    dx, dy = image.width - w, image.height - h
    left, top = (dx // 2, dy // 2) if center_crop else (rng.randint(0, dx), rng.randint(0, dy))
    image = image.crop((left, top, left + w, top + h))
    return ImageOps.mirror(image) if flip and rng.random() < 0.5 else image


class Buckets:
    """The examples by bucket, each counted its repeats: a step draws one weighted at random, then fills its batch
    from the same bucket (so every picture of a batch has one size)."""

    def __init__(self, examples: list[Example], resolution: int, aspect_buckets: bool = True):
        sizes = buckets(resolution) if aspect_buckets else [(resolution, resolution)]
        self.by_bucket: dict[tuple[int, int], list[Example]] = {}
        for example in examples:
            for _ in range(example.repeats):
                self.by_bucket.setdefault(bucket_for(example.size, sizes), []).append(example)
        self.keys = sorted(self.by_bucket)
        self.total = sum(len(v) for v in self.by_bucket.values())

    def batch(self, rng: random.Random, size: int) -> tuple[tuple[int, int], list[Example]]:
        key = rng.choices(self.keys, weights=[len(self.by_bucket[k]) for k in self.keys])[0]
        pool = self.by_bucket[key]
        return key, [pool[rng.randrange(len(pool))] for _ in range(size)]
