"""Convolutions over large images a band of rows at a time, with the same result as over the whole image.

What makes a large VAE decode run out of memory is not the weights but the full-resolution temporaries of
each layer: GroupNorm's output, SiLU's, the nearest-upsampled copy before a conv. Here each of those exists
only for one band of rows at a time:

- GroupNorm's statistics are taken over the whole input, band by band (each band's mean and variance in one
  pass, combined exactly in float64), so every band is normalised with the statistics of the whole image. This is
  what tiles decoded on their own get wrong: each tile's own statistics shift its colours, and blending
  the overlaps only hides where.
- A conv's band reads the rows its kernel needs from the whole input (its neighbours' rows, not zeros), so
  band edges cannot show. Zero padding is added only at the image's own edges, after the norm, as the
  unbanded layer pads.

The result equals the unbanded one up to the order of floating-point sums; there are no seams to blend.
"""
import torch
import torch.nn.functional as F
from torch import nn

from stablediff.nn import winograd

BAND_ELEMENTS = 1 << 22  # elements of one band's widest temporary (16 MiB in fp32)


def band_rows(channels: int, width: int) -> int:
    return max(8, BAND_ELEMENTS // max(1, channels * width))


def group_stats(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) of each (image, group) of x (B,C,H,W), shaped (B, groups, 1, 1), in fp32: each band's
    (variance, mean) in one pass, the bands' combined exactly (Chan et al.) in float64."""
    b, c, h, w = x.shape
    rows = band_rows(c, w)
    n = mean = m2 = 0
    for r in range(0, h, rows):
        band = x[:, :, r:r + rows].reshape(b, groups, -1).float()
        var_b, mean_b = (t.double() for t in torch.var_mean(band, dim=-1, correction=0))
        n_b = band.shape[-1]
        delta = mean_b - mean
        mean, m2, n = mean + delta * n_b / (n + n_b), m2 + var_b * n_b + delta.square() * n * n_b / (n + n_b), n + n_b
    return mean.float()[..., None, None], (m2 / n + eps).rsqrt().float()[..., None, None]


def _norm_silu(band: torch.Tensor, norm: nn.GroupNorm, stats) -> torch.Tensor:
    """silu(norm(band)) with the whole image's statistics, as one multiply-add per element (in fp32)."""
    mean, rstd = stats  # (B, G, 1, 1)
    b, c = band.shape[:2]
    scale = (rstd * norm.weight.float().view(1, norm.num_groups, -1, 1)).reshape(b, c, 1, 1)
    shift = norm.bias.float().view(1, c, 1, 1) - mean.repeat_interleave(c // norm.num_groups, 1) * scale
    return F.silu(torch.addcmul(shift, band.float(), scale).to(band.dtype), inplace=True)


def conv_rows(x: torch.Tensor, conv: nn.Conv2d, norm: nn.GroupNorm | None = None, upsample: bool = False,
              pads: tuple[int, int, int, int] | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
    """conv(silu(norm(x))) (without the norm when None; on x nearest-upsampled 2x first when upsample), with
    `pads` = (left, right, top, bottom) zeros around the image (default: the conv's own padding), computed a
    band of output rows at a time into one new tensor, or added in place to `into` (a residual)."""
    (k, _), (s, _) = conv.kernel_size, conv.stride
    left, right, top, bottom = pads if pads is not None else (conv.padding[1], conv.padding[1],
                                                              conv.padding[0], conv.padding[0])
    b, c, h, w = x.shape
    h_in, w_in = (2 * h, 2 * w) if upsample else (h, w)
    h_out, w_out = (h_in + top + bottom - k) // s + 1, (w_in + left + right - k) // s + 1
    out = into if into is not None else torch.empty(b, conv.out_channels, h_out, w_out, dtype=x.dtype, device=x.device)
    stats = group_stats(x, norm.num_groups, norm.eps) if norm is not None else None
    rows = max(1, band_rows(max(c, conv.out_channels), w_in) // s)
    u = None  # the conv's filters transformed for Winograd, where its bands go that way
    for o0 in range(0, h_out, rows):
        o1 = min(h_out, o0 + rows)
        lo, hi = o0 * s - top, (o1 - 1) * s + k - top  # input rows needed, in the (upsampled) image
        a, z = max(lo, 0), min(hi, h_in)
        src = x[:, :, a // 2:(z - 1) // 2 + 1] if upsample else x[:, :, a:z]
        if norm is not None:
            src = _norm_silu(src, norm, stats)
        if upsample:
            src = F.interpolate(src, scale_factor=2.0, mode="nearest")[:, :, a % 2:a % 2 + z - a]
        src = F.pad(src, (left, right, a - lo, hi - z))
        if winograd.applies(conv, src, padded=True):
            u = winograd.filters(conv.weight) if u is None else u  # once for all the bands
            band = winograd.conv3x3(src, u, conv.bias)
        else:
            band = F.conv2d(src, conv.weight, conv.bias, stride=s)
        if into is not None:
            out[:, :, o0:o1] += band
        else:
            out[:, :, o0:o1] = band
    return out
