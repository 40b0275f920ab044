"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray 2016), for fp32 inference on CPUs.

A direct 3x3 convolution does 9 multiply-adds per output pixel and channel pair. F(4x4, 3x3) transforms each
6x6 input tile (B^T d B) and each filter (G g G^T) into 36 values, multiplies them point by point, summed over
input channels as 36 matrix products, and transforms the products back to a 4x4 output tile (A^T p A): 36
multiply-adds per 16 outputs, 4x fewer. The transforms are memory passes, and the filters' are redone at every
call (kept, they would take 4x the conv weights' memory), so it pays only where many channels share the tiles'
transforms and many tiles the filters': in SD's UNet at 32x32 and 64x64 latents (256x256 and larger images)
and in the VAE's 256- and 512-channel layers (bench/winograd.py), on CPUs without AVX512 and on Intel's, in NCHW
or channels-last as the input comes. Elsewhere, on GPUs, in half precision or when training, the direct
convolution runs. The result differs from the direct one at float rounding: within 5e-5 of fp64 on unit-scale
outputs, where the direct convolution is within 3e-6 to 3e-5 (tests/test_winograd.py).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.devices import intel_cpu
from stablediff.nn.packed import Conv2d, layout, plus

# Where it pays on a CPU: both channel counts large enough, c*k/(c+k) of at least this, that the matrix
# products outweigh the tiles' transforms...
MIN_CHANNELS = 100.0
# ...and enough 4x4 output tiles (over the batch) that the products outweigh the filters' transforms.
MIN_TILES = 128
# ...on a CPU without AVX512, or Intel's. On other AVX512 CPUs oneDNN's direct convolutions run far faster than the
# matrix products Winograd is made of, which MKL runs by generic code there (an AMD EPYC with AVX512: 366 against
# 162 GFLOP/s in fp32), and Winograd measured 0.9x to 1.5x the direct time on the layers it would take, against 0.6x
# to 1.0x on an AVX2 EPYC. On a Xeon with AVX512 MKL's products keep up with the direct convolutions (340-360
# GFLOP/s), and Winograd took 0.5x to 1.0x of the packed direct time on SD 1.5's 32x32 and 64x64 layers, channels-
# last: a guided 512x512 step 4.69 against 5.10 s, one process, in turn (BENCHMARKS.md). bench/winograd.py times the
# NCHW forms.
SLOWER_ON = ("AVX512",)  # torch.backends.cpu.get_cpu_capability() values
# The transformed filters go in groups of output channels, and the transformed tiles and products in bands of
# tile rows, each buffer at most this many floats (32 MiB): glibc gives larger blocks fresh pages at every call,
# and with them faulting in, the layers measured about 30% slower.
MAX_BUFFER = 1 << 23

_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))


