"""The safety checker from the files users have: a diffusers model folder's safety_checker/ (with its
feature_extractor/), that folder alone (config.json and weights, as CompVis/stable-diffusion-safety-checker is
published), or its weights as one file (the config read off the tensors)."""
from pathlib import Path

import torch

from stablediff.checkpoints.diffusers_folder import parse_config, weights_file
from stablediff.checkpoints.io import read_state_dict
from stablediff.checkpoints.keymaps import load_into
from stablediff.errors import UserError
from stablediff.models.clip_vision import config_from_weights, vision_config
from stablediff.models.safety_checker import Preprocess, SafetyChecker

# diffusers' checker keeps transformers' CLIPVisionModel under .vision_model: saved by transformers 4 (the published
# files: CompVis/stable-diffusion-safety-checker, SD 1.x folders) with that model's own .vision_model level inside,
# by transformers 5 without it
TOWERS = ("vision_model.vision_model.", "vision_model.")
NO_CHECKER = ("give --safety-checker the safety checker: a diffusers model folder with safety_checker/, that "
              "safety_checker/ folder itself, or its weights file (.safetensors)")


def _tower(sd: dict) -> str | None:
    """Where the tower's weights are: the first of TOWERS that holds its patch embedding."""
    return next((t for t in TOWERS if f"{t}embeddings.patch_embedding.weight" in sd), None)


def _ours(key: str, tower: str) -> str:
    """diffusers' key -> ours: the tower and its projection sit under .clip here."""
    if key.startswith(tower):
        return "clip.vision_model." + key[len(tower):]
    return "clip." + key if key.startswith("visual_projection.") else key


def _parts(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(weights, config.json or None, preprocessor_config.json or None) of what `path` names."""
    if path.is_file():
        return path, None, None
    if (path / "safety_checker").is_dir():
        extractor = path / "feature_extractor" / "preprocessor_config.json"
        path = path / "safety_checker"
    elif (path / "model_index.json").is_file():
        raise UserError(f"{path}: this model folder has no safety_checker/; {NO_CHECKER}")
    else:
        extractor = path.parent / "feature_extractor" / "preprocessor_config.json"
    if (path / "preprocessor_config.json").is_file():
        extractor = path / "preprocessor_config.json"
    config = path / "config.json"
    return weights_file(path.parent, path.name), config if config.is_file() else None, \
        extractor if extractor.is_file() else None


def _edge(value, key: str) -> int:
    """A size as preprocessor configs write it: a number, or {"shortest_edge": N} / {"height": N, "width": N}."""
    if isinstance(value, dict):
        value = value.get(key, value.get("height"))
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{value!r} is not a size")
    return value


def preprocess_config(c: dict) -> Preprocess:
    """transformers' CLIPImageProcessor settings (the feature extractor's) as ours; unsupported steps refused."""
    off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if c.get(k) is False]
    if off:
        raise ValueError(f"it turns off {', '.join(off)}, which the safety checker's preprocessing always does")
    size, crop = _edge(c.get("size", 224), "shortest_edge"), _edge(c.get("crop_size", 224), "height")
    if crop > size:
        raise ValueError(f"its crop {crop} is larger than its resized edge {size}")
    return Preprocess(size=size, crop=crop, mean=tuple(c.get("image_mean", Preprocess.mean)),
                      std=tuple(c.get("image_std", Preprocess.std)), resample=int(c.get("resample", Preprocess.resample)))


def _tower_config(c: dict):
    vision = c.get("vision_config") or c.get("vision_config_dict") or {}
    return vision_config(vision, c.get("projection_dim", 512))


def load(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         unsafe_pickle: bool = False) -> tuple[SafetyChecker, Preprocess]:
    """The checker and its preprocessing, from a folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"safety checker {path} not found; {NO_CHECKER}")
    weights, config, extractor = _parts(path)
    sd = read_state_dict(weights, unsafe_pickle)
    tower = _tower(sd)
    if "visual_projection.weight" not in sd or "concept_embeds" not in sd or tower is None:
        raise UserError(f"{weights}: not a Stable Diffusion safety checker (no vision_model.*, visual_projection or "
                        "concept_embeds weights)")
    cfg = parse_config(config.parent.parent, config.parent.name, _tower_config) if config else \
        config_from_weights(sd, tower)
    prep = parse_config(extractor.parent.parent, extractor.parent.name, preprocess_config, extractor.name) \
        if extractor else Preprocess(size=cfg.image_size, crop=cfg.image_size)
    if prep.crop != cfg.image_size:
        raise UserError(f"{extractor}: crops to {prep.crop} pixels but the checker's tower takes {cfg.image_size}")
    with torch.device("meta"):
        checker = SafetyChecker(cfg)
    load_into(checker, {_ours(k, tower): v for k, v in sd.items()}, None, f"safety checker {weights}", dtype, device)
    return checker.eval().requires_grad_(False), prep
