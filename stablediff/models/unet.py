"""The Stable Diffusion UNet (1.x, 2.x and SDXL), with CompVis' and Stability's attribute names so original
checkpoints load without renaming."""
from dataclasses import dataclass

import torch
from torch import nn

from stablediff.nn.attention import CrossAttention
from stablediff.nn.layers import Conv2d, Downsample, Linear, Upsample, embedding, geglu, group_norm, timestep_embedding
from stablediff.nn.winograd import Conv3x3


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    heads: tuple[int, ...] = (8, 8, 8, 8)  # attention heads per level; the middle block uses the last
    transformer_depth: int | tuple[int, ...] = 1  # per level (SDXL: 0, 2, 10); the middle block uses the last
    context_dim: int = 768
    use_linear_proj: bool = False  # SD 2.x: linear proj_in/out instead of 1x1 convs
    upcast_attention: bool = False
    num_classes: int | None = None  # x4 upscaler: noise level as a class embedding
    norm_groups: int = 32
    cross_only: tuple[bool, ...] = ()  # per level: attn1 attends to the context too (the upscaler's first levels)
    # SDXL: the width of the vector added to the time embedding (pooled text and size conditioning, each size number
    # as a `vector_embed_dim`-wide sinusoid); None for SD 1.x/2.x
    adm_in_channels: int | None = None
    vector_embed_dim: int = 256
    middle_depth: int | None = None  # the middle block's transformer depth where not the last level's

    def __post_init__(self):
        # one form for equal configs: only levels that have attention can be cross-only; () when none is
        cross = tuple(bool(c) and a for c, a in zip(self.cross_only, self.attention_levels))
        object.__setattr__(self, "cross_only", cross if any(cross) else ())
        depth = self.transformer_depth
        if not isinstance(depth, int):  # one form: an int where every attention level has the same depth, else a
            # tuple with 1 at the levels without attention (whose depth means nothing), as SDXL's (1, 2, 10)
            used = {d for d, a in zip(depth, self.attention_levels) if a}
            depth = used.pop() if len(used) == 1 else tuple(d if a else 1 for d, a in zip(depth, self.attention_levels))
            object.__setattr__(self, "transformer_depth", depth)
        if self.middle_depth == self.depth(len(self.channel_mult) - 1):
            object.__setattr__(self, "middle_depth", None)

    def depth(self, level: int) -> int:
        """Transformer blocks per attention layer of a level (-1: the middle block's)."""
        d = self.transformer_depth
        if level == -1 and self.middle_depth is not None:
            return self.middle_depth
        return d if isinstance(d, int) else d[level]


SD1_UNET = UNetConfig()
SD2_UNET = UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, use_linear_proj=True)
SDXL_UNET = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(False, True, True), heads=(5, 10, 20),
                       transformer_depth=(1, 2, 10), context_dim=2048, use_linear_proj=True, adm_in_channels=2816)
SDXL_REFINER_UNET = UNetConfig(model_channels=384, attention_levels=(False, True, True, False), heads=(6, 12, 24, 24),
                               transformer_depth=4, context_dim=1280, use_linear_proj=True, adm_in_channels=2560)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin, groups=groups), nn.SiLU(), Conv3x3(cin, cout))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            group_norm(cout, groups=groups), nn.SiLU(), nn.Dropout(0.0), Conv3x3(cout, cout)
        )
        self.skip_connection = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        *layers, conv = self.out_layers
        for layer in layers:
            h = layer(h)
        return conv(h, add=self.skip_connection(x))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        return geglu(x, self.proj)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x, add=None):
        proj, dropout, out = self.net
        return out(dropout(proj(x)), add=add)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool, cross_only: bool = False):
        super().__init__()
        head_dim = dim // heads
        self.cross_only = cross_only
        self.attn1 = CrossAttention(dim, context_dim if cross_only else None, heads, head_dim, upcast)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, upcast)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, rows=None):
        """rows (see UNet.forward): x holds one row per latent until here; the self-attention runs on those, and
        the rows are repeated for the first layer that reads the context."""
        if rows is not None and self.cross_only:
            x, rows = x[rows], None
        x = self.attn1(self.norm1(x), context if self.cross_only else None, add=x)
        if rows is not None:
            x = x[rows]
        x = self.attn2(self.norm2(x), context, add=x)
        return self.ff(self.norm3(x), add=x)


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, cfg: UNetConfig, cross_only: bool = False):
        super().__init__()
        self.linear = cfg.use_linear_proj
        self.norm = group_norm(channels, eps=1e-6, groups=cfg.norm_groups)
        proj = (lambda: Linear(channels, channels)) if self.linear else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, cfg.context_dim, cfg.upcast_attention, cross_only) for _ in range(depth)
        )
        self.proj_out = proj()

    def forward(self, x, context, rows=None):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, C, H, W) -> (B, HW, C)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, rows)
            if rows is not None:  # the first block repeated the rows (see UNet.forward); the residual follows
                x, rows = x[rows], None
        if self.linear:
            return x + self.proj_out(y).reshape(len(y), h, w, c).permute(0, 3, 1, 2)
        return self.proj_out(y.reshape(len(y), h, w, c).permute(0, 3, 1, 2), add=x)


