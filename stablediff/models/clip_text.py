"""The CLIP text transformer (ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x, both ViT-L/14 and OpenCLIP
ViT-bigG/14 for SDXL), with HF CLIP's names."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stablediff.nn.attention import attention
from stablediff.nn.layers import Linear, embedding


@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_len: int = 77
    act: str = "quick_gelu"  # OpenCLIP ViT-H uses "gelu"
    skip_layers: int = 0  # SD 2.x single files: 1 (the penultimate layer's states feed the UNet)
    eps: float = 1e-5
    norm_states: bool = True  # SDXL: False, the states of its layer as they are, without the final layer norm
    projection: int | None = None  # SDXL's bigG: the pooled output's projection (text_projection), this wide


SD1_CLIP = ClipTextConfig()
SD2_CLIP = ClipTextConfig(width=1024, layers=24, heads=16, intermediate=4096, act="gelu", skip_layers=1)
SDXL_CLIP_L = ClipTextConfig(skip_layers=1, norm_states=False)
SDXL_CLIP_G = ClipTextConfig(width=1280, layers=32, heads=20, intermediate=5120, act="gelu", skip_layers=1,
                             norm_states=False, projection=1280)

_ACTS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class ClipAttention(nn.Module):
    def __init__(self, cfg, causal: bool):
        super().__init__()
        self.heads, self.causal = cfg.heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal))


class ClipMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = _ACTS[cfg.act]
        self.fc1 = Linear(cfg.width, cfg.intermediate)
        self.fc2 = Linear(cfg.intermediate, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    """A pre-norm transformer layer; `cfg` is a text or vision config (width, heads, intermediate, act, eps). The
    text tower's attention is causal, the vision tower's is not."""

    def __init__(self, cfg, causal: bool = True):
        super().__init__()
        self.self_attn = ClipAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = ClipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.token_embedding = embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = embedding(cfg.max_len, cfg.width)

    def forward(self, ids, tokens=None):
        tokens = self.token_embedding(ids) if tokens is None else tokens
        return tokens + self.position_embedding.weight[: ids.shape[1]]


class ClipEncoder(nn.Module):
    def __init__(self, cfg, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(ClipLayer(cfg, causal) for _ in range(cfg.layers))


class ClipTextModel(nn.Module):
    """(B, 77) token ids -> (B, 77, width) states, taken `skip` layers before the last, then layer-normed (unless
    the config says not: SDXL). `tokens` (B, 77, width) replaces the token embeddings (textual inversion vectors
    written in). With `pooled` (a model with a projection), also (B, projection): the last layer's layer-normed
    state at each row's first end token, projected, as CLIPTextModelWithProjection's text_embeds."""

    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = ClipEmbeddings(cfg)
        self.encoder = ClipEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.projection is not None:
            self.text_projection = Linear(cfg.width, cfg.projection, bias=False)

    def forward(self, ids: torch.Tensor, skip: int | None = None, tokens: torch.Tensor | None = None,
                pooled: bool = False):
        skip = self.config.skip_layers if skip is None else skip
        x = self.embeddings(ids, tokens)
        stop = len(self.encoder.layers) - skip
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        states = self.final_layer_norm(x) if self.config.norm_states else x
        if not pooled:
            return states
        for layer in self.encoder.layers[stop:]:
            x = layer(x)
        last = self.final_layer_norm(x)[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        return states, self.text_projection(last)
