"""Single-file checkpoints in the original CompVis/Stability layout (.safetensors, .ckpt, .pt).

Architecture comes from the tensors (detect.py) or from an original YAML config (`--config`, a `.yaml`
beside the file, or a shipped preset by name). The UNet and VAE keys are ours already; the SD 1.x text
encoder uses HF CLIP names and SD 2.x's OpenCLIP names are mapped (keymaps.openclip_to_hf).
"""
from dataclasses import replace
from importlib import resources
from pathlib import Path

import yaml

from stablediff.checkpoints import detect as rules
from stablediff.checks import guidance_interval
from stablediff.checkpoints.io import read_weights
from stablediff.checkpoints.keymaps import clip_prefixes, ema_key, openclip_to_hf
from stablediff.checkpoints.spec import ModelSpec
from stablediff.diffusion.schedules import TrainSchedule
from stablediff.errors import UserError
from stablediff.models.clip_text import ClipTextConfig
from stablediff.models.unet import UNetConfig
from stablediff.models.vae import VAEConfig

PRESETS = ("v1-inference", "v1-inpainting-inference", "v2-inference", "v2-inference-v", "v2-midas-inference",
           "x4-upscaling", "shapes-demo")
CONFIG_KEY = "stablediff.config"  # safetensors metadata: the model's original YAML config
TEXT_CONFIG_KEYS = ("width", "layers", "heads", "intermediate", "max_len", "act")
SPACINGS = ("leading", "trailing", "linspace")
NATIVE = {("sd1", "epsilon"): 512, ("sd2", "epsilon"): 512, ("sd2", "v"): 768, ("sdxl", "epsilon"): 1024}


def preset_path(name: str) -> Path:
    return Path(str(resources.files("stablediff") / "data" / "configs" / f"{name}.yaml"))


