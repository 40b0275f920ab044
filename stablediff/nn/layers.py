"""Building blocks shared by the UNet and the VAE, named as in the CompVis checkpoints."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.nn.winograd import Conv3x3


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its normal_ init: weights come from checkpoints, and on the meta device that
    init alone costs ~2 s of torch imports."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def group_norm(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (B,) float timesteps, as CompVis' openaimodel; computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the VAE pads asymmetrically (right/bottom) instead of padding 1."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)
        if asymmetric:
            self.conv = conv
        else:
            self.op = conv

    def forward(self, x):
        if self.asymmetric:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 (or to an explicit size, for the UNet's odd skip sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)

    def forward(self, x, size=None):
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
