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
    ("C:\\path\\to", [("C:pathto", 1.0)]),  # a lone backslash is dropped, as the webui's re_attention drops it
    ("a \\\\ b \\", [("a \\ b ", 1.0)]),  # an escaped backslash stays, a trailing one goes
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
    assert len(long) == 2 and all(len(ids) == 77 for ids, _, _ in long)
    assert long[0][0][1:72] == [2368] * 70 + [267] and long[0][0][72] == tok.eos  # cut after the comma
    assert long[1][0][1:11] == [1929] * 10
    assert len(chunks(tok, "cat " * 200)) == 3
    assert len(chunks(tok, "a BREAK b")) == 2


def test_chunks_follow_a_shorter_text_encoder():
    tok = ClipTokenizer(max_len=24)  # 22 text tokens per chunk
    short = chunks(tok, "a photo of a cat")
    assert len(short) == 1 and short[0][0] == tok(["a photo of a cat"])[0].tolist() and len(short[0][0]) == 24
    long = chunks(tok, "cat " * 30)
    assert [len(ids) for ids, _, _ in long] == [24, 24] and long[1][0][1:9] == [2368] * 8


def render(model, prompt, **kw):
    out = model.txt2img(prompt, steps=8, sampler="euler", schedule="default", seed=3, width=64, height=64, **kw)
    return np.asarray(out[0]).astype(int)


def test_weight_one_renders_the_same_image_and_emphasis_changes_it(ours):
    plain = render(ours, "a red house on a hill")
    assert np.array_equal(render(ours, "a red (house:1.0) on a hill"), plain)
    # the same tokens, only the weight differs: any change in the image comes from emphasis
    (ids, weights, _), = chunks(ours.tokenizer, "a red (house:1.6) on a hill")
    assert ids == chunks(ours.tokenizer, "a red house on a hill")[0][0] and weights[3] == 1.6
    assert not np.array_equal(render(ours, "a red (house:1.6) on a hill"), plain)


def test_a_word_after_the_75th_token_changes_the_image(ours):
    base = "cat " * 80
    first = [chunks(ours.tokenizer, base + w)[0][0] for w in ("dog", "car")]
    assert first[0] == first[1]  # truncated at 75 tokens, the two prompts would be the same prompt
    assert not np.array_equal(render(ours, base + "dog"), render(ours, base + "car"))


def test_long_prompt_and_short_negative_are_padded_to_one_length(ours):
    from stablediff.pipelines.conditioning import encode_conditioning

    (stretch,) = encode_conditioning(ours, ["cat " * 100], ["blurry"], steps=8).stretches
    assert stretch["context"].shape == stretch["uncond"].shape == (1, 154, 128)
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


SCHEDULED = [  # (prompt, steps, first pass steps, expected [(last step, text)]): the webui's documented schedules
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, None, [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    ("[fe|]male", 10, None, [(i, "female" if i % 2 else "male") for i in range(1, 11)]),
    ("[fe|||]male", 10, None, [(i, "female" if i % 4 == 1 else "male") for i in range(1, 11)]),
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),  # a hires pass: 0.5 was in the first pass
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    ("a [b:15] c", 10, 10, [(5, "a  c"), (10, "a b c")]),
    # where the webui's grammar finds no parse, the prompt stays as written (checked against its lark grammar)
    ("a [{b|d{:.5] c", 10, None, [(10, "a [{b|d{:.5] c")]),
    ("a | b", 10, None, [(10, "a | b")]),
    ("x [a:b:c:0.5]", 10, None, [(10, "x [a:b:c:0.5]")]),
    ("(a:[b:c:2])", 10, None, [(2, "(a:b)"), (10, "(a:c)")]),
    ("[a::3]", 10, None, [(3, "a"), (10, "")]),
    ("[a:b:-1]", 10, None, [(10, "b")]),
    ("[a:b:3]]", 10, None, [(3, "a]"), (10, "b]")]),
    ("((a:b:3))", 10, None, [(10, "((a:b:3))")]),
    ("a [b:c:2] \\\nd", 10, None, [(10, "a [b:c:2] \\\nd")]),  # lark's `\\.` matches no newline: no parse
    ("a [b:c:2] \\", 10, None, [(10, "a [b:c:2] \\")]),  # nor a trailing backslash
    ("a [b:c:2]\nd \\[x\\]", 10, None, [(2, "a b\nd \\[x\\]"), (10, "a c\nd \\[x\\]")]),
]


@pytest.mark.parametrize("prompt,steps,first,expected", SCHEDULED, ids=[f"{p}-{f}" for p, _, f, _ in SCHEDULED])
def test_prompt_editing_and_alternation_schedules(prompt, steps, first, expected):
    from stablediff.prompts import schedule

    assert schedule(prompt, steps, first) == expected


