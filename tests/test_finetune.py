"""`stablediff finetune --method lora`: the pictures folder as kohya reads it, a LoRA trained here loaded by diffusers'
load_lora_weights rendering our image, the ss_* metadata, and a resumed run equal to an uninterrupted one."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from stablediff import cli
from stablediff.errors import UserError
from stablediff.train import finetune as finetune_module
from stablediff.train.data import Buckets, bucket_for, buckets, read_folder
from stablediff.train.finetune import finetune
from stablediff.train.settings import FinetuneSettings
from test_adapters import render
from test_txt2img_parity import LEADING, assert_close, reference_image

CPU = torch.device("cpu")


def pictures(folder, sizes=((96, 64), (64, 96), (80, 80), (128, 64), (70, 70)), name="2_star"):
    """A few pictures of a star of varied sizes in an N_name folder, one with a caption of its own."""
    place = folder / name
    place.mkdir(parents=True)
    for i, size in enumerate(sizes):
        image = Image.new("RGB", size, (40 * i, 90, 200 - 30 * i))
        ImageDraw.Draw(image).regular_polygon((size[0] // 2, size[1] // 2, min(size) // 3), 5, fill=(250, 210, 0))
        image.save(place / f"{i}.png")
    (place / "0.txt").write_text("a yellow star on a blue background", encoding="utf-8")
    return folder


def test_folder_captions_repeats_and_buckets(tmp_path):
    folder = pictures(tmp_path / "pics")
    by_name = {e.path.name: (e.caption, e.repeats) for e in read_folder(folder)}
    assert by_name["0.png"] == ("a yellow star on a blue background", 2)  # its own .txt first
    assert by_name["1.png"] == ("star", 2)  # else the N_name folder's name
    (folder / "loose.png").write_bytes((folder / "2_star" / "1.png").read_bytes())
    with pytest.raises(UserError, match=r"1 picture\(s\) .* have no caption \(loose.png\)"):
        read_folder(folder)
    by_name = {e.path.name: (e.caption, e.repeats) for e in read_folder(folder, instance_prompt="a photo of sks star")}
    assert by_name["0.png"] == ("a yellow star on a blue background", 2)
    assert by_name["1.png"] == ("a photo of sks star", 2) and by_name["loose.png"] == ("a photo of sks star", 1)
    sizes = buckets(512)
    assert (512, 512) in sizes and all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert bucket_for((1024, 512), sizes) == (640, 384) and bucket_for((512, 1024), sizes) == (384, 640)
    assert Buckets(read_folder(folder, "x"), 64).total == 2 * 5 + 1
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"1 picture\(s\) in .* cannot be read: broken.png"):
        read_folder(folder, "x")


def test_a_trained_lora_loads_in_diffusers_and_renders_our_image(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    out = tmp_path / "star.safetensors"
    settings = FinetuneSettings(resolution=64, steps=4, lr=2e-2, conv_rank=2, conv_alpha=2.0, seed=1)
    summary = finetune(tiny_model_dir, pictures(tmp_path / "pics"), out, tmp_path / "work", settings, CPU,
                       progress=False)
    assert summary["steps"] == 4 and len(summary["losses"]) == 4
    sd = load_file(out)
    assert any(k.startswith("lora_unet_") and "attn2_to_k" in k for k in sd)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") and sd[k].ndim == 4 for k in sd)  # LoCon
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "star" and meta["ss_max_train_steps"] == "4"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 2.0}
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_star": {"n_repeats": 2, "img_count": 5}}

    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    before = reference_image(pipe, "EulerDiscreteScheduler", LEADING, {})
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(lora_scale=1.0)
    expected = reference_image(pipe, "EulerDiscreteScheduler", LEADING, {})
    assert np.abs(expected.astype(int) - before.astype(int)).max() > 10  # the training changed what it draws
    assert_close(render(ours.use_loras([(out, 1.0)])), expected)


def test_text_encoder_factors_are_written_in_kohya_names(tiny_model_dir, tmp_path):
    out = tmp_path / "te.safetensors"
    settings = FinetuneSettings(resolution=64, steps=2, train_text_encoder=True, feed_forward=False, seed=2)
    finetune(tiny_model_dir, pictures(tmp_path / "pics"), out, tmp_path / "work", settings, CPU, progress=False)
    keys = load_file(out).keys()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in keys
    assert not any("ff_net" in k for k in keys)


def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch):
    settings = FinetuneSettings(resolution=64, steps=6, checkpoint_every=3, lr=1e-2, batch_size=2, flip=True,
                                min_snr_gamma=5.0, noise_offset=0.1, train_text_encoder=True, schedule="cosine",
                                warmup=2, seed=3)
    folder = pictures(tmp_path / "pics")
    finetune(tiny_model_dir, folder, tmp_path / "whole.safetensors", tmp_path / "work-a", settings, CPU, progress=False)

    real, calls = finetune_module.diffusion_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # in step 5: the checkpoint of step 3 is the last
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(finetune_module, "diffusion_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, folder, tmp_path / "resumed.safetensors", tmp_path / "work-b", settings, CPU,
                 progress=False)
    assert not (tmp_path / "resumed.safetensors").exists()  # nothing half-written
    monkeypatch.setattr(finetune_module, "diffusion_loss", real)
    finetune(tiny_model_dir, folder, tmp_path / "resumed.safetensors", tmp_path / "work-b", settings, CPU, progress=False)
    whole, resumed = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(whole[k].abs().sum() > 0 for k in whole if "lora_up" in k)


def test_finetune_command_line(tiny_model_dir, tmp_path, capsys):
    folder = pictures(tmp_path / "pics")
    out = tmp_path / "loras" / "cli.safetensors"  # (its folder made)
    assert cli.main(["finetune", str(out), "--model", str(tiny_model_dir), "--images", str(folder),
                     "--resolution", "64", "--steps", "2", "--rank", "2", "--alpha", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().err and out.is_file()
    assert cli.main(["finetune", str(out), "--model", str(tiny_model_dir), "--images", str(folder)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["finetune", str(tmp_path / "x.safetensors"), "--model", str(tiny_model_dir), "--images",
                     str(tmp_path / "nothing")]) == 2
    assert "not a folder of pictures" in capsys.readouterr().err


def test_dreambooth_with_prior_preservation_loads_in_diffusers_from_single_file(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    out = tmp_path / "dreambooth.safetensors"
    settings = FinetuneSettings(method="dreambooth", resolution=64, steps=3, lr=1e-3, class_prompt=("a photo of a star",),
                                num_class_images=3, train_text_encoder=True, save_dtype="fp32", seed=4)
    summary = finetune(tiny_model_dir, pictures(tmp_path / "pics"), out, tmp_path / "work", settings, CPU,
                       progress=False)
    assert summary["class_images"] == 3
    made = sorted((tmp_path / "work" / "class-images").glob("*/*.png"))
    assert len(made) == 3 and all("a photo of a star" in Image.open(p).info["parameters"] for p in made)
    stamps = [p.stat().st_mtime_ns for p in made]
    ours = StableDiffusion.load(out, device="cpu", dtype="fp32")
    base = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    assert not torch.equal(ours.unet.out[-1].weight, base.unet.out[-1].weight)  # trained
    assert not torch.equal(ours.text_encoder.final_layer_norm.weight, base.text_encoder.final_layer_norm.weight)
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model_dir), safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert_close(render(ours), reference_image(pipe, "EulerDiscreteScheduler", LEADING, {}))

    again = dict(vars(settings), ema=True, steps=2)  # a rerun keeps the class pictures it made
    finetune(tiny_model_dir, tmp_path / "pics", tmp_path / "again.safetensors", tmp_path / "work-again",
             FinetuneSettings(**again), CPU, progress=False)
    finetune(tiny_model_dir, tmp_path / "pics", tmp_path / "third.safetensors", tmp_path / "work",
             FinetuneSettings(**dict(again, steps=4)), CPU, progress=False)
    assert [p.stat().st_mtime_ns for p in made] == stamps


@pytest.mark.parametrize("layout", ["a1111", "diffusers"])
def test_a_trained_embedding_loads_in_diffusers_load_textual_inversion(tiny_model_dir, tmp_path, layout):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    folder = tmp_path / "emb"
    folder.mkdir()
    out = folder / "sks-star.safetensors"
    settings = FinetuneSettings(method="textual-inversion", instance_prompt="a photo of sks-star", init_word="star",
                                vectors=2, resolution=64, steps=3, lr=0.5, embedding_format=layout, seed=5)
    with pytest.raises(UserError, match="do not name the token"):  # a caption of its own without the token
        finetune(tiny_model_dir, pictures(tmp_path / "pics"), out, tmp_path / "work", settings, CPU, progress=False)
    (tmp_path / "pics" / "2_star" / "0.txt").write_text("sks-star on blue", encoding="utf-8")
    finetune(tiny_model_dir, tmp_path / "pics", out, tmp_path / "work", settings, CPU, progress=False)
    sd = load_file(out)
    vectors = sd["emb_params"] if layout == "a1111" else sd["sks-star"]
    start = StableDiffusion.load(tiny_model_dir, device="cpu").text_encoder.embeddings.token_embedding.weight[
        StableDiffusion.load(tiny_model_dir, device="cpu").tokenizer.tokens("star")[0]]
    assert vectors.shape == (2, 128) and not torch.equal(vectors[0], start)  # trained from the word's embedding
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(out), token="sks-star")
    prompt = "a photo of sks-star on a table"
    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32", embeddings_dir=folder)
    assert_close(render(ours, prompt), reference_image(pipe, "EulerDiscreteScheduler", LEADING, {}, prompt=prompt))


def test_finetune_command_line_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    folder = pictures(tmp_path / "pics")
    base = ["finetune", "--model", str(tiny_model_dir), "--images", str(folder), "--resolution", "64", "--steps", "1"]
    for extra, said in ((["--method", "textual-inversion"], "give --init-word"),
                        (["--method", "textual-inversion", "--init-word", "star", "--instance-prompt", "a photo of t"],
                         "do not name the token 't'"),
                        (["--resolution", "100"], "multiple of 64"),
                        (["--method", "dreambooth", "--clip-skip", "9"], "--clip-skip 9"),
                        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a GPU"),
                        (["--sample-every", "5"], "give both")):
        name = str(tmp_path / "t.safetensors")
        assert cli.main([*base, *extra, name]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def test_a_lora_in_the_peft_layout_loads_in_diffusers_with_its_alpha_folded_in(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    out = tmp_path / "peft.safetensors"
    settings = FinetuneSettings(resolution=64, steps=3, lr=2e-2, rank=4, alpha=2.0, train_text_encoder=True,
                                lora_format="peft", seed=6)
    finetune(tiny_model_dir, pictures(tmp_path / "pics"), out, tmp_path / "work", settings, CPU, progress=False)
    keys = load_file(out).keys()
    assert any(k.startswith("unet.") and k.endswith("attn1.to_q.lora_A.weight") for k in keys)
    assert any(k.startswith("text_encoder.") and k.endswith("self_attn.q_proj.lora_B.weight") for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora(lora_scale=1.0)
    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    assert_close(render(ours.use_loras([(out, 1.0)])), reference_image(pipe, "EulerDiscreteScheduler", LEADING, {}))


def test_accumulated_micro_batches_equal_one_step_on_their_mean_loss(tmp_path):
    from stablediff.train.loop import Run

    data = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

    def make():
        torch.manual_seed(1)
        return torch.nn.Linear(3, 2)

    accumulated, whole = make(), make()
    Run("a", {"m": accumulated}, steps=4, lr=0.1, warmup=0, ema_decay=None, accumulate=2).train(
        lambda i: accumulated(data[i:i + 1]).square().sum(), progress=False)
    Run("b", {"m": whole}, steps=4, lr=0.1, warmup=0, ema_decay=None).train(
        lambda s: whole(data[2 * s:2 * s + 2]).square().sum(1).mean(), progress=False)
    for a, b in zip(accumulated.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b)


def test_two_processes_through_accelerate_end_with_one_process_weights(tiny_model_dir, tmp_path):
    """accelerate launch of the same command: two gloo processes of batch 1 each train as one process of batch 2 (the
    same pictures, crops and noise; DDP's averaged gradients), and only the main process writes."""
    import subprocess
    import sys

    from serving import free_port

    folder = pictures(tmp_path / "pics")
    flags = ["--model", str(tiny_model_dir), "--images", str(folder), "--resolution", "64", "--steps", "3",
             "--lr", "1e-2", "--precision", "fp32", "--flip", "--train-text-encoder", "--noise-offset", "0.1",
             "--seed", "6", "--device", "cpu"]
    apart = tmp_path / "apart.safetensors"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "stablediff.cli"]
    done = subprocess.run([*launch, "finetune", str(apart), *flags, "--batch-size", "1"], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"wrote {apart}") == 1  # the main process alone
    assert cli.main(["finetune", str(tmp_path / "whole.safetensors"), *flags, "--batch-size", "2"]) == 0
    whole, two = load_file(tmp_path / "whole.safetensors"), load_file(apart)
    assert whole.keys() == two.keys()
    # within float tolerance of AdamW's steps: each moves a weight by up to lr (1e-2) over its gradient's own size, so
    # where a gradient is a near-cancelling sum of the pictures', the order of the sum (DDP's average against one
    # batch's mean) shows at a few hundredths of a step; a different batch moves weights by whole steps
    gap = max((two[k] - whole[k]).abs().max().item() for k in whole)
    single = tmp_path / "single.safetensors"
    assert cli.main(["finetune", str(single), *flags, "--batch-size", "1"]) == 0
    other = max((load_file(single)[k] - whole[k]).abs().max().item() for k in whole)
    print(f"two processes against one: {gap:.2e}; one of batch 1 against batch 2: {other:.2e}")
    assert gap < 1e-3 < other


