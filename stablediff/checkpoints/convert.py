"""`stablediff convert`: single file <-> diffusers folder, pickle -> safetensors, any dtype.

Every weight passes through our names (CompVis' for the UNet and VAE, HF CLIP's for the text encoder), so
each direction is one rename table applied forwards or inverted. Tensors are copied bit for bit unless a
dtype is asked for. SD 2.x's text tower: the original files keep all 24 OpenCLIP layers though SD uses the
23rd; diffusers folders drop the unused last one (as diffusers' own converter does), and a file written
from such a folder gets a zero-filled last layer in its place, which SD 2.x never runs.
"""
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from stablediff.checkpoints import detect as rules
from stablediff.checkpoints.keymaps import hf_to_openclip, invert, rename, unet_prefixes, vae_prefixes
from stablediff.checkpoints.diffusers_folder import FOLDER_CONFIG_KEY
from stablediff.checkpoints.original import CONFIG_KEY
from stablediff.checkpoints.spec import ModelSpec
from stablediff.errors import UserError
from stablediff.files import default_mode, write_atomic
from stablediff.models.tokenizer import default_tables

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PIPELINES = {"base": "StableDiffusionPipeline", "inpainting": "StableDiffusionInpaintPipeline",
             "depth": "StableDiffusionDepth2ImgPipeline", "upscaler": "StableDiffusionUpscalePipeline"}
SDXL_PIPELINES = {"base": "StableDiffusionXLPipeline", "inpainting": "StableDiffusionXLInpaintPipeline",
                  "refiner": "StableDiffusionXLImg2ImgPipeline"}


def ours(spec: ModelSpec, dtype: torch.dtype | None) -> dict[str, dict[str, torch.Tensor]]:
    """Each part's tensors under our names, optionally cast (a cast is the only copy)."""
    out = {}
    for part, (sd, prefixes) in spec.weights.items():
        named = {(rename(k, prefixes) if prefixes else k): v for k, v in sd.items() if not k.endswith("position_ids")}
        out[part] = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                     for k, v in named.items() if k is not None}
    return out


def _text_tower_for_file(spec: ModelSpec, text: dict) -> dict:
    if spec.family == "sd2" and spec.clip.skip_layers == 0:  # from a diffusers folder: restore the unused layer
        last = spec.clip.layers - 1
        text = dict(text)
        for k, v in list(text.items()):
            if k.startswith(f"encoder.layers.{last}."):
                text[k.replace(f"layers.{last}.", f"layers.{last + 1}.")] = torch.zeros_like(v)
        return hf_to_openclip(text, spec.clip.layers + 1)
    return hf_to_openclip(text, spec.clip.layers) if spec.family == "sd2" else text


def to_original(spec: ModelSpec, parts: dict) -> dict[str, torch.Tensor]:
    sd = {rules.UNET + k: v for k, v in parts["unet"].items()}
    sd.update({rules.VAE + k: v for k, v in parts["vae"].items()})
    if spec.family == "sdxl":  # Stability's layout: CLIP ViT-L (if any) as embedders.0, bigG after it
        if "text_encoder" in parts:
            sd.update({rules.SDXL_CLIP_L + "text_model." + k: v for k, v in parts["text_encoder"].items()})
        bigg = dict(parts["text_encoder_2"])
        projection = bigg.pop("text_projection.weight")
        prefix = rules.SDXL_TEXT + ("1" if "text_encoder" in parts else "0") + ".model."
        sd.update({prefix + k: v for k, v in hf_to_openclip(bigg, spec.clip2.layers).items()})
        sd[prefix + "text_projection"] = projection.t().contiguous()
        return sd
    text_prefix = rules.CLIP_OPEN if spec.family == "sd2" else rules.CLIP_HF + "text_model."
    sd.update({text_prefix + k: v for k, v in _text_tower_for_file(spec, parts["text_encoder"]).items()})
    return sd


def _hf_text(text: dict) -> dict:
    """Our text-encoder names -> transformers' (CLIPTextModel, CLIPTextModelWithProjection)."""
    return {(k if k == "text_projection.weight" else "text_model." + k): v for k, v in text.items()}


