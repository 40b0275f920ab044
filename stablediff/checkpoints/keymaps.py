"""Renaming between diffusers' module names and ours (which are CompVis' for the UNet and VAE).

Maps are data: module-prefix pairs built from a config, plus per-block renames. `load_into` applies one,
checks missing, unexpected and mis-shaped keys, and says which.
"""
import torch
from torch import nn

from stablediff.errors import UserError
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# diffusers' old attention names first, so that the inverse (ours -> diffusers) writes the current ones
VAE_ATTN = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
            "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(cfg: UNetConfig) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, our prefix, renames inside the block) for every module of the UNet."""
    r, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    out = [("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
           ("class_embedding", "label_emb", {}), ("add_embedding.linear_1", "label_emb.0.0", {}),
           ("add_embedding.linear_2", "label_emb.0.2", {}), ("conv_in", "input_blocks.0.0", {}),
           ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {}),
           ("mid_block.resnets.0", "middle_block.0", UNET_RESNET), ("mid_block.attentions.0", "middle_block.1", {}),
           ("mid_block.resnets.1", "middle_block.2", UNET_RESNET)]
    for lv in range(levels):
        for j in range(r):
            i = 1 + lv * (r + 1) + j
            out += [(f"down_blocks.{lv}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET),
                    (f"down_blocks.{lv}.attentions.{j}", f"input_blocks.{i}.1", {})]
        out.append((f"down_blocks.{lv}.downsamplers.0.conv", f"input_blocks.{(lv + 1) * (r + 1)}.0.op", {}))
    for u in range(levels):  # diffusers' up_blocks run deepest first, as our output_blocks do
        for j in range(r + 1):
            i = u * (r + 1) + j
            out += [(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET),
                    (f"up_blocks.{u}.attentions.{j}", f"output_blocks.{i}.1", {})]
        up_index = 2 if cfg.attention_levels[levels - 1 - u] else 1
        out.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{u * (r + 1) + r}.{up_index}.conv", {}))
    return out


def vae_prefixes(cfg: VAEConfig) -> list[tuple[str, str, dict]]:
    levels = len(cfg.ch_mult)
    out = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        out += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {}),
                (f"{part}.conv_norm_out", f"{part}.norm_out", {}),
                (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET),
                (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET),
                (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTN)]
    for lv in range(levels):
        up = levels - 1 - lv  # diffusers' decoder up_blocks run deepest first; CompVis indexes by resolution
        out += [(f"encoder.down_blocks.{lv}.resnets.{j}", f"encoder.down.{lv}.block.{j}", VAE_RESNET)
                for j in range(cfg.num_res_blocks)]
        out += [(f"decoder.up_blocks.{lv}.resnets.{j}", f"decoder.up.{up}.block.{j}", VAE_RESNET)
                for j in range(cfg.num_res_blocks + 1)]
        out += [(f"encoder.down_blocks.{lv}.downsamplers.0", f"encoder.down.{lv}.downsample", {}),
                (f"decoder.up_blocks.{lv}.upsamplers.0", f"decoder.up.{up}.upsample", {})]
    return out


def clip_prefixes() -> list[tuple[str, str, dict]]:
    """transformers' CLIPTextModel (or CLIPTextModelWithProjection, SDXL's second), saved with or without the
    `text_model.` level."""
    return [("text_model", "", {})] + [(n, n, {}) for n in ("embeddings", "encoder", "final_layer_norm",
                                                            "text_projection")]


def rename(key: str, prefixes: list[tuple[str, str, dict]]) -> str | None:
    """Our name for a diffusers key, or None when no prefix matches."""
    for src, dst, inner in sorted(prefixes, key=lambda p: -len(p[0])):
        if key.startswith(src + "."):
            rest = key[len(src) + 1:]
            for a, b in inner.items():
                if rest.startswith(a + "."):
                    rest = b + rest[len(a):]
                    break
            return f"{dst}.{rest}" if dst else rest
    return None


def invert(prefixes: list[tuple[str, str, dict]]) -> list[tuple[str, str, dict]]:
    """The map back: ours -> theirs."""
    return [(dst, src, {b: a for a, b in inner.items()}) for src, dst, inner in prefixes]


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], prefixes, what: str, dtype: torch.dtype,
              device: torch.device | str = "cpu", ignore=("position_ids",),
              conv_layout: torch.memory_format = torch.preserve_format) -> None:
    """Rename `sd` into `module`'s names and assign its tensors, each converted once to dtype and device, and the
    4-d ones (convolution weights) to conv_layout."""
    expected = module.state_dict()
    mapped, unexpected = {}, []
    for key, tensor in sd.items():
        if key.endswith(ignore):
            continue
        name = rename(key, prefixes) if prefixes else key
        if name is None or name not in expected:
            unexpected.append(key)
            continue
        want = expected[name].shape
        if tensor.shape != want and tensor.ndim == 2 and len(want) == 4 and tensor.shape == want[:2]:
            tensor = tensor[:, :, None, None]  # a linear layer stored where we use a 1x1 conv
        if tensor.shape != want:
            raise UserError(f"{what}: {key} has shape {tuple(tensor.shape)}, expected {tuple(want)} "
                            "(the weights do not match the model config)")
        mapped[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype,
                                 memory_format=conv_layout if tensor.ndim == 4 else torch.preserve_format)
    missing = sorted(set(expected) - set(mapped))
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        parts = ([f"missing {len(missing)} weights ({show(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({show(unexpected)})"] if unexpected else [])
        raise UserError(f"{what}: the weights do not fit this model: {'; '.join(parts)}")
    module.load_state_dict(mapped, strict=True, assign=True)


OPENCLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask", "visual.")


def openclip_prefixes(layers: int) -> list[tuple[str, str, dict]]:
    return [("token_embedding", "embeddings.token_embedding", {}), ("ln_final", "final_layer_norm", {})] + \
           [(f"transformer.resblocks.{i}", f"encoder.layers.{i}", OPENCLIP_LAYER) for i in range(layers)]


def openclip_to_hf(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower names -> ours (HF CLIP's): the fused attention in_proj is split into q, k, v."""
    out = {}
    for key, tensor in sd.items():
        if key.startswith(OPENCLIP_UNUSED):
            continue
        if key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = tensor
        elif ".attn.in_proj_" in key:
            layer, kind = key.split(".attn.in_proj_")
            ours = layer.replace("transformer.resblocks.", "encoder.layers.")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                out[f"{ours}.self_attn.{name}.{kind}"] = part
        else:
            out[rename(key, openclip_prefixes(layers)) or key] = tensor
    return out


def hf_to_openclip(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Ours (HF CLIP names) -> OpenCLIP's text tower: q, k, v fused back into in_proj."""
    back = invert(openclip_prefixes(layers))
    out = {}
    for key, tensor in sd.items():
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif ".self_attn.q_proj." in key:
            layer, kind = key.split(".self_attn.q_proj.")
            parts = [sd[f"{layer}.self_attn.{n}.{kind}"] for n in ("q_proj", "k_proj", "v_proj")]
            out[f"{layer.replace('encoder.layers.', 'transformer.resblocks.')}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif ".self_attn.k_proj." not in key and ".self_attn.v_proj." not in key:
            out[rename(key, back) or key] = tensor
    return out


def ema_key(unet_key: str) -> str:
    """CompVis' LitEma names its shadow of `model.diffusion_model.X` as `model_ema.diffusion_modelX` without dots."""
    return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")
