"""Depth for depth2img: from a depth-map image, or estimated by a DPT/MiDaS model the user has (optional extra)."""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stablediff.errors import UserError

NO_DEPTH_SOURCE = "depth2img needs a depth map (--depth-map IMG) or a DPT model to estimate one (--depth-model DIR)"


def depth_from_image(image: Image.Image) -> torch.Tensor:
    """(H, W) float depth from a depth-map image of any mode (8- or 16-bit grey, RGB luminance, float)."""
    return torch.from_numpy(np.asarray(image.convert("F"), dtype=np.float32).copy())


def estimate_depth(images: list[Image.Image], model_dir: str | Path) -> list[torch.Tensor]:
    """Depth maps predicted by a local DPT/MiDaS folder (transformers' DPTForDepthEstimation layout)."""
    try:
        from transformers import DPTForDepthEstimation, DPTImageProcessor
    except ImportError:
        raise UserError("estimating depth needs transformers: pip install 'stablediff[depth]', "
                        "or pass a depth map with --depth-map") from None
    try:
        model = DPTForDepthEstimation.from_pretrained(str(model_dir), local_files_only=True).eval()
        processor = DPTImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir}: not a DPT depth-estimation model folder ({str(e).splitlines()[0]})") from None
    with torch.no_grad():
        depth = model(**processor(images=images, return_tensors="pt")).predicted_depth
    return list(depth.float())


def depth_condition(depths: list[torch.Tensor], latent_size: tuple[int, int], device) -> torch.Tensor:
    """(B, 1, h, w) depth at latent size, each map normalised to [-1, 1], as the depth model was trained."""
    d = torch.stack([x.float() for x in depths])[:, None].to(device)
    d = F.interpolate(d, size=latent_size, mode="bicubic", align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    if (hi - lo).eq(0).any():
        raise UserError("the depth map is flat (one value everywhere): it carries no depth to follow")
    return 2.0 * (d - lo) / (hi - lo) - 1.0