def test_gradient_checkpointing_trains_the_same_and_samples_show_the_lora_as_it_is(tiny_model_dir, tmp_path):
    from stablediff import StableDiffusion

    folder = pictures(tmp_path / "pics")
    plain = FinetuneSettings(resolution=64, steps=4, lr=2e-2, conv_rank=2, seed=7, precision="fp32")  # (as rendered)
    finetune(tiny_model_dir, folder, tmp_path / "plain.safetensors", tmp_path / "w1", plain, CPU, progress=False)
    sampled = FinetuneSettings(**dict(vars(plain), gradient_checkpointing=True, sample_every=2,
                                      sample_prompt=("a yellow star", "a star on blue")))
    out = tmp_path / "sampled.safetensors"
    finetune(tiny_model_dir, folder, out, tmp_path / "w2", sampled, CPU, progress=False)
    a, b = load_file(tmp_path / "plain.safetensors"), load_file(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # recomputed activations are the same ones; samples draw apart
    names = sorted(p.name for p in (tmp_path / "w2" / "samples").glob("*.png"))
    assert names == ["000002-0.png", "000002-1.png", "000004-0.png", "000004-1.png"]
    last = Image.open(tmp_path / "w2" / "samples" / "000004-1.png")
    assert "a star on blue" in last.info["parameters"]
    ours = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    base = ours.txt2img(["a star on blue"], width=64, height=64, seed=[plain.seed + 1])
    again = ours.use_loras([(out, 1.0)]).txt2img(["a star on blue"], width=64, height=64, seed=[plain.seed + 1])
    assert_close([last], np.asarray(again[0])[None])  # every hooked layer drew, the feed-forward's and upsamplers' too
    assert np.abs(np.asarray(last).astype(int) - np.asarray(base[0])).max() > 10


def test_8bit_adamw_where_bitsandbytes_runs_and_resumes(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    folder = pictures(tmp_path / "pics")
    settings = FinetuneSettings(resolution=64, steps=3, lr=1e-2, optimizer="adamw8bit", seed=8)
    out = tmp_path / "eight.safetensors"
    finetune(tiny_model_dir, folder, out, tmp_path / "work", settings, CPU, progress=False)
    with safe_open(out, "pt") as f:
        assert f.metadata()["ss_optimizer"].startswith("bitsandbytes.optim.AdamW8bit")
    # two steps, then on from their checkpoint (a constant rate: the same as one run of three)
    finetune(tiny_model_dir, folder, tmp_path / "two.safetensors", tmp_path / "w2", FinetuneSettings(
        **dict(vars(settings), steps=2)), CPU, progress=False)
    state = torch.load(tmp_path / "w2" / "lora.pt", weights_only=True)["optimizer"]["state"]
    assert all("__bnb_optimizer_quant_state__" in v or "state1" in v for v in state.values())  # bitsandbytes' own
    finetune(tiny_model_dir, folder, tmp_path / "three.safetensors", tmp_path / "w2", settings, CPU, progress=False)
    whole, resumed = load_file(out), load_file(tmp_path / "three.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    adamw = tmp_path / "adamw.safetensors"
    finetune(tiny_model_dir, folder, adamw, tmp_path / "w3", FinetuneSettings(**dict(vars(settings), optimizer="adamw")),
             CPU, progress=False)
    assert any(not torch.equal(whole[k], load_file(adamw)[k]) for k in whole)
