"""Where LoRA and embedding files are found in their folders, without torch: the engine loads what these find, and
the server checks and lists the same files before anything is loaded."""
from pathlib import Path

from stablediff.checks import check_name

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
EMBEDDING_SUFFIXES = (".pt", ".safetensors", ".bin")


def lora_file(folder: Path, name: str) -> Path | None:
    """The LoRA file `name` in the folder or its subfolders (by suffix, then path order), or None."""
    check_name(name, f"<lora:{name}>")
    for suffix in LORA_SUFFIXES:
        hits = sorted(Path(folder).rglob(name + suffix))
        if hits:
            return hits[0]
    return None


def lora_files(folder: Path) -> list[Path]:
    return [p for p in sorted(Path(folder).rglob("*")) if p.suffix in LORA_SUFFIXES and p.is_file()]


def embedding_files(folder: Path) -> dict[str, Path]:
    """Each embedding of the folder or its subfolders by the name a prompt uses: its file name without suffix."""
    return {p.stem: p for p in sorted(Path(folder).rglob("*")) if p.suffix in EMBEDDING_SUFFIXES and p.is_file()}
