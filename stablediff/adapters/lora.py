"""LoRA (Hu et al. 2021) as users download it: kohya / AUTOMATIC1111 files (lora_unet_*, lora_te_*, alpha, LoCon
convolutions) and diffusers / PEFT files (lora_A / lora_B, or the older processor names). Weights are merged into
the model for full speed, W += weight * alpha / rank * up @ down, and restored bit for bit from a copy of the
originals when the set of LoRAs changes."""
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stablediff.checkpoints.hashing import sha256
from stablediff.checkpoints.io import read_state_dict
from stablediff.adapters.files import lora_file
from stablediff.checkpoints.keymaps import invert, rename, unet_prefixes
from stablediff.errors import UserError

_TAG = re.compile(r"<(lora|lyco):([^>]+)>")
# the part of a key that says which factor it is, and the factor; what comes before names the module
_FACTORS = [(re.compile(p), f) for p, f in [
    (r"\.lora_down\.weight$", "down"), (r"\.lora_up\.weight$", "up"), (r"\.alpha$", "alpha"),
    (r"\.lora_A(?:\.default)?\.weight$", "down"), (r"\.lora_B(?:\.default)?\.weight$", "up"),
    (r"\.lora_linear_layer\.down\.weight$", "down"), (r"\.lora_linear_layer\.up\.weight$", "up"),
    (r"\.processor\.(to_[qkv])_lora\.down\.weight$", "down"), (r"\.processor\.(to_[qkv])_lora\.up\.weight$", "up"),
    (r"\.processor\.to_out_lora\.down\.weight$", "down_out"), (r"\.processor\.to_out_lora\.up\.weight$", "up_out")]]


@dataclass(frozen=True)
class LoraUse:
    """One LoRA file applied at a weight to the text encoder and to the UNet."""

    path: Path
    text_weight: float = 1.0
    unet_weight: float = 1.0

    @property
    def name(self) -> str:
        return self.path.stem

    def hash(self) -> str:
        """The webui's short hash: 12 hex digits of the SHA-256 of the tensor data (of the whole file for pickles)."""
        return sha256(self.path, skip_safetensors_header=self.path.suffix == ".safetensors")[:12]


def module_names(model) -> dict[str, tuple[str, str]]:
    """Every name a LoRA file may give a layer of this model -> (text_encoder or unet, our module name)."""
    names = {}
    back = invert(unet_prefixes(model.unet.config))
    for ours, module in model.unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            theirs = (rename(ours + ".weight", back) or ours + ".weight").removesuffix(".weight")
            # kohya names (diffusers' paths, or CompVis' in some older files), diffusers' with and without "unet."
            for name in ("lora_unet_" + theirs.replace(".", "_"), "lora_unet_" + ours.replace(".", "_"), "unet." + theirs,
                         theirs):
                names[name] = ("unet", ours)
    # kohya: lora_te_ (SD 1.x/2.x), lora_te1_ and lora_te2_ (SDXL's two encoders); diffusers: text_encoder(_2).
    sdxl = getattr(model, "text_encoder_2", None) is not None
    for part, kohya in (("text_encoder", "lora_te1_" if sdxl else "lora_te_"), ("text_encoder_2", "lora_te2_")):
        encoder = getattr(model, part, None)
        for ours, module in encoder.named_modules() if encoder is not None else ():
            if isinstance(module, nn.Linear) and ours != "text_projection":
                theirs = "text_model." + ours  # transformers 5 saves CLIPTextModel without the text_model level
                for name in (kohya + theirs.replace(".", "_"), f"{part}.{theirs}", f"{part}.{ours}"):
                    names[name] = (part, ours)
    return names


def _group(sd: dict[str, torch.Tensor]) -> tuple[dict[str, dict], list[str]]:
    """{module key: {"down", "up", "alpha"}}, and the keys that are no factor this code knows (LoHa, LoKr, ...)."""
    groups, unknown = {}, []
    for key, tensor in sd.items():
        key = key.removeprefix("base_model.model.")
        for pattern, factor in _FACTORS:
            if m := pattern.search(key):
                module = key[:m.start()]
                if m.groups():
                    module += "." + m.group(1)
                elif factor.endswith("_out"):
                    module, factor = module + ".to_out.0", factor[:-4]
                groups.setdefault(module, {})[factor] = tensor
                break
        else:
            unknown.append(key)
    return groups, unknown


