"""What a single-file checkpoint is, from its tensor names and shapes alone.

Rules are data: FOREIGN names what we do not run (with the one-line reason), VARIANTS maps the UNet's
input channels to the kind of SD model. Configs are read off the shapes; what shapes cannot say (heads,
prediction type) follows the family.
"""
import re
from dataclasses import dataclass, replace

from stablediff.errors import UserError
from stablediff.models.clip_text import ClipTextConfig
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_HF = "cond_stage_model.transformer."
CLIP_OPEN = "cond_stage_model.model."

# (what the file looks like, a test on its key names); first match wins
SDXL_TEXT = "conditioner.embedders."  # Stability's SDXL files: embedders.0 CLIP ViT-L (HF names), .1 bigG (OpenCLIP's)
SDXL_CLIP_L = SDXL_TEXT + "0.transformer."
FOREIGN = [
    ("an SD3 model", lambda keys: any(".joint_blocks." in k for k in keys)),
    ("a Flux model", lambda keys: any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys)),
    ("a ControlNet", lambda keys: any(k.startswith("control_model.") or "input_hint_block" in k for k in keys)),
    ("a LoRA (use --lora once that lands)", lambda keys: any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k
                                                              or ".lora_A." in k for k in keys)),
    ("a textual inversion embedding", lambda keys: "emb_params" in keys or any(k.startswith("string_to_param") for k in keys)),
    ("a VAE on its own (pass it with --vae)", lambda keys: any(k.startswith(("encoder.conv_in.", "decoder.conv_in."))
                                                                for k in keys) and not any(k.startswith(UNET) for k in keys)),
]

# UNet input channels -> (variant, what the extra channels are)
VARIANTS = {4: "base", 9: "inpainting", 5: "depth", 7: "upscaler"}


@dataclass(frozen=True)
class Detected:
    family: str  # "sd1", "sd2" or "sdxl"
    variant: str  # base, inpainting, depth, upscaler; SDXL: base, inpainting, refiner
    unet: UNetConfig
    vae: VAEConfig
    clip: ClipTextConfig | None  # None: SDXL's refiner
    clip_layout: str  # "hf" (SD 1.x) or "openclip" (SD 2.x); SDXL: "sdxl"
    prediction: str | None  # None: the weights do not say (SD 2.x base: 512 eps or 768 v)
    ema: bool  # the file carries model_ema.* weights
    clip2: ClipTextConfig | None = None  # SDXL: bigG, with its pooled projection
    clip2_prefix: str | None = None  # where bigG's OpenCLIP-named weights are


