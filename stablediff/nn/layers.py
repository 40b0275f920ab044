"""Building blocks shared by the UNet and the VAE, named as in the CompVis checkpoints."""
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.nn import packed, winograd
from stablediff.nn.packed import Conv2d, layout
from stablediff.nn.winograd import Conv3x3


class Linear(nn.Linear):
    """nn.Linear that in CPU inference (fp32 and bf16) runs oneDNN's inner product, as the convolutions do, not the
    BLAS matrix product F.linear calls. On a 2-core AMD EPYC (AVX512), where MKL's fp32 products take a slower path,
    SD 1.5's linear layers ran at 150-184 GFLOP/s that way against 333-416 on oneDNN; in bf16, with the bias added
    in the product instead of copied into its output first, 490-864 against 645-870. The same weights and state
    dict; the same results within float rounding (tests/test_layers.py)."""

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x w^T + b, plus `add` (a residual of the output's shape) where given: on oneDNN, added as each output is
        written (packed.plus)."""
        if on_onednn(x, self.weight):
            return packed.inner_product(self, x, self.weight, self.bias, add)
        return packed.plus(super().forward(x), add)


def on_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of x by weight runs on oneDNN's inner product: CPU inference in fp32 or bf16."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == weight.dtype
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and onednn_linear())


def geglu(x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """h * gelu(gate) where proj(x) = [h, gate]: SD's feed-forward input. On oneDNN as two products, the gelu and the
    product by h done on each output as it is written (SD 1.5's 64x64 level, batch 2: fp32 58 ms against 78, bf16
    19 ms against 21), and closer to exact: the gate is rounded once, not before and after its gelu. A hooked proj (a
    LoRA in training) runs its own forward, so the hooks see it."""
    if on_onednn(x, proj.weight) and not proj._forward_hooks:
        b, b_gate = proj.bias.chunk(2) if proj.bias is not None else (None, None)
        x, (w, w_gate) = x.contiguous(), proj.weight.chunk(2)
        w, w_gate = (packed.linear_weight(proj, half, x, slot, part_of=proj.weight)
                     for half, slot in ((w, "_packed_h"), (w_gate, "_packed_gate")))
        gate = torch.ops.mkldnn._linear_pointwise(x, w_gate, b_gate, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w, b, "mul")
    h, gate = proj(x).chunk(2, dim=-1)
    return h * F.gelu(gate)


@functools.cache
def onednn_linear() -> bool:
    """Whether this torch has oneDNN and its linear op (an internal one, as torch.compile's CPU fusions use)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


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
        conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)
        if asymmetric:
            self.conv = conv
        else:
            self.op = conv

    def forward(self, x):
        if self.asymmetric:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.op(x)


# For each parity of an output row (or column) of conv3x3(nearest 2x upsample of x): which of the kernel's three
# rows fall on each of the two source rows under it, i-1+p and i+p (p = the parity).
_FOLD = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def fold_upsample_filters(weight: torch.Tensor) -> torch.Tensor:
    """(k, c, 3, 3) filters of a conv after a nearest 2x upsample -> (4k, c, 2, 2), in the weight's layout: one 2x2
    filter per parity (row, column) of the output pixel, the taps that fall on the same source pixel summed (in
    fp32)."""
    fold = torch.tensor(_FOLD, dtype=torch.float32, device=weight.device)  # (parity, tap, kernel row)
    k, c = weight.shape[:2]
    folded = torch.einsum("apr,bqs,kcrs->abkcpq", fold, fold, weight.float()).reshape(4 * k, c, 2, 2)
    return folded.to(weight.dtype, memory_format=layout(weight))  # as the weight's: oneDNN reorders any other


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d, folded: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """conv(nearest 2x upsample of x) for a 3x3 conv with padding 1, as 2x2 convolutions of x itself, one per
    parity of the output pixel (folded = fold_upsample_filters(conv.weight)): 16 multiply-adds per source pixel
    and channel pair instead of 36, and no upsampled copy. The same sums, in another order. owner keeps the
    folded filters packed (packed.conv2d)."""
    n, _, h, w = x.shape
    k = conv.out_channels
    # y[:, parity (a, b)] at (i + a, j + b) is the output pixel (2i + a, 2j + b)
    y = packed.conv2d(owner, F.pad(x, (1, 1, 1, 1)), folded, None if conv.bias is None else conv.bias.repeat(4), 1, 0)
    out = torch.empty(n, k, 2 * h, 2 * w, dtype=y.dtype, device=y.device, memory_format=layout(x))
    for g, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = y[:, g * k:(g + 1) * k, a:a + h, b:b + w]
    return out


class Upsample(nn.Module):
    """Nearest x2 (or to an explicit size, for the UNet's odd skip sizes) then a 3x3 conv. In inference the two
    go as one (upsample_conv), except where the conv would take Winograd's cheaper route on the upsampled image and
    the folded filters would not run on packed weights (NCHW, as on AVX2 CPUs). Packed, the folded filters are the
    faster: on a 2-core Xeon with AMX in fp32, SD 1.5's upsampling convs (batch 2) took 98 against 146 ms from
    16x16 (1280 channels) and 87 against 114 ms from 32x32 (640 channels) by Winograd on the upsampled image."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv3x3(channels, channels)
        self._folded = (None, None)  # (the weight's identity, its folded filters)

    def forward(self, x, size=None):
        doubled = size is None or tuple(size) == (2 * x.shape[-2], 2 * x.shape[-1])
        if doubled and not torch.is_grad_enabled() and not self.conv._forward_hooks \
                and (packed.applies(x, self.conv.weight) or not winograd.applies(self.conv, x, scale=2)):
            # (a hooked conv, a LoRA in training, runs its own forward)
            return upsample_conv(x, self.conv, self.folded(), self)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)

    def folded(self) -> torch.Tensor:
        """The conv's folded filters, kept while its weight is the same tensor unchanged (a LoRA merged in place
        or a load_state_dict changes its version; a dtype or device move, the tensor)."""
        w = self.conv.weight
        if torch.compiler.is_compiling():
            return fold_upsample_filters(w)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._folded[0] != key:
            self._folded = (key, fold_upsample_filters(w.detach()))
        return self._folded[1]