def parse_yaml(text: str, where: str) -> dict:
    try:
        return yaml.safe_load(text)["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise UserError(f"{where}: not an original Stable Diffusion config (model.params missing or bad YAML: {e})") from None


def config_text(config: str | Path) -> str:
    """The text of an original config file, or of a shipped preset by name (e.g. v1-inference)."""
    path = Path(config)
    if not path.is_file():
        name = path.name.removesuffix(".yaml")
        if name not in PRESETS:
            raise UserError(f"config {config} not found (a .yaml file, or one of the presets: {', '.join(PRESETS)})")
        path = preset_path(name)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not an original Stable Diffusion config (not UTF-8 text)") from None


def read_yaml(config: str | Path) -> dict:
    return parse_yaml(config_text(config), str(config))


def find_config(path: Path, config: str | Path | None, metadata: dict[str, str]) -> str | None:
    """The YAML text that describes a checkpoint: --config, else a .yaml beside it, else the one the file carries
    (stablediff writes its config into every file it converts or trains, in a .safetensors header's metadata or
    beside a .ckpt's state_dict); None when there is none and the shapes must tell."""
    beside = path.with_suffix(".yaml")
    config = config or (beside if beside.is_file() else None)
    if config is not None:
        return config_text(config)
    return metadata.get(CONFIG_KEY)


def unet_from_yaml(p: dict) -> UNetConfig:
    mult = tuple(p.get("channel_mult", (1, 2, 4, 4)))
    mc = p.get("model_channels", 320)
    ds = [2**i for i in range(len(mult))]
    heads = tuple(p["num_heads"] if p.get("num_heads", -1) != -1 else mc * m // p["num_head_channels"] for m in mult)
    context = p.get("context_dim", 768)
    disable = p.get("disable_self_attentions") or ()
    return UNetConfig(in_channels=p.get("in_channels", 4), out_channels=p.get("out_channels", 4), model_channels=mc,
                      channel_mult=mult, num_res_blocks=p.get("num_res_blocks", 2),
                      attention_levels=tuple(d in p.get("attention_resolutions", ()) for d in ds), heads=heads,
                      transformer_depth=p.get("transformer_depth", 1),
                      context_dim=context[0] if isinstance(context, list) else context,
                      use_linear_proj=bool(p.get("use_linear_in_transformer", False)), num_classes=p.get("num_classes"),
                      cross_only=tuple(bool(d) for d in disable))


def vae_from_yaml(params: dict) -> VAEConfig:
    dd = params["first_stage_config"]["params"]["ddconfig"]
    return VAEConfig(ch=dd.get("ch", 128), ch_mult=tuple(dd.get("ch_mult", (1, 2, 4, 4))),
                     num_res_blocks=dd.get("num_res_blocks", 2), in_channels=dd.get("in_channels", 3),
                     z_channels=dd.get("z_channels", 4), scaling_factor=params.get("scale_factor", 0.18215))


def clip_from_yaml(params: dict, base: ClipTextConfig) -> ClipTextConfig:
    """The text encoder: `base` (what the shapes say), with the layer the UNet reads and, under our own key
    `text_config`, sizes for a text encoder other than CLIP ViT-L/14 or OpenCLIP ViT-H/14 (the demo model)."""
    cond = params.get("cond_stage_config", {}).get("params") or {}
    skip = {"last": 0, "penultimate": 1}.get(cond.get("layer", "last"), 0)
    sizes = {k: v for k, v in (cond.get("text_config") or {}).items() if k in TEXT_CONFIG_KEYS}
    return replace(base, skip_layers=skip, **sizes)


def apply_yaml(found: rules.Detected, params: dict) -> tuple[rules.Detected, TrainSchedule, str, int]:
    """The YAML decides architecture, schedule, prediction and native size (and sampling_from_yaml the defaults)."""
    vae = vae_from_yaml(params)
    found = replace(found, unet=unet_from_yaml(params["unet_config"]["params"]), vae=vae,
                    clip=clip_from_yaml(params, found.clip))
    schedule = schedule_from_yaml(params)
    native = params.get("image_size", 64) * 2 ** (len(vae.ch_mult) - 1)
    return found, schedule, schedule.prediction, native


def schedule_from_yaml(params: dict) -> TrainSchedule:
    """`timestep_spacing` is stablediff's own key (like `text_config`): how the model's default schedule spaces
    its sampling steps, as in a diffusers scheduler config. CompVis configs have none: leading, as SD samples."""
    prediction = "v" if params.get("parameterization", "eps") == "v" else "epsilon"
    spacing = params.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        raise UserError(f"the model's YAML config has timestep_spacing {spacing!r}; use one of {', '.join(SPACINGS)}")
    return train_schedule(params.get("linear_start", 0.00085), params.get("linear_end", 0.012),
                          params.get("timesteps", 1000), prediction, spacing)


def sampling_from_yaml(params: dict) -> dict:
    """stablediff's own `default_sampler`, `default_scale` and `default_guidance_interval` keys: what the model
    samples with when not told (the demo model's; a real SD config has none, and the usual DPM++ 2M Karras at 7.5,
    guided at every step, applies)."""
    sampling = {}
    if "default_sampler" in params:
        sampling["sampler"] = str(params["default_sampler"])
    if "default_scale" in params:
        if not isinstance(params["default_scale"], (int, float)):
            raise UserError(f"the model's YAML config has default_scale {params['default_scale']!r}; give a number")
        sampling["scale"] = float(params["default_scale"])
    if "default_guidance_interval" in params:
        sampling["guidance_interval"] = guidance_interval(params["default_guidance_interval"],
                                                          "the model's YAML config has default_guidance_interval")
    return sampling


def train_schedule(start=0.00085, end=0.012, steps=1000, prediction="epsilon", spacing="leading") -> TrainSchedule:
    # CompVis' "linear" beta schedule is linear in sqrt(beta): diffusers' scaled_linear
    return TrainSchedule(beta_start=start, beta_end=end, num_train_timesteps=steps, prediction=prediction,
                         spacing=spacing, steps_offset=1, set_alpha_to_one=False)


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def read(path: Path, config: str | Path | None = None, use_ema: bool = True, prediction: str | None = None,
         unsafe_pickle: bool = False) -> ModelSpec:
    sd, metadata = read_weights(path, unsafe_pickle)
    found = rules.detect({k: tuple(v.shape) for k, v in sd.items()}, str(path))
    # an SDXL file's shapes say all there is (Stability's sgm YAMLs describe no more, in another layout)
    text = None if found.family == "sdxl" else find_config(path, config, metadata)
    native, sampling = None, {}
    if text is not None:
        params = parse_yaml(text, str(config or path))
        found, schedule, from_yaml, native = apply_yaml(found, params)
        prediction, sampling = prediction or from_yaml, sampling_from_yaml(params)
    else:
        prediction = prediction or found.prediction
        schedule = train_schedule(0.0001, 0.02) if found.variant == "upscaler" else train_schedule()
        schedule = replace(schedule, prediction=prediction or "epsilon")
    if found.family == "sd2":  # 2.1 overflows in fp16 attention and the weights do not tell 2.0 from 2.1
        found = replace(found, unet=replace(found.unet, upcast_attention=True))
    unet = _strip(sd, rules.UNET)
    ema = {k: sd.get(ema_key(k)) for k in unet}
    use_ema = use_ema and found.ema and all(v is not None for v in ema.values())
    weights = {"unet": (ema if use_ema else unet, []),
               "vae": ({k: v for k, v in _strip(sd, rules.VAE).items() if not k.startswith("loss.")}, [])}
    if found.clip_layout == "sdxl":
        bigg = _strip(sd, found.clip2_prefix)
        weights["text_encoder_2"] = ({**openclip_to_hf(bigg, found.clip2.layers),
                                      "text_projection.weight": bigg["text_projection"].t().contiguous()}, [])
        if found.clip is not None:
            weights["text_encoder"] = (_strip(sd, rules.SDXL_CLIP_L), clip_prefixes())
    elif found.clip_layout == "openclip":
        weights["text_encoder"] = (openclip_to_hf(_strip(sd, rules.CLIP_OPEN), found.clip.layers), [])
    else:
        weights["text_encoder"] = (_strip(sd, rules.CLIP_HF), clip_prefixes())
    return ModelSpec(unet=found.unet, vae=found.vae, clip=found.clip, schedule=schedule, weights=weights,
                     name=path.stem, native_size=native or NATIVE.get((found.family, prediction), 512),
                     pad_token="!" if found.family == "sd2" else "<|endoftext|>", family=found.family,
                     clip2=found.clip2, zero_empty_negatives=found.variant != "refiner",
                     variant=found.variant, prediction_known=prediction is not None,
                     ema=use_ema if found.ema else None,
                     low_res_schedule=train_schedule(0.0001, 0.02) if found.variant == "upscaler" else None,
                     config_text=text, sampling=sampling)
