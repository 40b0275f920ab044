"""CLIP's byte-level BPE tokenizer, built on the `tokenizers` library from the shipped tables."""
import json
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's own split: contractions, letter runs, single digits, runs of other non-space symbols
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_tables() -> Path:
    return Path(str(resources.files("stablediff") / "data" / "clip-tokenizer"))


class ClipTokenizer:
    """Prompt -> 77 ids: start token, up to 75 text tokens, end token, then padding.

    The pad token is a special token, as in transformers: with SD 2.x folders' "!" a literal "!" in a
    prompt is read as that token, which is what diffusers feeds those models.
    """

    def __init__(self, tables: Path | None = None, pad_token: str = EOS, max_len: int = 77):
        tables = Path(tables or default_tables())
        vocab = json.loads((tables / "vocab.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split()) for line in (tables / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(dict.fromkeys([BOS, EOS, pad_token])))
        self._tok = tok
        self.bos, self.eos = vocab[BOS], vocab[EOS]
        self.pad = vocab[pad_token]
        self.max_len = max_len

    def tokens(self, text: str) -> list[int]:
        """The text's token ids, without start/end tokens or truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_len) ids, truncated to max_len - 2 text tokens as the reference does."""
        rows = []
        for ids in (e.ids for e in self._tok.encode_batch(prompts, add_special_tokens=False)):
            row = [self.bos, *ids[: self.max_len - 2], self.eos]
            rows.append(row + [self.pad] * (self.max_len - len(row)))
        return torch.tensor(rows, dtype=torch.long)