def _to_diffusers_names(parts: dict, spec: ModelSpec) -> dict[str, dict]:
    out = {}
    if spec.family == "sdxl":  # diffusers keeps every layer and picks the penultimate's states itself
        out = {part: _hf_text(parts[part]) for part in ("text_encoder", "text_encoder_2") if part in parts}
    else:
        text = parts["text_encoder"]
        if spec.clip.skip_layers:  # SD 2.x from a file: diffusers runs every layer it has, so drop the unused ones
            keep = spec.clip.layers - spec.clip.skip_layers
            text = {k: v for k, v in text.items()
                    if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= keep)}
        out["text_encoder"] = _hf_text(text)
    vae_back = invert(vae_prefixes(spec.vae))
    vae = {}
    for k, v in parts["vae"].items():
        name = rename(k, vae_back)
        vae[name] = v[:, :, 0, 0] if ".attentions." in name and v.ndim == 4 else v  # 1x1 conv -> linear
    unet_back = invert(unet_prefixes(spec.unet))
    return {**out, "unet": {rename(k, unet_back): v for k, v in parts["unet"].items()}, "vae": vae}


def _text_config(c, sdxl: bool) -> dict:
    config = {"architectures": ["CLIPTextModelWithProjection" if c.projection else "CLIPTextModel"],
              "model_type": "clip_text_model", "vocab_size": c.vocab_size, "hidden_size": c.width,
              "num_hidden_layers": c.layers if sdxl else c.layers - c.skip_layers, "num_attention_heads": c.heads,
              "intermediate_size": c.intermediate, "max_position_embeddings": c.max_len, "hidden_act": c.act,
              "layer_norm_eps": c.eps, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
    return {**config, "projection_dim": c.projection} if c.projection else config


def diffusers_configs(spec: ModelSpec) -> dict[str, dict]:
    u, v, c, s = spec.unet, spec.vae, spec.clip, spec.schedule
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.attention_levels)]
    f = 2 ** (len(v.ch_mult) - 1)
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": spec.native_size // f, "in_channels": u.in_channels,
            "out_channels": u.out_channels, "block_out_channels": [u.model_channels * m for m in u.channel_mult],
            "layers_per_block": u.num_res_blocks, "down_block_types": down, "up_block_types": up,
            "cross_attention_dim": u.context_dim, "attention_head_dim": list(u.heads),
            "use_linear_projection": u.use_linear_proj, "upcast_attention": u.upcast_attention,
            "transformer_layers_per_block": u.transformer_depth, "num_class_embeds": u.num_classes,
            "only_cross_attention": list(u.cross_only) or False, "norm_num_groups": u.norm_groups,
            "flip_sin_to_cos": True, "freq_shift": 0}
    sdxl = spec.family == "sdxl"
    if sdxl:
        unet.update({"addition_embed_type": "text_time", "addition_time_embed_dim": u.vector_embed_dim,
                     "projection_class_embeddings_input_dim": u.adm_in_channels,
                     "transformer_layers_per_block": [u.depth(i) for i in range(len(u.channel_mult))]})
    vae = {"_class_name": "AutoencoderKL", "in_channels": v.in_channels, "out_channels": v.in_channels,
           "block_out_channels": [v.ch * m for m in v.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
           "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult), "layers_per_block": v.num_res_blocks,
           "latent_channels": v.z_channels, "norm_num_groups": v.norm_groups, "scaling_factor": v.scaling_factor,
           "sample_size": spec.native_size}
    scheduler = "EulerDiscreteScheduler" if sdxl else "PNDMScheduler"  # what each family's folders ship with
    sched = {"_class_name": scheduler, "beta_start": s.beta_start, "beta_end": s.beta_end,
             "beta_schedule": s.beta_schedule, "num_train_timesteps": s.num_train_timesteps, "clip_sample": False,
             "set_alpha_to_one": s.set_alpha_to_one, "skip_prk_steps": True, "steps_offset": s.steps_offset,
             "timestep_spacing": s.spacing, "trained_betas": None,
             "prediction_type": "v_prediction" if s.prediction == "v" else "epsilon"}
    index = {"_class_name": (SDXL_PIPELINES if sdxl else PIPELINES)[spec.variant],
             "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    configs = {"unet/config.json": unet, "vae/config.json": vae, "scheduler/scheduler_config.json": sched}
    for part, tokenizer, cfg in (("text_encoder", "tokenizer", c), ("text_encoder_2", "tokenizer_2", spec.clip2)):
        if cfg is None:
            if sdxl:  # the refiner's folder names its missing first encoder
                index[part] = index[tokenizer] = [None, None]
            continue
        configs[f"{part}/config.json"] = _text_config(cfg, sdxl)
        index[part] = ["transformers", configs[f"{part}/config.json"]["architectures"][0]]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    if sdxl:
        index.update({"force_zeros_for_empty_prompt": spec.zero_empty_negatives,
                      **({"requires_aesthetics_score": True} if spec.variant == "refiner" else {})})
    else:
        index.update({"requires_safety_checker": False, "feature_extractor": [None, None],
                      "safety_checker": [None, None]})
    if spec.config_text:  # what the JSON configs cannot say (the sampling defaults), for stablediff; diffusers skips it
        index[FOLDER_CONFIG_KEY] = spec.config_text
    return {**configs, "model_index.json": index}


def write_diffusers(spec: ModelSpec, parts: dict, out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        for name, config in diffusers_configs(spec).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for part, sd in _to_diffusers_names(parts, spec).items():
            name = "model.safetensors" if part.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
            save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / part / name))
        for folder, cfg, tables, pad in (("tokenizer", spec.clip, spec.tokenizer_tables, spec.pad_token),
                                         ("tokenizer_2", spec.clip2, spec.tokenizer2_tables, spec.pad_token_2)):
            if cfg is not None:
                _write_tokenizer(tmp / folder, tables or default_tables(), pad, cfg.max_len)
        os.chmod(tmp, default_mode(folder=True))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_tokenizer(tok: Path, tables: Path, pad: str, max_len: int) -> None:
    tok.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(tables / name, tok / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    (tok / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": max_len, "tokenizer_class": "CLIPTokenizer"}, indent=2), encoding="utf-8")


def write_file(sd: dict[str, torch.Tensor], out: Path, fmt: str, config_text: str | None = None) -> None:
    """Atomically: to a temporary name beside `out`, then renamed. The file carries the model's original YAML
    config, when it has one: in a .safetensors header's metadata, in a .ckpt beside the state_dict."""
    def write(tmp):
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={CONFIG_KEY: config_text} if config_text else None)
        else:  # a plain string beside the state_dict: the weights-only unpickler reads it, and other tools skip it
            torch.save({"state_dict": sd, **({CONFIG_KEY: config_text} if config_text else {})}, tmp)

    write_atomic(out, write)


def convert(spec: ModelSpec, out: Path, fmt: str | None = None, dtype: str | None = None) -> str:
    """Write `spec` to `out` as a diffusers folder, .safetensors or .ckpt; returns the format used."""
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "ckpt" if out.suffix in (".ckpt", ".pt")
                  else "diffusers")
    if fmt not in ("diffusers", "safetensors", "ckpt"):
        raise UserError(f"unknown format {fmt!r} (diffusers, safetensors or ckpt)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (fp16, bf16 or fp32)")
    if out.exists():
        raise UserError(f"{out} already exists; choose a new name")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} is not a folder")
    parts = ours(spec, DTYPES.get(dtype))
    if fmt == "diffusers":
        write_diffusers(spec, parts, out)
    else:
        write_file(to_original(spec, parts), out, fmt, spec.config_text)
    return fmt