def _indices(keys, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def unet_from_shapes(shapes: dict[str, tuple], family: str, variant: str, pooled: int | None = None) -> UNetConfig:
    """shapes: UNet key (without prefix) -> shape. pooled (SDXL): the width of the pooled text in its vector."""
    mc, in_ch = shapes["input_blocks.0.0.weight"][:2]
    levels, res_per_level, attention, cross_only, depths = [], 0, [], [], []
    context_dim, linear, depth = 768, False, 1
    count, level_mult, level_attn, level_cross = 0, None, False, False
    for i in _indices(shapes, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in shapes:  # a downsample closes the level
            levels.append(level_mult), attention.append(level_attn), cross_only.append(level_cross)
            depths.append(depth if level_attn else 1)
            res_per_level = res_per_level or count
            count, level_attn, level_cross = 0, False, False
            continue
        count += 1
        level_mult = shapes[f"input_blocks.{i}.0.out_layers.3.weight"][0] // mc
        a = f"input_blocks.{i}.1."
        if a + "proj_in.weight" in shapes:
            level_attn = True
            context_dim = shapes[a + "transformer_blocks.0.attn2.to_k.weight"][1]
            linear = len(shapes[a + "proj_in.weight"]) == 2
            depth = len(_indices(shapes, a + "transformer_blocks."))
            level_cross = shapes[a + "transformer_blocks.0.attn1.to_k.weight"][1] != shapes[a + "proj_in.weight"][0]
    levels.append(level_mult), attention.append(level_attn), cross_only.append(level_cross)
    depths.append(depth if level_attn else 1)
    head_dim = {"sd1": None, "sd2": 64, "sdxl": 64}[family] if variant != "upscaler" else 32
    heads = tuple(8 if head_dim is None else max(1, mc * m // head_dim) for m in levels)
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    extra = {}
    if adm is not None:  # SDXL: pooled text and 6 size numbers (the refiner: 5, with the aesthetic score)
        extra = dict(adm_in_channels=adm, vector_embed_dim=(adm - pooled) // (5 if variant == "refiner" else 6))
        extra["middle_depth"] = len(_indices(shapes, "middle_block.1.transformer_blocks."))
    return UNetConfig(in_channels=in_ch, out_channels=shapes["out.2.weight"][0], model_channels=mc,
                      channel_mult=tuple(levels), num_res_blocks=res_per_level or count,
                      attention_levels=tuple(attention), heads=heads,
                      transformer_depth=tuple(depths) if family == "sdxl" else depth, context_dim=context_dim,
                      use_linear_proj=linear, num_classes=shapes["label_emb.weight"][0] if "label_emb.weight" in shapes else None,
                      norm_groups=32, cross_only=tuple(cross_only), **extra)


def vae_from_shapes(shapes: dict[str, tuple], scaling_factor: float = 0.18215) -> VAEConfig:
    """shapes: CompVis VAE key (without prefix) -> shape."""
    ch, in_ch = shapes["encoder.conv_in.weight"][:2]
    downs = _indices(shapes, "encoder.down.")
    return VAEConfig(ch=ch, ch_mult=tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in downs),
                     num_res_blocks=len(_indices(shapes, "encoder.down.0.block.")), in_channels=in_ch,
                     z_channels=shapes["decoder.conv_in.weight"][1], scaling_factor=scaling_factor)


def clip_from_shapes(shapes: dict[str, tuple], layout: str) -> ClipTextConfig:
    """shapes: text-encoder key (without prefix, HF names after `text_model.` or OpenCLIP names) -> shape."""
    if layout == "openclip":
        vocab, width = shapes["token_embedding.weight"]
        return ClipTextConfig(vocab_size=vocab, width=width, layers=len(_indices(shapes, "transformer.resblocks.")),
                              heads=width // 64, intermediate=shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
                              max_len=shapes["positional_embedding"][0], act="gelu", skip_layers=1)
    shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab, width = shapes["embeddings.token_embedding.weight"]
    return ClipTextConfig(vocab_size=vocab, width=width, layers=len(_indices(shapes, "encoder.layers.")), heads=width // 64,
                          intermediate=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                          max_len=shapes["embeddings.position_embedding.weight"][0])


def _part(shapes: dict[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def detect(shapes: dict[str, tuple], what: str = "this file") -> Detected:
    """Recognise an SD 1.x / 2.x checkpoint in the original layout from {key: shape}, or say what it is."""
    keys = shapes.keys()
    for looks_like, test in FOREIGN:
        if test(keys):
            raise UserError(f"{what} looks like {looks_like}, not a Stable Diffusion 1.x/2.x/XL checkpoint")
    unet = _part(shapes, UNET)
    if "input_blocks.0.0.weight" not in unet or not any(k.startswith(VAE) for k in keys):
        raise UserError(f"{what} is not a Stable Diffusion checkpoint: it lacks the {UNET}* and {VAE}* weights "
                        "of the original layout (a diffusers model is a folder with model_index.json)")
    if any(k.startswith(SDXL_TEXT) for k in keys):
        return _detect_sdxl(shapes, unet, what)
    layout = "openclip" if any(k.startswith(CLIP_OPEN) for k in keys) else "hf" if any(k.startswith(CLIP_HF) for k in keys) else None
    if layout is None:
        raise UserError(f"{what} has no text encoder (cond_stage_model.*): not a complete SD 1.x/2.x checkpoint")
    family = "sd2" if layout == "openclip" else "sd1"
    in_ch = unet["input_blocks.0.0.weight"][1]
    variant = VARIANTS.get(in_ch)
    if variant is None:
        raise UserError(f"{what}: a UNet with {in_ch} input channels is no SD model we know (4, 5, 7 or 9)")
    unet_cfg = unet_from_shapes(unet, family, variant)
    prediction = "epsilon" if family == "sd1" or variant in ("inpainting", "depth") else "v" if variant == "upscaler" else None
    clip_shapes = _part(shapes, CLIP_OPEN if layout == "openclip" else CLIP_HF)
    return Detected(family=family, variant=variant, unet=unet_cfg,
                    vae=vae_from_shapes(_part(shapes, VAE), 0.08333 if variant == "upscaler" else 0.18215),
                    clip=clip_from_shapes(clip_shapes, layout), clip_layout=layout, prediction=prediction,
                    ema=any(k.startswith("model_ema.") for k in keys))


def _detect_sdxl(shapes: dict[str, tuple], unet: dict[str, tuple], what: str) -> Detected:
    """SDXL base or inpainting (CLIP ViT-L as embedders.0, bigG as embedders.1) or its refiner (bigG alone, as
    embedders.0); both encoders read their penultimate layer without the final layer norm."""
    clip_l = any(k.startswith(SDXL_CLIP_L) for k in shapes)
    bigg = SDXL_TEXT + ("1" if clip_l else "0") + ".model."
    if f"{bigg}token_embedding.weight" not in shapes:
        raise UserError(f"{what}: an SDXL file without its OpenCLIP bigG text encoder ({bigg}*)")
    if f"{bigg}text_projection" not in shapes:
        raise UserError(f"{what}: the SDXL text encoder {bigg}* has no text_projection")
    clip2 = replace(clip_from_shapes(_part(shapes, bigg), "openclip"), norm_states=False,
                    projection=shapes[f"{bigg}text_projection"][1])
    in_ch = unet["input_blocks.0.0.weight"][1]
    variant = "refiner" if not clip_l else {4: "base", 9: "inpainting"}.get(in_ch)
    if variant is None or "label_emb.0.0.weight" not in unet:
        raise UserError(f"{what}: an SDXL UNet with {in_ch} input channels is no SDXL model we know (4 or 9)")
    clip = replace(clip_from_shapes(_part(shapes, SDXL_CLIP_L), "hf"), skip_layers=1, norm_states=False) if clip_l else None
    return Detected(family="sdxl", variant=variant, unet=unet_from_shapes(unet, "sdxl", variant, clip2.projection),
                    vae=vae_from_shapes(_part(shapes, VAE), 0.13025), clip=clip, clip_layout="sdxl",
                    prediction="epsilon", ema=False, clip2=clip2, clip2_prefix=bigg)
