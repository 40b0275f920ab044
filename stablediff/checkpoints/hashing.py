"""AUTOMATIC1111's "Model hash": the first 10 hex digits of the file's SHA-256. It is computed only on
request (`stablediff info --hash`) and cached beside the file, so plain loading never pays for it."""
import hashlib
import json
import os
from pathlib import Path


def _cache(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def cached_hash(path: Path) -> str | None:
    """The short hash from the cache, if it was made for this file as it is now (size and mtime)."""
    try:
        entry = json.loads(_cache(path).read_text(encoding="utf-8"))
        st = path.stat()
        if entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
            return entry["sha256"][:10]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def sha256(path: Path, skip_safetensors_header: bool = False) -> str:
    """The file's SHA-256 (1 MiB at a time); skip_safetensors_header: of the tensor data only, the "addnet" hash
    the webui shows for LoRA files, which metadata edits leave unchanged."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def compute_hash(path: Path) -> str:
    """Hash the whole file and cache it beside the file when the folder is writable."""
    st = path.stat()
    entry = {"sha256": sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        tmp = _cache(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(entry), encoding="utf-8")
        os.replace(tmp, _cache(path))
    except OSError:
        pass
    return entry["sha256"][:10]
