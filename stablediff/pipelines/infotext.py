"""Generation parameters in AUTOMATIC1111's infotext format, read by existing tools from PNG `parameters`."""
from dataclasses import dataclass, field

SCHEDULE_LABELS = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential",
                   "trailing": "Trailing", "leading": "Leading", "linspace": "Linspace"}


@dataclass
class Params:
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str  # the A1111 label, e.g. "DPM++ 2M"
    schedule: str
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
        fields = {"Steps": self.steps, "Sampler": self.sampler, "Schedule type": SCHEDULE_LABELS.get(self.schedule, self.schedule),
                  "CFG scale": f"{self.scale:g}", "Seed": self.seed, "Size": f"{self.width}x{self.height}",
                  **({"Model hash": self.model_hash} if self.model_hash else {}), "Model": self.model, **self.extra}
        lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
        return "\n".join(lines)


def quoted_hashes(named) -> str:
    """`"name: hash, name: hash"` from (name, hash) pairs, as the webui writes "Lora hashes" and "TI hashes"."""
    return '"' + ", ".join(f"{name}: {h}" for name, h in named) + '"'