def test_and_splits_weighted_parts():
    from stablediff.prompts import split_and

    assert split_and("a cat AND a dog :0.5 AND (x:1.2)") == [("a cat", 1.0), (" a dog", 0.5), (" (x:1.2)", 1.0)]
    assert split_and("ANDROID") == [("ANDROID", 1.0)]
    assert split_and("a cat:-1.5") == [("a cat", -1.5)]


def euler(model, prompt, steps=20, **kw):
    out = model.txt2img(prompt, steps=steps, sampler="euler", schedule="default", seed=3, width=64, height=64, **kw)
    return np.asarray(out[0]).astype(int)


def test_prompt_edit_switches_at_the_webuis_step(ours):
    """[cat:dog:10] over 20 steps: steps 0..10 see "cat" and 11..19 "dog" (the webui's `step <= when`), so it equals
    sampling the first 11 steps with one prompt and the rest with the other."""
    from stablediff.pipelines import common

    cat_job, dog_job = (common.prepare(ours, [p], [""], [3], steps=20, sampler="euler", schedule="default", scale=7.5,
                                       eta=None, width=64, height=64) for p in ("a photo of a cat", "a photo of a dog"))
    x = cat_job.start_noise() * (1 + cat_job.sigmas[0] ** 2) ** 0.5
    x = common.sample(ours, cat_job, x, cat_job.sigmas[:12]) * (1 + cat_job.sigmas[11] ** 2) ** 0.5
    latents = common.sample(ours, dog_job, x, dog_job.sigmas[11:])
    manual = np.asarray(common.decode(ours, latents)[0]).astype(int)
    edited = euler(ours, "a photo of a [cat:dog:10]")
    assert np.abs(edited - manual).max() <= 1
    assert np.abs(edited - euler(ours, "a photo of a dog")).max() > 5
    assert np.array_equal(euler(ours, "a photo of a [cat:dog:0]"), euler(ours, "a photo of a dog"))
    assert np.array_equal(euler(ours, "a photo of a [cat:dog:1.0]"), euler(ours, "a photo of a cat"))
    assert np.array_equal(euler(ours, "a photo of a [cat|dog]", steps=1), euler(ours, "a photo of a cat", steps=1))


def test_composable_prompts(ours):
    plain = euler(ours, "a photo of a cat")
    assert np.array_equal(euler(ours, "a photo of a cat:1"), plain)
    halves = euler(ours, "a photo of a cat :0.5 AND a photo of a cat :0.5")
    assert np.abs(halves - plain).max() <= 1  # the same prompt twice at half weight is the prompt
    assert np.abs(euler(ours, "a photo of a cat AND a red house:0.8") - plain).max() > 5


def test_variation_seeds(ours):
    from stablediff.pipelines.common import slerp

    plain = euler(ours, "a photo of a cat")
    assert np.array_equal(euler(ours, "a photo of a cat", subseed=9, subseed_strength=0.0), plain)
    other = np.asarray(ours.txt2img("a photo of a cat", steps=20, sampler="euler", schedule="default", seed=9,
                                    width=64, height=64)[0]).astype(int)
    assert np.array_equal(euler(ours, "a photo of a cat", subseed=9, subseed_strength=1.0), other)
    out = ours.txt2img("a photo of a cat", steps=20, sampler="euler", schedule="default", seed=3, width=64, height=64,
                       subseed=9, subseed_strength=0.4)
    mixed = np.asarray(out[0]).astype(int)
    assert np.abs(mixed - plain).max() > 5 and np.abs(mixed - other).max() > 5
    assert "Variation seed: 9, Variation seed strength: 0.4" in out[0].info["parameters"]
    a, b = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    half = slerp(0.5, a, b)  # spherical along dim 1: unit vectors stay unit, where a plain average shrinks them
    assert torch.allclose(half.norm(dim=1), torch.ones(4, 8), atol=1e-5)
    assert ((a + b) / 2).norm(dim=1).max() < 0.99


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_fix(ours, upscaler):
    from stablediff.pipelines.txt2img import Hires

    calls = []
    out = ours.txt2img("a photo of a cat", steps=6, sampler="euler", schedule="default", seed=3, width=64, height=64,
                       hires=Hires(2, 4, 0.5, upscaler), callback=lambda *a: calls.append(1))
    assert out[0].size == (128, 128) and len(calls) == 6 + 4
    info = out[0].info["parameters"]
    assert "Size: 64x64" in info and "Hires upscale: 2, Hires steps: 4" in info and "Denoising strength: 0.5" in info
    assert np.asarray(out[0]).std() > 10
