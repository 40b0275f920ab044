"""Textual inversion embeddings (Gal et al. 2022) as users download them: AUTOMATIC1111 `.pt` (string_to_param) and
`.safetensors` (emb_params), and diffusers' learned_embeds ({token: vector}). An embedding is named by its file
name and used wherever a prompt names it."""
from pathlib import Path

import torch

from stablediff.adapters.files import embedding_files
from stablediff.checkpoints.hashing import sha256
from stablediff.checkpoints.io import read_pickle, read_safetensors
from stablediff.errors import UserError
from stablediff.prompts import holds


def read_embedding(path: Path) -> dict[str, torch.Tensor]:
    """The (n, D) vectors of one embedding file, whichever of the common layouts it has: {"": vectors}, or for SDXL
    {"clip_l": vectors, "clip_g": vectors}, one set per text encoder."""
    data = read_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a textual inversion embedding (holds a {type(data).__name__})")
    if "clip_l" in data or "clip_g" in data:  # SDXL (the webui's and kohya's): a set for each text encoder
        sets = {k: data.get(k) for k in ("clip_l", "clip_g")}
        if not all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) for v in sets.values()):
            raise UserError(f"{path}: an SDXL embedding needs both clip_l and clip_g vectors")
        return {k: v.detach().float().reshape(-1, v.shape[-1]) for k, v in sets.items()}
    if isinstance(data.get("string_to_param"), dict):  # AUTOMATIC1111 / the original textual_inversion code
        params = list(data["string_to_param"].values())
        vectors = params[0] if len(params) == 1 else None
    elif "emb_params" in data:
        vectors = data["emb_params"]
    else:  # diffusers: one token -> its vector
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        vectors = tensors[0] if len(tensors) == 1 else None
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
        raise UserError(f"{path}: not a textual inversion embedding (no string_to_param, emb_params or single "
                        "token vector in it)")
    return {"": vectors.detach().float().reshape(-1, vectors.shape[-1])}


class EmbeddingLibrary:
    """The embedding files of a folder (searched recursively), read when a prompt first names one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"embeddings folder {folder} not found")
        self.paths = embedding_files(self.folder)
        self.loaded: dict[str, torch.Tensor] = {}
        self.short_hashes: dict[str, str] = {}

    def used(self, tokenizer, texts: list[str]) -> list[str]:
        """The names whose tokens occur in the texts' tokens."""
        lowered = " ".join(texts).lower()
        streams = [tokenizer.tokens(t) for t in texts]
        found = []
        for name in self.paths:
            ids = tokenizer.tokens(name)
            if name.lower() in lowered and any(holds(s, ids) for s in streams):
                found.append(name)
        return found

    def for_texts(self, tokenizer, texts: list[str], width: int,
                  which: str = "") -> dict[tuple[int, ...], torch.Tensor]:
        """{name's token ids: vectors} for every embedding the texts name; which: the text encoder's set in SDXL
        files ("clip_l" or "clip_g"), "" for a model with one text encoder."""
        found = {}
        for name in self.used(tokenizer, texts):
            if name not in self.loaded:
                self.loaded[name] = read_embedding(self.paths[name])
            sets = self.loaded[name]
            if which not in sets:
                have = "an SDXL one (clip_l and clip_g)" if which == "" else "for a model with one text encoder"
                raise UserError(f"embedding {name} ({self.paths[name]}) is {have}; this model is "
                                f"{'SDXL' if which else 'not SDXL'} (an embedding trained for another SD version)")
            vectors = sets[which]
            if vectors.shape[-1] != width:
                raise UserError(f"embedding {name} ({self.paths[name]}) has {vectors.shape[-1]}-wide vectors; this "
                                f"model's text encoder is {width} wide (an embedding trained for another SD version)")
            found[tuple(tokenizer.tokens(name))] = vectors
        return found

    def hashes(self, tokenizer, texts: list[str]) -> dict[str, str]:
        """AUTOMATIC1111's "TI hashes": the first 12 hex digits of each used file's SHA-256."""
        for name in (used := self.used(tokenizer, texts)):
            if name not in self.short_hashes:
                self.short_hashes[name] = sha256(self.paths[name])[:12]
        return {name: self.short_hashes[name] for name in used}
