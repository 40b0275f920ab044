"""The hires fix's settings, checked without torch (the command line checks them before it loads anything)."""
from dataclasses import dataclass

from stablediff.errors import UserError
from stablediff.pipelines.infotext import HIRES_UPSCALERS as UPSCALERS


@dataclass(frozen=True)
class Hires:
    """AUTOMATIC1111's hires fix: render at the base size, enlarge by `scale` (the latents, or the decoded image with
    Lanczos), then re-render the last `steps` steps of a schedule int(steps / denoise) long (steps None: as many as the
    first pass)."""

    scale: float = 2.0
    steps: int | None = None
    denoise: float = 0.7
    upscaler: str = "latent"

    def check(self) -> None:
        if self.upscaler not in UPSCALERS:
            raise UserError(f"unknown hires upscaler {self.upscaler!r} (choose from {', '.join(UPSCALERS)})")
        if not 0 < self.denoise <= 1 or not 1 <= self.scale <= 16 or (self.steps is not None and self.steps < 1):
            raise UserError(f"hires fix: scale must be 1 to 16, denoise in (0, 1] and steps at least 1 "
                            f"(got scale {self.scale:g}, denoise {self.denoise:g}, steps {self.steps})")

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: the first's times the scale, rounded down to a multiple of 8."""
        return int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8
