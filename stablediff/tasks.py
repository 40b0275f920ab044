"""Each task's parameters, once: names, types, defaults and bounds. The Python API's keyword defaults, the command
line's flags and both HTTP schemas come from this table or are tested against it; `validate` is the one check of a
request's values (no torch: the server checks requests with it before anything is queued)."""
import math
from dataclasses import dataclass

from stablediff import checks
from stablediff.errors import UserError, about
from stablediff.names import parse_sampler


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float, str, bool, tuple (four ints) or "image"
    default: object = None  # None: the model's own (sampler, scale, size) or not given
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    help: str = ""
    required: bool = False


IMAGE = "image"  # a picture: a PIL image in Python, a path on the command line, base64 or an upload over HTTP

_COMMON = (
    Param("prompt", str, "", help="what to draw (AUTOMATIC1111 syntax)"),
    Param("negative_prompt", str, "", help="what the image should not show"),
    Param("steps", int, None, 1, 1000, help="sampling steps (default: the model's own: 1 for Turbo, 4 for LCM, else 20)"),
    Param("sampler", str, None, help="a sampler of ours or AUTOMATIC1111's name (default: the model's own)"),
    Param("schedule", str, None, help="default, karras, exponential, ... (default: the sampler's, else the model's)"),
    Param("scale", float, None, 0, 100, help="classifier-free guidance scale (default: the model's own)"),
    Param("eta", float, None, 0, 10, help="noise of DDIM and the ancestral samplers (default: the sampler's)"),
    Param("clip_skip", int, 1, 1, 12, help="1: the text encoder's usual layer; 2: the one before, ..."),
    Param("seed", int, None, -1, checks.SEED_MAX, help="seed of the first image (-1 or none: random)"),
    Param("subseed", int, None, -1, checks.SEED_MAX, help="variation seed"),
    Param("subseed_strength", float, 0.0, 0, 1, help="how far the noise leans to the variation seed's"),
    Param("batch_size", int, 1, 1, 64, help="images of one batch"),
    Param("n_iter", int, 1, 1, 10000, help="batches, one after the other (seeds go on counting)"),
)
JOB_ONLY = ("n_iter",)  # parameters of a queued job that the Python API's methods do not take
_SIZE = (Param("width", int, None, 8, 16384, help="width in pixels, a multiple of 8"),
         Param("height", int, None, 8, 16384, help="height in pixels, a multiple of 8"))
RESIZE_MODES = ("just-resize", "crop-and-resize", "resize-and-fill")
FILLS = ("original", "fill", "latent-noise", "latent-nothing")
_RESIZE = Param("resize_mode", str, "just-resize", choices=RESIZE_MODES, help="when the image is not the size asked")
_INIT = Param("image", IMAGE, required=True, help="the starting image")

TASKS: dict[str, tuple[Param, ...]] = {
    "txt2img": _COMMON + _SIZE + (
        Param("hires_scale", float, None, 1, 16, help="hires fix: enlarge by this factor and render again"),
        Param("hires_steps", int, None, 1, 1000, help="hires fix: steps of the second pass (default: steps)"),
        Param("hires_denoise", float, 0.7, 0.01, 1, help="hires fix: how much the second pass changes"),
        Param("hires_upscaler", str, "latent", choices=("latent", "latent-nearest", "lanczos"),
              help="hires fix: enlarge the latents or the decoded image")),
    "img2img": _COMMON + _SIZE + (_INIT, Param("strength", float, 0.75, 0, 1, help="how much to change it"), _RESIZE),
    "depth2img": _COMMON + _SIZE + (_INIT, Param("depth_map", IMAGE, help="a depth image (default: estimated)"),
                                    Param("strength", float, 0.8, 0, 1, help="how much to change it"), _RESIZE),
    "inpaint": _COMMON + _SIZE + (
        _INIT, Param("mask", IMAGE, required=True, help="white = repaint, black = keep"),
        Param("strength", float, 1.0, 0, 1, help="how much to change the masked part"),
        Param("fill", str, "original", choices=FILLS, help="what an ordinary model starts from inside the mask"),
        Param("mask_blur", int, 4, 0, 256, help="blur radius of the mask's edge in pixels"),
        Param("invert_mask", bool, False, help="black = repaint instead"),
        Param("only_masked", bool, False, help="work on the mask's box at full size, then paste it back"),
        Param("padding", int, 32, 0, 1024, help="pixels around the mask's box with only_masked"), _RESIZE),
    "outpaint": _COMMON + (
        _INIT, Param("extend", tuple, (0, 0, 0, 0), 0, 4096, help="left, right, up, down in pixels, multiples of 8"),
        Param("mask_blur", int, 8, 0, 256, help="how far the new border fades into the seam"),
        Param("fill", str, "original", choices=FILLS, help="what the new border starts from")),
    "upscale": tuple(p for p in _COMMON if p.name != "scale") + (
        _INIT, Param("scale", float, 9.0, 0, 100, help="classifier-free guidance scale"),
        Param("noise_level", int, 20, 0, 350, help="noise added to the input: more = more new detail"),
        Param("tile", int, 128, 8, 4096, help="larger inputs go in tiles of this many low-res pixels"),
        Param("overlap", int, 32, 0, 4096, help="overlap between tiles, blended")),
}


