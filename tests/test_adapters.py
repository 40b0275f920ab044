"""LoRA and textual inversion files as users download them, against diffusers' loaders on the same weights; and a
LoRA taken out again leaves the model bit for bit as it was."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from stablediff.adapters.lora import module_names, take_tags
from test_txt2img_parity import LEADING, assert_close, reference_image

RANK, ALPHA = 4, 2.0


def kohya_lora(ours, path, conv: bool = True, te_attention: bool = True, extra: dict | None = None):
    """A kohya-layout LoRA over the attention, feed-forward, projection and (LoCon) resnet convolutions of the
    UNet and the text encoder's attention and MLP: lora_unet_<diffusers path with _>, lora_down/up, alpha."""
    gen = torch.Generator().manual_seed(7)
    targets = {name: module for name, module in module_names(ours).items() if name.startswith(("lora_unet_", "lora_te_"))
               and any(k in name for k in ("to_q", "to_k", "to_v", "to_out_0", "ff_net", "proj_in", "q_proj" if te_attention else "-", "fc1",
                                            "resnets_0_conv1" if conv else "-"))
               and "input_blocks" not in name and "output_blocks" not in name and "middle_block" not in name}
    sd = {}
    for name, (part, ours_name) in targets.items():
        weight = getattr(ours, part).get_submodule(ours_name).weight
        out_ch, in_ch, *kernel = weight.shape
        down_shape = (RANK, in_ch, *kernel)  # convolutions (1x1 ones too) as kohya stores them: 4-d factors
        up_shape = (out_ch, RANK, 1, 1) if kernel else (out_ch, RANK)
        sd[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.3
        sd[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file({**sd, **(extra or {})}, str(path))
    return sd


def render(model, prompt="a photo of a cat", **kw):
    return model.txt2img(prompt, steps=20, sampler="euler", schedule="default", seed=3, width=64, height=64, **kw)


def test_kohya_lora_at_08_matches_diffusers_fuse_lora(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    path = tmp_path / "style.safetensors"
    # diffusers 0.42 under transformers 5 renames kohya text-encoder attention keys to to_q_lora and then drops them
    # ("UNEXPECTED"); the text encoder's MLP LoRA is compared here, its attention in the PEFT-format test
    kohya_lora(ours, path, te_attention=False)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    before = reference_image(pipe, "EulerDiscreteScheduler", LEADING, {})
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    expected = reference_image(pipe, "EulerDiscreteScheduler", LEADING, {})
    assert np.abs(expected.astype(int) - before.astype(int)).max() > 10  # the LoRA changes the image
    got = render(ours.use_loras([(path, 0.8)]))
    assert_close(got, expected)
    assert '"style: ' in got[0].info["parameters"] and "Lora hashes" in got[0].info["parameters"]


def test_lora_in_the_prompt_then_removed_leaves_weights_bit_identical(tiny_model_dir, tmp_path, capsys):
    from stablediff import StableDiffusion

    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32", lora_dir=tmp_path)
    before = {k: v.clone() for part in (ours.unet, ours.text_encoder) for k, v in part.state_dict().items()}
    plain = np.asarray(render(ours)[0])
    sub = tmp_path / "styles"
    sub.mkdir()
    kohya_lora(ours, sub / "ink.safetensors", extra={"lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8)})
    with_lora = np.asarray(render(ours, "a photo of a cat <lora:ink:0.6>")[0])
    assert "1 keys match no layer" in capsys.readouterr().err  # reported, not silently dropped
    assert np.abs(with_lora.astype(int) - plain.astype(int)).max() > 10
    again = np.asarray(render(ours)[0])
    after = {k: v for part in (ours.unet, ours.text_encoder) for k, v in part.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.array_equal(again, plain)


def test_lora_tags_and_errors(tmp_path):
    from stablediff.errors import UserError

    (tmp_path / "a.safetensors").write_bytes(b"")
    text, uses = take_tags("a cat <lora:a:0.5>, <lora:a:0.2:0.9> at night", tmp_path)
    assert text == "a cat ,  at night"
    assert [(u.text_weight, u.unet_weight) for u in uses] == [(0.5, 0.5), (0.2, 0.9)]
    with pytest.raises(UserError, match="has no b.safetensors"):
        take_tags("<lora:b>", tmp_path)
    with pytest.raises(UserError, match="pass --lora-dir"):
        take_tags("<lora:b>", None)


def test_lora_for_another_model_is_refused_and_leaves_nothing_merged(ours, tmp_path):
    from stablediff.errors import UserError

    sd = kohya_lora(ours, tmp_path / "ok.safetensors")
    key = next(k for k in sd if "to_q.lora_up" in k and k.startswith("lora_unet_"))
    bad = {**sd, key: torch.zeros(sd[key].shape[0] * 2, RANK)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(UserError, match="does not fit"):
        render(ours.use_loras([(tmp_path / "bad.safetensors", 1.0)]))
    ours.use_loras([])
    assert all(torch.equal(before[k], v) for k, v in ours.unet.state_dict().items())
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(tmp_path / "none.safetensors"))
    with pytest.raises(UserError, match="none of its 1 layers"):
        render(ours.use_loras([(tmp_path / "none.safetensors", 1.0)]))
    ours.use_loras([])


def test_peft_lora_matches_diffusers(tiny_model_dir, tmp_path):
    """diffusers' own save format (unet./text_encoder. prefixes, lora_A/lora_B, no alpha: scale 1)."""
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    kohya = kohya_lora(ours, tmp_path / "k.safetensors", conv=False)
    names = module_names(ours)
    back = {v: k for k, v in names.items() if k.startswith(("unet.", "text_encoder."))}
    peft = {}
    for key, tensor in kohya.items():
        module, factor = key.rsplit(".", 1)[0].removesuffix(".lora_down").removesuffix(".lora_up"), key
        if key.endswith(".alpha"):
            continue
        name = back[names[module]]
        peft[f"{name}.lora_{'A' if '.lora_down.' in factor else 'B'}.weight"] = tensor
    save_file(peft, str(tmp_path / "peft.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    pipe.fuse_lora(lora_scale=0.8)
    expected = reference_image(pipe, "EulerDiscreteScheduler", LEADING, {})
    assert_close(render(ours.use_loras([(tmp_path / "peft.safetensors", 0.8)])), expected)


@pytest.mark.parametrize("layout", ["a1111-pt", "a1111-safetensors", "diffusers"])
def test_textual_inversion_matches_diffusers_load_textual_inversion(tiny_model_dir, tmp_path, layout):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    vectors = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    folder = tmp_path / "emb"
    folder.mkdir()
    if layout == "a1111-pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "toy", "step": 100},
                   folder / "cat-toy.pt")
    elif layout == "a1111-safetensors":
        save_file({"emb_params": vectors}, str(folder / "cat-toy.safetensors"))
    else:
        vectors = vectors[:1]
        torch.save({"cat-toy": vectors[0]}, folder / "cat-toy.bin")
    path = next(folder.iterdir())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(path), token="cat-toy")
    expected = reference_image(pipe, "EulerDiscreteScheduler", LEADING, {}, prompt="a photo of cat-toy on a table")
    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32", embeddings_dir=folder)
    got = render(ours, "a photo of cat-toy on a table")
    assert_close(got, expected)
    assert "TI hashes: \"cat-toy: " in got[0].info["parameters"]
    plain = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    assert np.abs(np.asarray(render(plain, "a photo of cat-toy on a table")[0]).astype(int)
                  - np.asarray(got[0]).astype(int)).max() > 10  # without the file, the words are ordinary words


def test_embedding_of_another_width_is_refused(ours, tmp_path):
    from stablediff.adapters.embeddings import EmbeddingLibrary
    from stablediff.errors import UserError

    save_file({"emb_params": torch.zeros(2, 1024)}, str(tmp_path / "wide.safetensors"))
    library = EmbeddingLibrary(tmp_path)
    with pytest.raises(UserError, match="1024-wide vectors"):
        library.for_texts(ours.tokenizer, ["a wide photo"], 128)
    assert library.for_texts(ours.tokenizer, ["a photo"], 128) == {}
