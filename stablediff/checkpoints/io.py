"""Reading weight files: safetensors memory-mapped, pickles with torch's weights-only unpickler."""
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from stablediff.errors import UserError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors, .bin, .ckpt or .pt file; a pickle never runs code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise UserError(f"{path}: refused to unpickle: the file asks for more than tensors ({first})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable PyTorch weights file ({e})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    return sd