def _delta(factors: dict, shape: torch.Size) -> torch.Tensor:
    """alpha / rank * up @ down, shaped like the weight it adds to (a linear layer's, or a convolution's)."""
    down, up = factors["down"].float(), factors["up"].float()
    scale = float(factors["alpha"]) / down.shape[0] if "alpha" in factors else 1.0
    delta = (up.flatten(1) @ down.flatten(1)) * scale  # (out, rank) @ (rank, in * kh * kw)
    if delta.numel() != shape.numel():
        raise ValueError
    return delta.reshape(shape)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class LoraMerger:
    """The LoRAs merged into one model now, and the original weights they replaced."""

    def __init__(self):
        self.active: tuple[LoraUse, ...] = ()
        self.merged: tuple = ()  # what `active` was merged from: (use, file size and mtime) pairs
        self.hashes: dict[LoraUse, str] = {}  # of the active files, for the infotext
        self.backup: dict[tuple[str, str], torch.Tensor] = {}

    def sync(self, model, wanted: tuple[LoraUse, ...]) -> None:
        """Make `wanted` the merged set: restore the originals, then merge each; a failure leaves none merged.
        A file rewritten since it was merged counts as a different LoRA."""
        key = tuple((use, _stamp(use.path)) for use in wanted)
        if key == self.merged:
            return
        self.restore(model)
        try:
            for use in wanted:
                self._merge(model, use)
        except BaseException:
            self.restore(model)
            raise
        self.active, self.merged = tuple(wanted), key
        self.hashes = {use: use.hash() for use in wanted}

    def restore(self, model) -> None:
        with torch.no_grad():
            for (part, name), original in self.backup.items():
                getattr(model, part).get_submodule(name).weight.copy_(original)
        self.backup.clear()
        self.active, self.merged, self.hashes = (), (), {}

    def _merge(self, model, use: LoraUse) -> None:
        groups, unknown = _group(read_state_dict(use.path))
        names = module_names(model)
        matched, unmatched = [], list(unknown)
        for key, factors in groups.items():
            (matched if key in names and {"down", "up"} <= factors.keys() else unmatched).append(key)
        if not matched:
            raise UserError(f"LoRA {use.path}: none of its {len(groups) + len(unknown)} layers is a layer of this model "
                            "(a LoRA for another model family, or a kind this program does not read: LoHa, LoKr)")
        if unmatched:
            print(f"stablediff: warning: LoRA {use.name}: {len(unmatched)} keys match no layer of this model and were "
                  f"skipped ({', '.join(unmatched[:3])}{' ...' if len(unmatched) > 3 else ''})", file=sys.stderr)
        with torch.no_grad():
            for key in matched:
                part, name = names[key]
                weight = use.unet_weight if part == "unet" else use.text_weight
                param = getattr(model, part).get_submodule(name).weight
                try:
                    delta = _delta(groups[key], param.shape)
                except ValueError:
                    raise UserError(f"LoRA {use.path}: {key} does not fit this model's layer of shape "
                                    f"{tuple(param.shape)} (a LoRA for another model)") from None
                self.backup.setdefault((part, name), param.detach().to("cpu", copy=True))
                param.copy_((param.float() + weight * delta.to(param.device)).to(param.dtype))


def parse_use(spec: str) -> LoraUse:
    """`FILE` or `FILE:WEIGHT` (or FILE:TEXT_WEIGHT:UNET_WEIGHT), as --lora takes it."""
    path, *numbers = re.split(r":(?=[-+.\d][\d.eE+-]*(?::|$))", spec)
    try:
        weights = [float(n) for n in numbers]
    except ValueError:
        weights = None
    if weights is None or len(weights) > 2:
        raise UserError(f"--lora {spec}: give FILE or FILE:WEIGHT (e.g. style.safetensors:0.8)")
    weights = weights or [1.0]
    return LoraUse(Path(path), weights[0], weights[-1])


def find(folder: Path | None, name: str) -> Path:
    """The LoRA file named `name` in a folder or its subfolders."""
    if folder is None:
        raise UserError(f"the prompt names <lora:{name}>: pass --lora-dir with the folder of your LoRA files")
    found = lora_file(folder, name)
    if found is not None:
        return found
    raise UserError(f"the prompt names <lora:{name}>, but {folder} has no {name}.safetensors (or .pt, .ckpt)")


def take_tags(prompt: str, folder: Path | None) -> tuple[str, list[LoraUse]]:
    """The prompt without its <lora:name:weight> tags (also <lora:name:text_weight:unet_weight>), and those LoRAs."""
    uses = []
    for m in _TAG.finditer(prompt):
        name, *numbers = m.group(2).split(":")
        try:
            weights = [float(n) for n in numbers if "=" not in n] or [1.0]
        except ValueError:
            raise UserError(f"{m.group(0)}: the weight must be a number, as in <lora:{name}:0.8>") from None
        uses.append(LoraUse(find(folder, name.strip()), weights[0], weights[-1]))
    return _TAG.sub("", prompt), uses
