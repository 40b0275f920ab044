"""Reading weight files safely and without needless copies.

safetensors: the header is validated, then every tensor is a view of a private memory map of the file, so
the only copy made is the one into the run's dtype and device. Pickles (.ckpt, .pt, .bin) go through
torch's weights-only unpickler, which allows tensors, storages, OrderedDict and plain types and refuses
any other global before anything runs; the few harmless objects that training scripts leave in real
checkpoints (Lightning callbacks, numpy step counters) are read as inert placeholders.
"""
import json
import math
import mmap
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from stablediff.errors import UserError

MAX_HEADER = 100 * 1024 * 1024
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class Placeholder:
    """Stands in for a harmless non-tensor object in a checkpoint; keeps nothing and runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# globals that real SD checkpoints carry beside their tensors, read as placeholders
PLACEHOLDER_GLOBALS = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                       "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
                       "numpy.dtypes.Int64DType", "numpy.dtypes.Float64DType")


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a valid .safetensors file: {why}")


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"tensor name {key!r} appears twice")
        seen[key] = value
    return seen


def _check_entry(path, name, info, start, data_size):
    """Validate one header entry given where the previous tensor ended; returns (dtype, shape, end)."""
    if not isinstance(info, dict) or info.get("dtype") not in ST_DTYPES:
        raise _bad(path, f"tensor {name!r} has an unknown dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _bad(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _bad(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if begin != start:
        raise _bad(path, f"tensor {name!r} starts at byte {begin}, expected {start} ("
                   + ("overlapping tensors)" if begin < start else "a gap before it)"))
    dtype = ST_DTYPES[info["dtype"]]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if end - begin != nbytes:
        raise _bad(path, f"tensor {name!r} has {end - begin} bytes but shape {shape} x {info['dtype']} needs {nbytes}")
    if end > data_size:
        raise _bad(path, f"tensor {name!r} runs past the end of the file")
    return dtype, shape, end


def _header(f, path: Path, size: int) -> tuple[dict, int]:
    """The JSON header of an open .safetensors file and its length in bytes."""
    head = f.read(8)
    if len(head) < 8:
        raise _bad(path, "shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER:
        raise _bad(path, f"the header claims {n} bytes (over 100 MB)")
    if 8 + n > size:
        raise _bad(path, f"the header claims {n} bytes, past the end of the {size}-byte file")
    try:
        header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(path, f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "the header is not a JSON object")
    return header, n


def read_metadata(path: Path) -> dict[str, str]:
    """The string-to-string `__metadata__` of a .safetensors header ({} when there is none)."""
    path = Path(path)
    with open(path, "rb") as f:
        meta = _header(f, path, path.stat().st_size)[0].get("__metadata__") or {}
    if not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise _bad(path, "__metadata__ is not a mapping of strings to strings")
    return meta


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file as views of a private memory map, after validating the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, n = _header(f, path, size)
        header.pop("__metadata__", None)
        data_size, start, layout = size - 8 - n, 0, []
        entries = sorted(header.items(), key=lambda kv: (kv[1].get("data_offsets") or [0])[0] if isinstance(kv[1], dict) else 0)
        for name, info in entries:
            dtype, shape, end = _check_entry(path, name, info, start, data_size)
            layout.append((name, dtype, shape, start))
            start = end
        if start != data_size:
            raise _bad(path, f"{data_size - start} bytes after the last tensor belong to none")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    return {name: _view(mapped, 8 + n + begin, dtype, shape) for name, dtype, shape, begin in layout}


def _view(mapped, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.frombuffer(mapped, dtype=torch.uint8, count=count * itemsize, offset=offset)
    if offset % itemsize:  # misaligned for its type: one copy to an aligned buffer
        raw = raw.clone()
    return raw.view(dtype).reshape(shape)


def _check_zip(path: Path) -> bool:
    """Refuse archives whose members could not have been written by torch.save (compressed or oversized)."""
    if not zipfile.is_zipfile(path):
        return False
    size = path.stat().st_size
    try:
        members = zipfile.ZipFile(path).infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: a broken zip archive ({e})") from None
    for m in members:
        if m.file_size > size or m.compress_type != zipfile.ZIP_STORED:
            raise UserError(f"{path}: refused: archive member {m.filename!r} declares {m.file_size} bytes "
                            f"{'compressed' if m.compress_type != zipfile.ZIP_STORED else ''} in a {size}-byte file; "
                            "torch.save never writes that")
    return True


def read_pickle(path: Path, unsafe: bool = False) -> dict:
    """A torch.save file's contents; with unsafe=False no code inside it can run."""
    is_zip = _check_zip(path)
    if unsafe:
        print(f"stablediff: warning: --unsafe-pickle: loading {path} with the full unpickler; code inside it can run",
              file=sys.stderr)
    placeholders = [(Placeholder, name) for name in PLACEHOLDER_GLOBALS]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(str(path), map_location="cpu", weights_only=not unsafe, mmap=is_zip)
    except pickle.UnpicklingError as e:
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"asks for {asked.group(1)}, which a weights file never needs" if asked else f"is not a plain weights pickle ({str(e).strip().splitlines()[0][:200]})"
        raise UserError(f"{path}: refused to unpickle: the file {what}; nothing in it was run. "
                        "If you trust its source, --unsafe-pickle loads it anyway") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{path}: not a readable PyTorch weights file ({str(e).strip().splitlines()[0][:200]})") from None


def read_state_dict(path: Path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or pickled weights file, unwrapped from a top-level `state_dict`."""
    return read_weights(path, unsafe_pickle)[0]


def read_weights(path: Path, unsafe_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a weights file: a .safetensors header's `__metadata__`, or the strings at the top
    level of a pickle beside its `state_dict` (where stablediff keeps a model's config in a .ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return read_safetensors(path), read_metadata(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise UserError(f"{path}: unknown weights format (expected .safetensors, .ckpt, .pt, .pth or .bin)")
    top = sd = _plain(read_pickle(path, unsafe_pickle), path)
    if isinstance(sd.get("state_dict"), dict):
        sd = _plain(sd["state_dict"], path)
    meta = {k: v for k, v in top.items() if isinstance(k, str) and isinstance(v, str)} if sd is not top else {}
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, meta


def _plain(value, path: Path) -> dict:
    """A plain dict of what a pickle held. dict's own methods read it: an unpickled OrderedDict can carry instance
    attributes named `items` or `get` that would shadow them."""
    if not isinstance(value, dict):
        raise UserError(f"{path}: holds a {type(value).__name__}, not a dictionary of tensors")
    return dict(dict.items(value))