def params(task: str) -> dict[str, Param]:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from: {', '.join(TASKS)}")
    return {p.name: p for p in TASKS[task]}


def _value(p: Param, value):
    """One value checked against its parameter: its type, finite, within bounds and choices."""
    if value is None:
        if p.required:
            raise UserError(f"{p.name} is required ({p.help})")
        return None
    if p.kind is IMAGE:
        return value
    kinds = {int: (int,), float: (int, float), str: (str,), bool: (bool,), tuple: (list, tuple)}[p.kind]
    if not isinstance(value, kinds) or (p.kind is not bool and isinstance(value, bool)):
        raise UserError(f"{p.name} must be {p.kind.__name__.replace('tuple', 'a list of four whole numbers')} "
                        f"(got {value!r})")
    items = list(value) if p.kind is tuple else [value]
    if p.kind is tuple and (len(items) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items)):
        raise UserError(f"{p.name} must be four whole numbers: left, right, up, down (got {value!r})")
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{p.name} must be a finite number (got {v!r})")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and (
                (p.low is not None and v < p.low) or (p.high is not None and v > p.high)):
            raise UserError(f"{p.name} must be from {p.low:g} to {p.high:g} (got {v!r})")
    if p.choices is not None and value not in p.choices:
        raise UserError(f"{p.name} {value!r} is not one of: {', '.join(p.choices)}")
    return float(value) if p.kind is float else tuple(value) if p.kind is tuple else value


def validate(task: str, given: dict, max_pixels: int = checks.MAX_PIXELS) -> dict:
    """The task's parameters with defaults filled in, every value checked; unknown names are an error."""
    table = params(task)
    unknown = sorted(set(given) - set(table))
    if unknown:
        raise UserError(f"{task} takes no {', '.join(unknown)}; it takes: {', '.join(table)}")
    out = {}
    for name, p in table.items():
        with about(name):
            out[name] = _value(p, given.get(name, p.default))
    for name in ("prompt", "negative_prompt"):
        with about(name):
            checks.check_prompt(out[name], name.replace("_", " "))
    with about("sampler"):
        parse_sampler(out["sampler"])
    with about("schedule"):
        parse_sampler(out["sampler"], out["schedule"])
    for name in ("width", "height"):
        if out.get(name) is not None and out[name] % 8:
            with about(name):
                raise UserError(f"{name} {out[name]} is not a multiple of 8")
    if out.get("width") and out.get("height"):
        with about("width"):
            checks.check_pixels(out["width"], out["height"], max_pixels, "the server's --max-pixels")
    if task == "outpaint" and any(v % 8 for v in out["extend"]):
        with about("extend"):
            raise UserError(f"extend {list(out['extend'])}: each side must be a multiple of 8")
    return out


def sampling_steps(task: str, p: dict) -> int:
    """Sampler steps one batch of the task runs: what a progress bar counts."""
    if p.get("strength") is not None:
        return int(p["steps"] * p["strength"])
    return p["steps"] + ((p.get("hires_steps") or p["steps"]) if p.get("hires_scale") else 0)


def defaults(task: str) -> dict:
    """Each parameter's default (None: the model's own, or not given)."""
    return {p.name: p.default for p in TASKS[task]}
