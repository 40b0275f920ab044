"""AUTOMATIC1111 prompt syntax: the parser on a table of prompts with the pieces the webui documents, long
prompts in 75-token chunks, and emphasis as the webui applies it."""
import numpy as np
import pytest
import torch

from stablediff.models.tokenizer import ClipTokenizer
from stablediff.prompts import chunks, parse_attention

PARSED = [  # (prompt, expected (text, weight) pieces), from the webui's documented behaviour
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[unbalanced", [("unbalanced", 0.9090909090909091)]),
    ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
    ("(x:1.0)", [("x", 1.0)]),
    ("(x:0)", [("x", 0.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a: b", [("a: b", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", PARSED, ids=[p for p, _ in PARSED])
def test_parser(prompt, expected):
    got = parse_attention(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert np.allclose([w for _, w in got], [w for _, w in expected])


def test_chunks_of_75_split_at_the_last_comma():
    tok = ClipTokenizer()
    short = chunks(tok, "a photo of a cat")
    assert len(short) == 1 and short[0][0] == tok(["a photo of a cat"])[0].tolist()
    long = chunks(tok, "cat " * 70 + ", " + "dog " * 10)  # the comma at token 70 is within 20 of the end
    assert len(long) == 2 and all(len(ids) == 77 for ids, _ in long)
    assert long[0][0][1:72] == [2368] * 70 + [267] and long[0][0][72] == tok.eos  # cut after the comma
    assert long[1][0][1:11] == [1929] * 10
    assert len(chunks(tok, "cat " * 200)) == 3
    assert len(chunks(tok, "a BREAK b")) == 2


def render(model, prompt, **kw):
    out = model.txt2img(prompt, steps=8, sampler="euler", schedule="default", seed=3, width=64, height=64, **kw)
    return np.asarray(out[0]).astype(int)


def test_weight_one_renders_the_same_image_and_emphasis_changes_it(ours):
    plain = render(ours, "a red house on a hill")
    assert np.array_equal(render(ours, "a red (house:1.0) on a hill"), plain)
    # the same tokens, only the weight differs: any change in the image comes from emphasis
    (ids, weights), = chunks(ours.tokenizer, "a red (house:1.6) on a hill")
    assert ids == chunks(ours.tokenizer, "a red house on a hill")[0][0] and weights[3] == 1.6
    assert not np.array_equal(render(ours, "a red (house:1.6) on a hill"), plain)


def test_a_word_after_the_75th_token_changes_the_image(ours):
    base = "cat " * 80
    first = [chunks(ours.tokenizer, base + w)[0][0] for w in ("dog", "car")]
    assert first[0] == first[1]  # truncated at 75 tokens, the two prompts would be the same prompt
    assert not np.array_equal(render(ours, base + "dog"), render(ours, base + "car"))


def test_long_prompt_and_short_negative_are_padded_to_one_length(ours):
    from stablediff.pipelines.common import encode_text, match_chunks

    a, b = match_chunks(ours, encode_text(ours, ["cat " * 100]), encode_text(ours, ["blurry"]))
    assert a.shape == b.shape == (1, 154, 128)
    assert render(ours, "cat " * 100, negative_prompt="blurry").shape == (64, 64, 3)


def test_emphasis_restores_the_mean(ours):
    from stablediff.prompts import encode

    with torch.no_grad():
        plain = encode(ours.text_encoder, ours.tokenizer, ["a red house"], "cpu")
        strong = encode(ours.text_encoder, ours.tokenizer, ["a red (house:1.5)"], "cpu")
    assert torch.allclose(plain.mean(), strong.mean(), atol=1e-5) and not torch.allclose(plain, strong)


def penultimate(reference, text: str) -> torch.Tensor:
    """The reference's states one layer before the last, through the final layer norm (what diffusers' clip_skip=1
    computes; its own clip_skip path expects transformers 4's `text_model` attribute, absent in transformers 5)."""
    ids = reference.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return reference.text_encoder.final_layer_norm(hidden)


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_norm(ours, reference):
    from stablediff.prompts import encode

    with torch.no_grad():
        got = encode(ours.text_encoder, ours.tokenizer, ["a photo of a cat"], "cpu", clip_skip=2)
    assert (got - penultimate(reference, "a photo of a cat")).abs().max() < 1e-4


def test_clip_skip_image_matches_diffusers(ours, reference):
    from test_txt2img_parity import LEADING, assert_close, reference_image

    embeds = {"prompt_embeds": penultimate(reference, "a photo of a cat"), "negative_prompt_embeds": penultimate(reference, "")}
    expected = reference_image(reference, "EulerDiscreteScheduler", LEADING, {}, prompt=None, **embeds)
    got = ours.txt2img("a photo of a cat", steps=20, sampler="euler", schedule="default", seed=3, width=64, height=64,
                       clip_skip=2)
    assert_close(got, expected)
    assert "Clip skip: 2" in got[0].info["parameters"]
    with pytest.raises(Exception, match="clip skip 9 is not possible"):
        ours.txt2img("x", clip_skip=9, width=64, height=64)
