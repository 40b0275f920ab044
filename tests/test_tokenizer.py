"""Token ids equal transformers' CLIPTokenizer on 1000+ varied prompts."""
import random

import pytest

from stablediff.models.tokenizer import ClipTokenizer

from conftest import TABLES

WORDS = ("a photo of an astronaut riding horse on mars, highly detailed 8k trending artstation portrait "
         "of cat dog (masterpiece:1.2) [bad] don't it's we're they've I'm you'll he'd café naïve Ünïcödé "
         "日本語 中文 한국어 русский ελληνικά émoji 🎉 🐱‍👤 ✨ -- ... !!! ??? #tag @user 100% $5 1girl 2024 "
         "3.14 x2 a_b a-b a/b \\(escaped\\) <|endoftext|> <|startoftext|> <lora:foo:0.8> BREAK AND").split()


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a photo of a cat", "A  Photo\tOf\nA CAT", "word " * 100, "x," * 80, "🎉" * 40,
           "ａｂｃ full-width", "e\u0301 combining accent", "zero\u200bwidth space"]
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60, 120])
        seps = [" ", " ", " ", ", ", "  ", "\t", "", "\n"]
        out.append("".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(k)).strip(rng.choice(["", " "])))
    return out


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_ids_equal_transformers(pad):
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), pad_token=pad, model_max_length=77)
    ours = ClipTokenizer(pad_token=pad)
    texts = prompts(1200)
    expected = ref(texts, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(texts).tolist()
    mismatched = [t for t, a, b in zip(texts, got, expected) if a != b]
    assert not mismatched, f"{len(mismatched)} prompts differ, first: {mismatched[0]!r}"


def test_known_ids_and_padding():
    assert ClipTokenizer()(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    sd2 = ClipTokenizer(pad_token="!")(["a photo of a cat"])[0]
    assert sd2[6].item() == 49407 and sd2[7:].eq(0).all()


def test_overlong_prompt_is_truncated_to_75_tokens_plus_end():
    ids = ClipTokenizer()(["cat " * 200])[0]
    assert ids.shape == (77,) and ids[0] == 49406 and ids[-1] == 49407 and ids[1:-1].eq(2368).all()
