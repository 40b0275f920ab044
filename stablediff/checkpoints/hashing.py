"""AUTOMATIC1111's "Model hash": the first 10 hex digits of the file's SHA-256. It is computed only on request
(`stablediff info --hash`) and cached in the user's cache folder, keyed by the file's path, size and modification
time, so plain loading never pays for it and nothing is written beside a file the user did not ask to change."""
import hashlib
import json
from pathlib import Path

from stablediff.files import write_atomic


def cache_folder() -> Path:
    """Where hashes are kept: the platform's user cache folder (on Linux $XDG_CACHE_HOME or ~/.cache) / stablediff."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("stablediff", appauthor=False)) / "hashes"


def _entry(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return cache_folder() / f"{key}.json"


def cached_hash(path: Path) -> str | None:
    """The short hash from the cache, if it was made for this file as it is now (path, size and mtime)."""
    try:
        entry = json.loads(_entry(path).read_text(encoding="utf-8"))
        st = path.stat()
        if entry["path"] == str(path.resolve()) and entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns:
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
    """Hash the whole file and cache it (where the cache folder can be written)."""
    st = path.stat()
    entry = {"path": str(path.resolve()), "sha256": sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    target = _entry(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp: Path(tmp).write_text(json.dumps(entry), encoding="utf-8"))
    except OSError:
        pass
    return entry["sha256"][:10]
