"""Generation parameters in AUTOMATIC1111's infotext format (the PNG `parameters` chunk): written as the webui writes
them, values quoted where they hold a comma, colon or newline, and read back the way its
parse_generation_parameters reads them. No torch here: the command line reads a PNG before it imports anything."""
import json
import math
import re
from dataclasses import dataclass, field

from stablediff.errors import UserError
from stablediff.names import parse_sampler, read_schedule

# one "Key: value" field of the last line; a value is a JSON string in double quotes or runs to the next comma
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
HIRES_UPSCALERS = {"latent": "Latent", "latent-nearest": "Latent (nearest)", "lanczos": "Lanczos"}


def quote(value) -> str:
    """A value as the webui's writer puts it on the line: JSON-quoted when it holds a comma, colon or newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


@dataclass
class Params:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # the A1111 label, e.g. "DPM++ 2M"
    schedule: str  # the label to write, e.g. "Karras" (pipelines.common.schedule_label)
    scale: float
    seed: int
    width: int
    height: int
    model: str
    model_hash: str | None = None
    extra: dict = field(default_factory=dict)

    def infotext(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = {"Steps": self.steps, "Sampler": self.sampler, "Schedule type": self.schedule,
                  "CFG scale": f"{self.scale:g}", "Seed": self.seed, "Size": f"{self.width}x{self.height}",
                  **({"Model hash": self.model_hash} if self.model_hash else {}), "Model": self.model, **self.extra}
        lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items()))
        return "\n".join(lines)


# SDXL's size conditioning as the user set it (model.size_conditioning: sizes as (height, width), the crop as
# (top, left)), in the words of the webui's options (sdxl_crop_left, sdxl_refiner_high_aesthetic_score, ...); the
# webui writes none of them, as it has no per-image setting for them, so only values set away from the default are
# written
_SIZE_FIELDS = (("original_size", "Original size"), ("target_size", "Target size"))
_SCORE_FIELDS = (("aesthetic_score", "Aesthetic score"), ("negative_aesthetic_score", "Negative aesthetic score"))


def size_fields(given: dict) -> dict:
    """The infotext fields of a model's size_conditioning (empty for the defaults)."""
    out = {label: f"{given[key][1]}x{given[key][0]}" for key, label in _SIZE_FIELDS if given.get(key)}
    if given.get("crop"):
        out.update({"Crop left": given["crop"][1], "Crop top": given["crop"][0]})
    out.update({label: f"{given[key]:g}" for key, label in _SCORE_FIELDS if given.get(key) is not None})
    return out


def _size_conditioning(fields: dict) -> dict:
    """size_fields read back."""
    out = {}
    for key, label in _SIZE_FIELDS:
        if label in fields:
            if not (m := _SIZE.match(fields[label])):
                raise UserError(f"the infotext's {label} is {fields[label]!r}; expected WIDTHxHEIGHT such as 1024x1024")
            out[key] = int(m.group(2)), int(m.group(1))
    if "Crop left" in fields or "Crop top" in fields:
        out["crop"] = (_number(fields, "Crop top", int) if "Crop top" in fields else 0,
                       _number(fields, "Crop left", int) if "Crop left" in fields else 0)
    out.update({key: _number(fields, label) for key, label in _SCORE_FIELDS if label in fields})
    return out


def named_hashes(named) -> str:
    """`name: hash, name: hash` from (name, hash) pairs: the webui's "Lora hashes" and "TI hashes" (quoted on writing)."""
    return ", ".join(f"{name}: {h}" for name, h in named)


def read_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {field: value}) as the webui reads an infotext: the last line holds the fields
    when it has at least three, lines from "Negative prompt:" on are the negative prompt."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {}
    for key, value in _FIELD.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[key] = value
    return "\n".join(prompt), "\n".join(negative), fields


def _number(fields: dict, key: str, kind=float):
    try:
        value = kind(fields[key])
    except ValueError:
        raise UserError(f"the infotext's {key} is {fields[key]!r}, not a number") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"the infotext's {key} is {fields[key]!r}; give a finite number")
    return value


def _interval(value: str) -> tuple[float, float]:
    low, _, high = value.partition("-")
    try:
        return float(low), float(high)
    except ValueError:
        raise UserError(f"the infotext's Guidance interval is {value!r}; expected LOW-HIGH such as 1-inf") from None


def settings(text: str) -> dict:
    """The generation settings an infotext records, under the Python API's names: prompt, negative_prompt, steps,
    sampler (our key), schedule (our key, by the webui's meaning of its names), scale, seed, width, height, and where
    present clip_skip, eta, subseed, subseed_strength, denoising_strength, hires_scale, hires_steps, hires_upscaler,
    mask_blur, noise_level, guidance_interval, model, model_hash, and size_conditioning (SDXL's, as
    model.size_conditioning takes it) where set. Fields it does not know are left out."""
    prompt, negative, fields = read_infotext(text)
    out = {"prompt": prompt, "negative_prompt": negative}
    if "Sampler" in fields:
        sampler, schedule = parse_sampler(fields["Sampler"])
        out["sampler"] = sampler
        named = schedule if schedule != "default" else None  # "DPM++ 2M Karras": the old way to name it
        out["schedule"] = read_schedule(fields.get("Schedule type") or named or "Automatic", sampler)
    if m := _SIZE.match(fields.get("Size", "")):
        out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    numbers = {"Steps": ("steps", int), "CFG scale": ("scale", float), "Seed": ("seed", int), "Clip skip": ("clip_skip", int),
               "Eta": ("eta", float), "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
               "Denoising strength": ("denoising_strength", float), "Hires upscale": ("hires_scale", float),
               "Hires steps": ("hires_steps", int), "Mask blur": ("mask_blur", int), "Noise level": ("noise_level", int)}
    for key, (name, kind) in numbers.items():
        if key in fields:
            out[name] = _number(fields, key, kind)
    if "Hires upscaler" in fields:
        by_label = {label: key for key, label in HIRES_UPSCALERS.items()}
        if fields["Hires upscaler"] not in by_label:
            raise UserError(f"Hires upscaler {fields['Hires upscaler']!r} is not one stablediff has "
                            f"({', '.join(HIRES_UPSCALERS.values())})")
        out["hires_upscaler"] = by_label[fields["Hires upscaler"]]
    if "Guidance interval" in fields:
        out["guidance_interval"] = _interval(fields["Guidance interval"])
    if sizes := _size_conditioning(fields):
        out["size_conditioning"] = sizes
    for key, name in (("Model", "model"), ("Model hash", "model_hash")):
        if key in fields:
            out[name] = fields[key]
    return out
