"""What happens to finished images before anyone sees them, as CompVis' txt2img script does: the safety checker
(a flagged image is replaced by a black one, and says so), then the invisible watermark. Each image keeps its
infotext; `image.info["nsfw"]` says whether the checker flagged it, where one ran, and `image.info["watermark"]`
whether the watermark reads back from it, where one was embedded."""
from dataclasses import dataclass

import torch
from PIL import Image

from stablediff.models.safety_checker import Preprocess, SafetyChecker, verdicts
from stablediff.safety import read_watermark, stamp, with_info


@dataclass
class Screen:
    """A loaded safety checker with its preprocessing."""

    checker: SafetyChecker
    preprocess: Preprocess

    def __call__(self, images: list[Image.Image]) -> list[Image.Image]:
        """The images, each flagged one replaced by a black image of its size whose infotext says so."""
        p = next(self.checker.parameters())
        with torch.no_grad():
            special, concepts = self.checker(self.preprocess(images).to(p.device, p.dtype))
        out = []
        for image, verdict in zip(images, verdicts(special.cpu().numpy(), concepts.cpu().numpy(), *self.checker.thresholds())):
            if verdict.flagged:
                image = with_info(Image.new("RGB", image.size), image)
            image.info["nsfw"] = verdict.flagged
            if "parameters" in image.info:
                image.info["parameters"] += f", Safety checker: {'flagged' if verdict.flagged else 'passed'}"
            out.append(image)
        return out


def finish(images: list[Image.Image], screen: Screen | None, watermark: str | None) -> list[Image.Image]:
    """Screened, then watermarked: a flagged (black) image is left unmarked, black."""
    if screen is not None:
        images = screen(images)
    if watermark is not None:
        images = [image if image.info.get("nsfw") else stamp(image, watermark) for image in images]
        for image in images:  # dwtDct does not survive every picture: whether it does is said, not assumed
            if not image.info.get("nsfw"):
                image.info["watermark"] = read_watermark(image, len(watermark.encode("utf-8"))) == watermark.encode("utf-8")
    return images