def _run_block(block: nn.Sequential, h, emb, context, rows=None, upsample_size=None):
    """The block's layers in turn; returns h, and emb with the rows still to repeat (see UNet.forward): a
    SpatialTransformer repeats h's rows, and emb's follow."""
    for layer in block:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context, rows)
            if rows is not None:
                emb, rows = emb[rows], None
        elif isinstance(layer, Upsample):
            h = layer(h, upsample_size)
        else:
            h = layer(h)
    return h, emb, rows


class UNet(nn.Module):
    """eps (or v) = unet(x (B,C,H,W), t (B,) float timesteps, context (B,77k,D), y (B,) class labels, rows)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = embedding(cfg.num_classes, emb_dim)
        elif cfg.adm_in_channels is not None:  # Stability's names: label_emb.0.0 and label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         Linear(emb_dim, emb_dim)))

        def attn(ch, level):
            if not cfg.attention_levels[level]:
                return []
            cross = bool(cfg.cross_only) and cfg.cross_only[level]
            return [SpatialTransformer(ch, cfg.heads[level], cfg.depth(level), cfg, cross)]

        self.input_blocks = nn.ModuleList([nn.Sequential(Conv3x3(cfg.in_channels, mc))])
        skips, ch = [mc], mc
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(nn.Sequential(ResBlock(ch, mc * mult, emb_dim, groups), *attn(mc * mult, level)))
                ch = mc * mult
                skips.append(ch)
            if level != levels - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                skips.append(ch)

        self.middle_block = nn.Sequential(
            ResBlock(ch, ch, emb_dim, groups),
            SpatialTransformer(ch, cfg.heads[-1], cfg.depth(-1), cfg),
            ResBlock(ch, ch, emb_dim, groups),
        )

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mc * mult, emb_dim, groups), *attn(mc * mult, level)]
                ch = mc * mult
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.Sequential(*layers))

        self.out = nn.Sequential(group_norm(ch, groups=groups), nn.SiLU(), Conv3x3(ch, cfg.out_channels))

    def forward(self, x, t, context, y=None, rows=None, vector=None):
        """rows, where given: for each row of context, the row of x (and of t and y) that it conditions, as in
        guidance, where one latent goes with both the prompt and the negative prompt. Everything before the first
        layer that reads the context (the first ResBlock and self-attention of SD) then runs once per latent, not
        once per row; the result has one row per row of context. vector (SDXL): one row per row of context, the
        pooled text and size conditioning (see `size_vector`)."""
        if vector is not None and rows is not None:  # the vector differs per row from the first layer on
            x, t, rows = x[rows], t.expand(x.shape[0])[rows], None
        emb = timestep_embedding(t.expand(x.shape[0]), self.config.model_channels).to(x.dtype)
        emb = self.time_embed(emb)
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y)
        elif self.config.adm_in_channels is not None:
            if vector is None:
                raise ValueError("an SDXL UNet needs its vector (pooled text and size conditioning)")
            emb = emb + self.label_emb(vector.to(emb.dtype))
        h, skips = x, []
        for block in [*self.input_blocks, self.middle_block]:
            h, emb, left = _run_block(block, h, emb, context, rows)
            if left is None and rows is not None:  # this block repeated the rows: the skips so far follow
                skips, rows = [s[rows] for s in skips], None
            skips.append(h)
        h = skips.pop()  # the middle block's output
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # upsample to the size of the next skip, so odd latent sizes (e.g. H=72 -> 9) line up
            size = skips[-1].shape[-2:] if skips else None
            h = _run_block(block, h, emb, context, upsample_size=size)[0]
        return self.out(h)


def size_vector(numbers: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """SDXL's size conditioning, (B, n) numbers (original height and width, crop top and left, then target height
    and width, or the refiner's aesthetic score) -> (B, n * dim): each number a sinusoid as timesteps are."""
    return timestep_embedding(numbers.flatten().float(), dim).reshape(len(numbers), -1)
