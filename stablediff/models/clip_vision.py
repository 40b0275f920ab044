"""The CLIP vision transformer (ViT-L/14 by default) with its projection, under transformers' names
(CLIPVisionModelWithProjection): images -> one embedding each, in the space CLIP's text embeddings share. It is
the safety checker's tower here, and the image side of CLIP wherever else it is needed."""
from dataclasses import dataclass

import torch
from torch import nn

from stablediff.models.clip_text import ClipEncoder
from stablediff.nn.layers import Linear, embedding


@dataclass(frozen=True)
class ClipVisionConfig:
    image_size: int = 224
    patch: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    intermediate: int = 4096
    projection: int = 768
    act: str = "quick_gelu"
    eps: float = 1e-5

    @property
    def positions(self) -> int:
        """The class token and one position per patch."""
        return (self.image_size // self.patch) ** 2 + 1


VIT_L_14 = ClipVisionConfig()


def vision_config(c: dict, projection: int) -> ClipVisionConfig:
    """A transformers CLIPVisionConfig (a dict) as ours; defaults are transformers' own."""
    return ClipVisionConfig(image_size=c.get("image_size", 224), patch=c.get("patch_size", 32),
                            width=c.get("hidden_size", 768), layers=c.get("num_hidden_layers", 12),
                            heads=c.get("num_attention_heads", 12), intermediate=c.get("intermediate_size", 3072),
                            projection=projection, act=c.get("hidden_act", "quick_gelu"),
                            eps=c.get("layer_norm_eps", 1e-5))


def config_from_weights(sd: dict[str, torch.Tensor], prefix: str, head_dim: int = 64) -> ClipVisionConfig:
    """The config of a tower read off its tensors (a file with no config.json); heads are not in the tensors, so
    they are width / head_dim, which holds for every OpenAI and OpenCLIP ViT."""
    patch = sd[f"{prefix}embeddings.patch_embedding.weight"]
    positions = sd[f"{prefix}embeddings.position_embedding.weight"].shape[0]
    width = patch.shape[0]
    layers = 1 + max(int(k[len(prefix) + len("encoder.layers."):].split(".")[0]) for k in sd
                     if k.startswith(f"{prefix}encoder.layers."))
    return ClipVisionConfig(image_size=round((positions - 1) ** 0.5) * patch.shape[-1], patch=patch.shape[-1],
                            width=width, layers=layers, heads=width // head_dim,
                            intermediate=sd[f"{prefix}encoder.layers.0.mlp.fc1.weight"].shape[0],
                            projection=sd["visual_projection.weight"].shape[0])


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = embedding(cfg.positions, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, width, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, width): one token per patch
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class ClipVisionTransformer(nn.Module):
    def __init__(self, cfg: ClipVisionConfig):
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)  # transformers' spelling, kept for the keys
        self.encoder = ClipEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, width): the class token's final state, layer-normed."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class ClipVisionModel(nn.Module):
    """(B, 3, S, S) pixels, normalised as CLIP's image processor does -> (B, projection) image embeddings."""

    def __init__(self, cfg: ClipVisionConfig = VIT_L_14):
        super().__init__()
        self.config = cfg
        self.vision_model = ClipVisionTransformer(cfg)
        self.visual_projection = Linear(cfg.width, cfg.projection, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))
