"""The Stable Diffusion safety checker (CompVis' and diffusers' StableDiffusionSafetyChecker), under its own names:
the CLIP ViT-L/14 image embedding, compared by cosine similarity with 17 concept embeddings and 3 "special care"
ones, each with its own threshold. An image is flagged when any concept's score is above 0; a special-care hit
lowers every concept's threshold by 0.01."""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stablediff.models.clip_vision import VIT_L_14, ClipVisionConfig, ClipVisionModel

CONCEPTS, SPECIAL_CARE = 17, 3
SPECIAL_ADJUSTMENT = np.float32(0.01)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    """CLIP's image processor (transformers' CLIPImageProcessor): the shortest edge resized to `size`, the centre
    `crop` x `crop` cut out, 0..1, then normalised by CLIP's mean and std."""

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = Image.BICUBIC

    def resized(self, image: Image.Image) -> Image.Image:
        """The image as the tower sees it, before normalisation: resized and centre-cropped, RGB."""
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.size * long / short)  # transformers' rounding (down), as torchvision's Resize
        image = image.resize((self.size, new_long) if w <= h else (new_long, self.size), self.resample)
        left, top = (image.width - self.crop) // 2, (image.height - self.crop) // 2
        return image.crop((left, top, left + self.crop, top + self.crop))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, 3, crop, crop) float32 pixels for the tower."""
        pixels = np.stack([np.asarray(self.resized(im)) for im in images]).astype(np.float64) * (1 / 255)
        x = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2)
        mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (self.mean, self.std))
        return (x - mean) / std


class SafetyChecker(nn.Module):
    """(B, 3, 224, 224) CLIP-normalised pixels -> cosine similarities to the special-care (B, 3) and concept (B, 17)
    embeddings, in float32."""

    def __init__(self, cfg: ClipVisionConfig = VIT_L_14):
        super().__init__()
        self.clip = ClipVisionModel(cfg)
        for name, shape in (("concept_embeds", (CONCEPTS, cfg.projection)), ("special_care_embeds", (SPECIAL_CARE, cfg.projection)),
                            ("concept_embeds_weights", (CONCEPTS,)), ("special_care_embeds_weights", (SPECIAL_CARE,))):
            self.register_buffer(name, torch.empty(shape))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = F.normalize(self.clip(pixels).float())
        return (embeds @ F.normalize(self.special_care_embeds.float()).T,
                embeds @ F.normalize(self.concept_embeds.float()).T)

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        return (self.special_care_embeds_weights.float().cpu().numpy(), self.concept_embeds_weights.float().cpu().numpy())


@dataclass(frozen=True)
class Verdict:
    """One image's scores (similarity minus threshold, rounded to 3 places) and whether it is flagged."""

    special: tuple[float, ...]
    concepts: tuple[float, ...]
    flagged: bool


def verdicts(special_cos: np.ndarray, concept_cos: np.ndarray, special_thresholds: np.ndarray,
             concept_thresholds: np.ndarray) -> list[Verdict]:
    """diffusers' rule, in its float32 arithmetic: special-care scores in order, each after the first one above 0
    raised by the adjustment, which then also raises every concept score; flagged when a concept score is above 0."""
    special_cos, concept_cos = special_cos.astype(np.float32), concept_cos.astype(np.float32)
    special = np.empty_like(special_cos)
    adjust = np.zeros(len(special_cos), dtype=np.float32)
    for j in range(special_cos.shape[1]):
        special[:, j] = np.round(special_cos[:, j] - special_thresholds[j] + adjust, 3)
        adjust = np.where(special[:, j] > 0, SPECIAL_ADJUSTMENT, adjust)
    concepts = np.round(concept_cos - concept_thresholds.astype(np.float32) + adjust[:, None], 3)
    return [Verdict(tuple(s.tolist()), tuple(c.tolist()), bool((c > 0).any())) for s, c in zip(special, concepts)]