@functools.lru_cache(maxsize=None)
def _transforms(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three 2-D transforms as matrices on flattened tiles, kron(M, M) vec(t) = vec(M t M^T): input
    (36, 36), filter (36, 9), output (16, 36); made in fp64, used in fp32."""
    return tuple(torch.kron(t, t).float().to(device)
                 for t in (torch.tensor(x, dtype=torch.float64) for x in (_BT, _G, _AT)))


def applies(conv: nn.Conv2d, x: torch.Tensor, padded: bool = False, scale: int = 1) -> bool:
    """Whether `conv` on `x` goes by Winograd: a 3x3, stride 1 fp32 convolution on a CPU without AVX512, not
    recording gradients, of enough channels and tiles (see above). padded: x has the conv's 1-pixel border already;
    scale: the conv would run on x upsampled this many times."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or torch.is_grad_enabled()
            or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or direct_faster()):
        return False
    n, c, h, w = x.shape
    k = conv.out_channels
    h, w = (h - 2, w - 2) if padded else (h * scale, w * scale)
    return c * k / (c + k) >= MIN_CHANNELS and n * -(-h // 4) * -(-w // 4) >= MIN_TILES


def direct_faster() -> bool:
    """Whether this CPU's direct convolutions outrun the matrix products Winograd is made of (SLOWER_ON)."""
    return torch.backends.cpu.get_cpu_capability() in SLOWER_ON and not intel_cpu()


def filters(weight: torch.Tensor) -> list[torch.Tensor]:
    """(k, c, 3, 3) weights -> each filter's G g G^T, for conv3x3: (36, k', c) for groups of output channels
    that keep each within MAX_BUFFER floats."""
    c = weight.shape[1]
    g = _transforms(weight.device)[1]
    group = max(1, MAX_BUFFER // (36 * c))
    return [torch.mm(g, w.reshape(-1, 9).t()).view(36, -1, c) for w in weight.split(group)]


def conv3x3(padded: torch.Tensor, u: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(padded, weight, bias) (no padding of its own) by F(4x4, 3x3), with u = filters(weight): padded
    (n, c, h+2, w+2) -> (n, k, h, w), in padded's layout (NCHW or channels-last). In bands of tile rows whose
    buffers stay within MAX_BUFFER floats."""
    n, c, h, w = padded.shape
    groups = [part.shape[1] for part in u]  # output channels of each group of transformed filters
    h, w, k = h - 2, w - 2, sum(groups)
    nh, nw = -(-h // 4), -(-w // 4)  # output tiles down and across; the last ones may overhang the image
    if (4 * nh, 4 * nw) != (h, w):
        padded = F.pad(padded, (0, 4 * nw - w, 0, 4 * nh - h))
    fmt = layout(padded)
    last = fmt == torch.channels_last
    bt, _, at = _transforms(padded.device)
    y = torch.empty(n, k, 4 * nh, 4 * nw, dtype=padded.dtype, device=padded.device, memory_format=fmt)
    biases = [None] * len(u) if bias is None else bias.split(groups)
    band = max(1, MAX_BUFFER // (36 * n * nw * max(c, *groups)))
    for top in range(0, nh, band):
        src = padded[:, :, 4 * top:4 * (top + band) + 2]
        # the input tiles, overlapping by 2, in one copy: (n, rows, nw, c, 6, 6) channels-last, each tile's channels
        # together; (c, n, rows, nw, 6, 6) in NCHW, each channel's tiles together
        tiles = src.permute(0, 2, 3, 1).unfold(1, 6, 4).unfold(2, 6, 4) if last else \
            src.transpose(0, 1).unfold(2, 6, 4).unfold(3, 6, 4)
        v = torch.mm(bt, tiles.reshape(-1, 36).t())  # B^T d B: (36, tiles * c) or (36, c * tiles)
        v = v.view(36, -1, c) if last else v.view(36, c, -1)
        for part, b, out in zip(u, biases, y[:, :, 4 * top:4 * (top + band)].split(groups, dim=1)):
            _products(v, part, b, at, out, last)
    return y if (4 * nh, 4 * nw) == (h, w) else y[:, :, :h, :w].contiguous(memory_format=fmt)


def _products(v: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, at: torch.Tensor,
              out: torch.Tensor, last: bool) -> None:
    """Transformed tiles v and filters u (36, k, c) -> out (n, k, 4nh, 4nw); v is (36, n*nh*nw, c) where out is
    channels-last (`last`), else (36, c, n*nh*nw)."""
    n, k, nh, nw = out.shape[0], out.shape[1], out.shape[2] // 4, out.shape[3] // 4
    tiles = n * nh * nw
    # the point-by-point products summed over input channels: (36, tiles*k) or (36, k*tiles)
    p = torch.bmm(v, u.transpose(1, 2)).view(36, -1) if last else torch.bmm(u, v).view(36, -1)
    if bias is None:
        y = torch.mm(at, p)  # each tile's A^T p A
    else:  # with the bias of each output channel added to its 16 outputs of every tile
        y = torch.addmm(bias.repeat(tiles) if last else bias.repeat_interleave(tiles), at, p)
    # (4, 4, n, nh, nw, k) or (4, 4, k, n, nh, nw) -> (n, k, nh, 4, nw, 4): each tile's rows and columns into place
    y = y.view(4, 4, n, nh, nw, k).permute(2, 5, 3, 0, 4, 1) if last else \
        y.view(4, 4, k, n, nh, nw).permute(3, 2, 4, 0, 5, 1)
    out.unflatten(3, (nw, 4)).unflatten(2, (nh, 4)).copy_(y)


class Conv3x3(Conv2d):
    """nn.Conv2d(cin, cout, 3, padding=1) that goes by Winograd where that is faster (see `applies`), else as
    packed.Conv2d; the same weights and state dict."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if applies(self, x):
            return plus(conv3x3(F.pad(x, (1, 1, 1, 1)), filters(self.weight), self.bias), add)
        return super().forward(x, add)