def describe(spec: ModelSpec) -> dict:
    """What `stablediff info` prints: recognition and per-part parameters and dtypes."""
    parts = {}
    for part, (sd, _) in spec.weights.items():
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if v.is_floating_point()})
        parts[part] = {"parameters": sum(v.numel() for v in sd.values()), "dtype": "/".join(dtypes)}
    return {"family": {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}[spec.family], "variant": spec.variant,
            "prediction": spec.schedule.prediction if spec.prediction_known else "unknown (probed at load)",
            "unet input channels": spec.unet.in_channels, "native size": spec.native_size,
            "ema": {None: "no EMA weights", True: "EMA weights used", False: "raw weights used (EMA present)"}[spec.ema],
            "sampling defaults": _sampling_facts(spec.sampling), "parts": parts, "unet": asdict(spec.unet)}


def _sampling_facts(sampling: dict) -> dict | str:
    """The model's own sampler, scale and guidance interval, as `info` shows them."""
    if not sampling:
        return "none in the model (DPM++ 2M Karras, scale 7.5, guided at every step)"
    facts = {k: v for k, v in sampling.items() if k != "guidance_interval"}
    if "guidance_interval" in sampling:
        facts["guidance interval"] = "{:g}-{:g}".format(*sampling["guidance_interval"])
    return facts
