"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin and Gray 2016), for fp32 inference on CPUs.

A direct 3x3 convolution does 9 multiply-adds per output pixel and channel pair. F(4x4, 3x3) transforms each
6x6 input tile (B^T d B) and each filter (G g G^T) into 36 values, multiplies them point by point, summed over
input channels as 36 matrix products, and transforms the products back to a 4x4 output tile (A^T p A): 36
multiply-adds per 16 outputs, 4x fewer. The transforms are memory passes, and the filters' are redone at every
call (kept, they would take 4x the conv weights' memory), so it pays only where many channels share the tiles'
transforms and many tiles the filters': in SD's UNet at 32x32 and 64x64 latents (512x512 and larger images)
and in the VAE decoder's 512-channel layers (bench/winograd.py). Elsewhere, and on GPUs, in half precision or
when training, the direct convolution runs. The result differs from the direct one at float rounding: a few
1e-5 on unit-scale outputs, as the direct convolution's own error against fp64 (tests/test_winograd.py).
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

# Where it pays on a CPU: both channel counts large enough, c*k/(c+k) of at least this, that the matrix
# products outweigh the tiles' transforms...
MIN_CHANNELS = 150.0
# ...and enough 4x4 output tiles (over the batch) that the products outweigh the filters' transforms.
MIN_TILES = 128
# The transformed tiles and products (each 2.25x the input or output) are made in bands of tile rows of at
# most this many floats (512 MiB).
MAX_WORKSPACE = 1 << 27

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


def applies(conv: nn.Conv2d, x: torch.Tensor, padded: bool = False) -> bool:
    """Whether `conv` on `x` goes by Winograd: a 3x3, stride 1 fp32 convolution on the CPU, not recording
    gradients, of enough channels and tiles (see above). padded: x has the conv's 1-pixel border already."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or torch.is_grad_enabled()
            or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1):
        return False
    n, c, h, w = x.shape
    k = conv.out_channels
    h, w = (h - 2, w - 2) if padded else (h, w)
    return c * k / (c + k) >= MIN_CHANNELS and n * -(-h // 4) * -(-w // 4) >= MIN_TILES


def filters(weight: torch.Tensor) -> torch.Tensor:
    """(k, c, 3, 3) weights -> (36, k, c): each filter's G g G^T, for conv3x3."""
    k, c = weight.shape[:2]
    return torch.mm(_transforms(weight.device)[1], weight.reshape(k * c, 9).t()).view(36, k, c)


def conv3x3(padded: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(padded, weight, bias) (no padding of its own) by F(4x4, 3x3), with u = filters(weight): padded
    (n, c, h+2, w+2) -> (n, k, h, w). In bands of tile rows that keep the workspace within MAX_WORKSPACE floats."""
    n, c, h, w = padded.shape
    h, w, k = h - 2, w - 2, u.shape[1]
    nh, nw = -(-h // 4), -(-w // 4)  # output tiles down and across; the last ones may overhang the image
    if (4 * nh, 4 * nw) != (h, w):
        padded = F.pad(padded, (0, 4 * nw - w, 0, 4 * nh - h))
    y = torch.empty(n, k, 4 * nh, 4 * nw, dtype=padded.dtype, device=padded.device)
    band = max(1, MAX_WORKSPACE // (36 * n * nw * (c + k)))
    for top in range(0, nh, band):
        rows = min(band, nh - top)
        y[:, :, 4 * top:4 * (top + rows)] = _tiles_conv(padded[:, :, 4 * top:4 * (top + rows) + 2], u, bias)
    return y if (4 * nh, 4 * nw) == (h, w) else y[:, :, :h, :w].contiguous()


def _tiles_conv(padded: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(n, c, 4nh+2, 4nw+2) padded input and (36, k, c) transformed filters -> (n, k, 4nh, 4nw) output."""
    n, c = padded.shape[:2]
    nh, nw, k = (padded.shape[2] - 2) // 4, (padded.shape[3] - 2) // 4, u.shape[1]
    bt, _, at = _transforms(padded.device)
    # (c, n, nh, nw, 6, 6) -> (c*n*nh*nw, 36): the input tiles, overlapping by 2, in one copy
    tiles = padded.transpose(0, 1).unfold(2, 6, 4).unfold(3, 6, 4).reshape(-1, 36)
    v = torch.mm(bt, tiles.t()).view(36, c, n * nh * nw)  # each tile's B^T d B
    p = torch.bmm(u, v)  # (36, k, n*nh*nw): the point-by-point products summed over input channels
    y = torch.mm(at, p.view(36, -1)).view(16, k, n * nh * nw)  # each tile's A^T p A
    if bias is not None:
        y += bias.view(1, k, 1)
    # (4, 4, k, n, nh, nw) -> (n, k, nh, 4, nw, 4): each tile's rows and columns into place
    return y.view(4, 4, k, n, nh, nw).permute(3, 2, 4, 0, 5, 1).reshape(n, k, 4 * nh, 4 * nw)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(cin, cout, 3, padding=1) that goes by Winograd where that is faster (see `applies`); the same
    weights and state dict."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if applies(self, x):
            return conv3x3(F.pad(x, (1, 1, 1, 1)), filters(self.weight), self.bias)
        return super().forward(x)
