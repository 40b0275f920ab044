"""The KL autoencoder (f=8) that maps images to latents and back, with CompVis' attribute names."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.nn.attention import attention
from stablediff.nn.layers import Conv2d, Downsample, Upsample, group_norm
from stablediff.nn.banded import conv_rows
from stablediff.nn.winograd import Conv3x3


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    z_channels: int = 4
    scaling_factor: float = 0.18215
    norm_groups: int = 32


SD_VAE = VAEConfig()


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(cin, eps=1e-6, groups=groups)
        self.conv1 = Conv3x3(cin, cout)
        self.norm2 = group_norm(cout, eps=1e-6, groups=groups)
        self.conv2 = Conv3x3(cout, cout)
        self.nin_shortcut = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.conv2(F.silu(self.norm2(h)), add=self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (1x1 conv projections, as CompVis stores them)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = group_norm(ch, eps=1e-6, groups=groups)
        self.q, self.k, self.v, self.proj_out = (Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, C, H, W) -> (B, HW, C)
        q, k, v = (p(y).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj_out(y, add=x)


class _Mid(nn.Module):
    """The middle blocks, held here for the state dict's `mid.*` names; Encoder/Decoder.layers() run them."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)


@dataclass(frozen=True)
class NormConv:
    """GroupNorm, SiLU, then a conv: the encoder's and decoder's last layer (held apart from the state dict's
    layout, where norm_out and conv_out sit on the encoder or decoder itself)."""

    norm: nn.GroupNorm
    conv: nn.Conv2d

    def __call__(self, x):
        return self.conv(F.silu(self.norm(x)))


def _run(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def run_banded(layers, x: torch.Tensor) -> torch.Tensor:
    """What _run(layers, x) computes, with every full-resolution layer run a band of rows at a time (see
    nn.banded); only the attention, at the latent resolution, sees the whole image at once. Each layer's
    input is dropped as soon as its output is made, and residuals are added in place."""
    for layer in layers:
        if isinstance(layer, ResnetBlock):
            h = conv_rows(x, layer.conv1, layer.norm1)
            if isinstance(layer.nin_shortcut, nn.Conv2d):
                x = conv_rows(x, layer.nin_shortcut)
            x = conv_rows(h, layer.conv2, layer.norm2, into=x)
            del h
        elif isinstance(layer, NormConv):
            x = conv_rows(x, layer.conv, layer.norm)
        elif isinstance(layer, Upsample):
            x = conv_rows(x, layer.conv, upsample=True)
        elif isinstance(layer, Downsample):
            x = conv_rows(x, layer.conv, pads=(0, 1, 0, 1)) if layer.asymmetric else conv_rows(x, layer.op)
        elif isinstance(layer, nn.Conv2d):
            x = conv_rows(x, layer)
        else:
            x = layer(x)
    return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv3x3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(chs):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout, g) for j in range(cfg.num_res_blocks))
            if i != len(chs) - 1:
                level.downsample = Downsample(cout, asymmetric=True)
            self.down.append(level)
            cin = cout
        self.mid = _Mid(cin, g)
        self.norm_out = group_norm(cin, eps=1e-6, groups=g)
        self.conv_out = Conv3x3(cin, 2 * cfg.z_channels)

    def layers(self):
        """The layers in the order they run (run_banded runs the same list)."""
        yield self.conv_in
        for level in self.down:
            yield from level.block
            if hasattr(level, "downsample"):
                yield level.downsample
        yield from (self.mid.block_1, self.mid.attn_1, self.mid.block_2)
        yield NormConv(self.norm_out, self.conv_out)

    def forward(self, x):
        return _run(self.layers(), x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chs = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        cin = chs[-1]
        self.conv_in = Conv3x3(cfg.z_channels, cin)
        self.mid = _Mid(cin, g)
        levels = [None] * len(chs)  # up[i] is stored at its resolution index, run from deepest to 0
        for i in reversed(range(len(chs))):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else chs[i], chs[i], g) for j in range(cfg.num_res_blocks + 1))
            if i != 0:
                level.upsample = Upsample(chs[i])
            levels[i] = level
            cin = chs[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cin, eps=1e-6, groups=g)
        self.conv_out = Conv3x3(cin, cfg.in_channels)

    def layers(self):
        """The layers in the order they run (run_banded runs the same list)."""
        yield self.conv_in
        yield from (self.mid.block_1, self.mid.attn_1, self.mid.block_2)
        for level in reversed(self.up):
            yield from level.block
            if hasattr(level, "upsample"):
                yield level.upsample
        yield NormConv(self.norm_out, self.conv_out)

    def forward(self, z):
        return _run(self.layers(), z)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor, banded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] (B,3,H,W) -> (mean, logvar) of the unscaled latent distribution. banded: the same
        result a band of rows at a time, in less memory (see nn.banded)."""
        h = run_banded(self.encoder.layers(), x) if banded else self.encoder(x)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, banded: bool = False) -> torch.Tensor:
        """Unscaled latents (B,4,h,w) -> image in about [-1, 1]; banded as for encode."""
        z = self.post_quant_conv(z)
        return run_banded(self.decoder.layers(), z) if banded else self.decoder(z)
