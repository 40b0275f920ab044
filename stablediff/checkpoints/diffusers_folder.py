"""A model folder in the diffusers layout: model_index.json with unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
import json
from dataclasses import replace
from pathlib import Path

from stablediff.checkpoints.keymaps import clip_prefixes, unet_prefixes, vae_prefixes
from stablediff.checkpoints.spec import ModelSpec
from stablediff.diffusion.schedules import TrainSchedule
from stablediff.errors import UserError
from stablediff.models.clip_text import ClipTextConfig
from stablediff.models.tokenizer import EOS
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig

FOLDER_CONFIG_KEY = "_stablediff_config"  # model_index.json: the original YAML config of a model converted from a file
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")


def read_config(folder: Path, part: str, name: str = "config.json") -> dict:
    path = folder / part / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder}: no {part}/{name}; a diffusers model folder has unet/, vae/, "
                        "text_encoder/, tokenizer/ and scheduler/ beside model_index.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def parse_config(folder: Path, part: str, parse, name: str = "config.json"):
    """parse(the part's JSON config), or one line naming the file when a key is missing or of the wrong kind."""
    path = folder / part / name
    config = read_config(folder, part, name)
    try:
        if not isinstance(config, dict):
            raise TypeError(f"a JSON {type(config).__name__}, not an object")
        return parse(config)
    except KeyError as e:
        raise UserError(f"{path}: not a diffusers {part or 'model index'} config (no {e} key)") from None
    except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise UserError(f"{path}: not a diffusers {part or 'model index'} config ({e})") from None


def weights_file(folder: Path, part: str) -> Path:
    """The part's weights file, or the index of its shards (NAME.index.json) where the weights are sharded."""
    for name in WEIGHT_NAMES:
        if (folder / part / name).is_file():
            return folder / part / name
    for name in WEIGHT_NAMES:
        if (folder / part / f"{name}.index.json").is_file():
            return folder / part / f"{name}.index.json"
    raise UserError(f"{folder / part}: no weights (expected one of {', '.join(WEIGHT_NAMES)}, or its .index.json "
                    "with the shards; variant-only folders such as fp16-only ones are not supported yet)")


def read_weights(folder: Path, part: str, unsafe_pickle: bool = False) -> dict:
    """The part's state dict, from one file or from the shards its index names (each a file in the part's own
    folder: a name that reaches elsewhere is refused)."""
    from stablediff.checkpoints.io import read_state_dict

    path = weights_file(folder, part)
    if not path.name.endswith(".index.json"):
        return read_state_dict(path, unsafe_pickle)
    weight_map = parse_config(folder, part, lambda c: dict(c["weight_map"]), path.name)
    shards = sorted(set(map(str, weight_map.values())))
    if any(Path(name).name != name or name in ("", ".", "..") for name in shards):
        raise UserError(f"{path}: a shard name reaches outside {folder / part}; refused")
    sd = {}
    for name in shards:
        if not (folder / part / name).is_file():
            raise UserError(f"{path} names the shard {name}, which is not in {folder / part}")
        sd.update(read_state_dict(folder / part / name, unsafe_pickle))
    return sd


def _per_level(value, levels: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def unet_config(c: dict) -> UNetConfig:
    unsupported = {k: c.get(k) for k in ("class_embed_type", "encoder_hid_dim", "time_cond_proj_dim",
                                          "reverse_transformer_layers_per_block") if c.get(k) is not None}
    if c.get("addition_embed_type") not in (None, "text_time"):
        unsupported["addition_embed_type"] = c["addition_embed_type"]
    if unsupported or c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise UserError(f"unet: this is not a Stable Diffusion 1.x/2.x/XL UNet (it sets "
                        f"{unsupported or c['mid_block_type']}; later families are not supported)")
    bo = c["block_out_channels"]
    levels = len(bo)
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)  # diffusers' historic naming
    depth = _per_level(c.get("transformer_layers_per_block", 1), levels)
    sdxl = c.get("addition_embed_type") == "text_time"
    return UNetConfig(
        in_channels=c.get("in_channels", 4), out_channels=c.get("out_channels", 4), model_channels=bo[0],
        channel_mult=tuple(b // bo[0] for b in bo), num_res_blocks=c.get("layers_per_block", 2),
        attention_levels=tuple(t.startswith("CrossAttn") for t in c["down_block_types"]),
        heads=_per_level(heads, levels), transformer_depth=depth, context_dim=c.get("cross_attention_dim", 768),
        use_linear_proj=bool(c.get("use_linear_projection", False)), upcast_attention=bool(c.get("upcast_attention", False)),
        num_classes=c.get("num_class_embeds"), norm_groups=c.get("norm_num_groups", 32),
        cross_only=_per_level(c.get("only_cross_attention", False), levels),
        adm_in_channels=c["projection_class_embeddings_input_dim"] if sdxl else None,
        vector_embed_dim=c.get("addition_time_embed_dim") or 256)


def vae_config(c: dict) -> VAEConfig:
    bo = c["block_out_channels"]
    return VAEConfig(ch=bo[0], ch_mult=tuple(b // bo[0] for b in bo), num_res_blocks=c.get("layers_per_block", 2),
                     in_channels=c.get("in_channels", 3), z_channels=c.get("latent_channels", 4),
                     scaling_factor=c.get("scaling_factor", 0.18215), norm_groups=c.get("norm_num_groups", 32))


def clip_config(c: dict) -> ClipTextConfig:
    return ClipTextConfig(vocab_size=c.get("vocab_size", 49408), width=c["hidden_size"], layers=c["num_hidden_layers"],
                          heads=c["num_attention_heads"], intermediate=c["intermediate_size"],
                          max_len=c.get("max_position_embeddings", 77), act=c.get("hidden_act", "quick_gelu"),
                          eps=c.get("layer_norm_eps", 1e-5),
                          projection=c.get("projection_dim") if "WithProjection" in str(c.get("architectures")) else None)


def sdxl_clip(cfg: ClipTextConfig) -> ClipTextConfig:
    """An SDXL text encoder reads its penultimate layer's states as they are (no final layer norm)."""
    return replace(cfg, skip_layers=1, norm_states=False)


def train_schedule(c: dict) -> TrainSchedule:
    prediction = {"epsilon": "epsilon", "v_prediction": "v"}.get(c.get("prediction_type", "epsilon"))
    if prediction is None:
        raise UserError(f"scheduler: prediction type {c.get('prediction_type')!r} is not supported (epsilon or v_prediction)")
    return TrainSchedule(beta_start=c.get("beta_start", 0.00085), beta_end=c.get("beta_end", 0.012),
                         beta_schedule=c.get("beta_schedule", "scaled_linear"),
                         num_train_timesteps=c.get("num_train_timesteps", 1000), prediction=prediction,
                         spacing=c.get("timestep_spacing", "leading"), steps_offset=c.get("steps_offset", 0),
                         set_alpha_to_one=c.get("set_alpha_to_one", False))


def pad_token(folder: Path, part: str = "tokenizer") -> str | None:
    """The tokenizer folder's pad token (SD 2.x and SDXL's second pad with "!"), if it names one."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / part / name).is_file():
            pad = parse_config(folder, part, lambda c: c.get("pad_token"), name)
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad:
                return pad
    return None


def _tables(path: Path, part: str) -> Path | None:
    return path / part if (path / part / "vocab.json").is_file() else None


def read(path: Path, unsafe_pickle: bool = False) -> ModelSpec:
    """The configs and weights of a diffusers-layout folder (SDXL: text_encoder_2/ and tokenizer_2/ too; its
    refiner has only those)."""
    unet_json = read_config(path, "unet")
    unet = parse_config(path, "unet", unet_config)
    sdxl = unet.adm_in_channels is not None
    first = not sdxl or (path / "text_encoder" / "config.json").is_file()
    spec = ModelSpec(unet=unet, vae=parse_config(path, "vae", vae_config),
                     clip=parse_config(path, "text_encoder", clip_config) if first else None,
                     schedule=parse_config(path, "scheduler", train_schedule, "scheduler_config.json"), name=path.name,
                     pad_token=pad_token(path) or EOS, tokenizer_tables=_tables(path, "tokenizer"))
    spec.native_size = unet_json.get("sample_size", 64) * 2 ** (len(spec.vae.ch_mult) - 1)
    if sdxl:
        spec.clip = spec.clip and sdxl_clip(spec.clip)
        spec.clip2 = sdxl_clip(parse_config(path, "text_encoder_2", clip_config))
        spec.pad_token_2, spec.tokenizer2_tables = pad_token(path, "tokenizer_2") or EOS, _tables(path, "tokenizer_2")
        spec.family = "sdxl"
        spec.variant = "refiner" if spec.clip is None else "inpainting" if unet.in_channels == 9 else "base"
    else:
        spec.family = "sd2" if spec.clip.act == "gelu" else "sd1"
        spec.variant = {4: "base", 9: "inpainting", 5: "depth", 7: "upscaler"}.get(spec.unet.in_channels, "base")
    if (path / "low_res_scheduler" / "scheduler_config.json").is_file():
        spec.low_res_schedule = parse_config(path, "low_res_scheduler", train_schedule, "scheduler_config.json")
    index = parse_config(path, "", dict, "model_index.json")
    spec.zero_empty_negatives = bool(index.get("force_zeros_for_empty_prompt", spec.variant != "refiner"))
    text = index.get(FOLDER_CONFIG_KEY)
    if isinstance(text, str):  # the YAML of the file it was converted from: its sampling defaults, for the way back
        from stablediff.checkpoints.original import parse_yaml, sampling_from_yaml

        spec.config_text, spec.sampling = text, sampling_from_yaml(parse_yaml(text, str(path / "model_index.json")))
    maps = {"text_encoder": clip_prefixes(), "text_encoder_2": clip_prefixes(), "unet": unet_prefixes(spec.unet),
            "vae": vae_prefixes(spec.vae)}
    maps = {part: m for part, m in maps.items() if spec.config_of(part) is not None}
    spec.weights = {part: (read_weights(path, part, unsafe_pickle), maps[part]) for part in maps}
    return spec
