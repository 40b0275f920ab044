"""`stablediff txt2img` as a user runs it: files, numbering, parameters, CompVis flags, errors, Ctrl-C."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stablediff import cli

BASE = ["--H", "64", "--W", "64", "--steps", "4"]


def run(tmp_path, model, *args):
    return cli.main(["txt2img", "--model", str(model), "--outdir", str(tmp_path), *BASE, *args])


def params(path) -> str:
    return Image.open(path).info["parameters"]


def test_files_numbering_grid_and_parameters(tmp_path, tiny_model_dir):
    assert run(tmp_path, tiny_model_dir, "a red cube", "--seed", "7", "--n_samples", "2") == 0
    assert run(tmp_path, tiny_model_dir, "--prompt", "a red cube", "--seed", "9", "--negative-prompt", "blue") == 0
    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert Image.open(tmp_path / "grid-0000.png").size == (2 + 2 * 66, 2 + 66)  # 2 images in a row, 2px padding
    assert params(tmp_path / "samples" / "00001.png").splitlines() == [
        "a red cube",
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 8, Size: 64x64, Model: tiny-sd1"]
    assert params(tmp_path / "samples" / "00002.png").splitlines()[1] == "Negative prompt: blue"
    assert not list(tmp_path.rglob("*.tmp"))


def test_from_file_keeps_order_and_seeds(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na bird\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run(out, tiny_model_dir, "--from-file", str(prompts), "--n_samples", "2", "--seed", "100",
               "--skip_grid") == 0
    got = [params(out / "samples" / f"{i:05d}.png").splitlines() for i in range(3)]
    assert [g[0] for g in got] == ["a cat", "a dog", "a bird"]
    assert [g[1].split("Seed: ")[1].split(",")[0] for g in got] == ["100", "101", "102"]
    # image 3 (a batch of its own) equals the single image at its seed
    single = tmp_path / "single"
    assert run(single, tiny_model_dir, "a bird", "--seed", "102", "--skip_grid") == 0
    a = np.asarray(Image.open(out / "samples" / "00002.png")).astype(int)
    b = np.asarray(Image.open(single / "samples" / "00000.png")).astype(int)
    assert np.abs(a - b).max() <= 1


def test_compvis_flags_and_fixed_code(tmp_path, tiny_model_dir):
    assert run(tmp_path, tiny_model_dir, "--prompt", "a tree", "--plms", "--ddim_steps", "3", "--scale", "3",
               "--ddim_eta", "0", "--n_iter", "2", "--fixed_code", "--seed", "5", "--skip_grid", "--precision",
               "full", "--device", "cpu", "--C", "4", "--f", "8") == 0
    first, second = (np.asarray(Image.open(tmp_path / "samples" / f"{i:05d}.png")) for i in range(2))
    assert np.array_equal(first, second)  # --fixed_code: every batch starts from the same noise
    assert "Steps: 3, Sampler: PLMS, Schedule type: DDIM, CFG scale: 3" in params(tmp_path / "samples" / "00000.png")


def test_skip_save_writes_only_the_grid(tmp_path, tiny_model_dir):
    assert run(tmp_path, tiny_model_dir, "a", "--skip_save", "--seed", "1") == 0
    assert not list((tmp_path / "samples").iterdir()) and (tmp_path / "grid-0000.png").is_file()


def test_guidance_interval_is_applied_and_saved(tmp_path, tiny_model_dir):
    """An interval no step's sigma falls in leaves the prompt's prediction alone: the image of scale 1. From 0 to
    inf is every step: the image without the flag. The infotext names the interval."""
    runs = {"s1": ["--scale", "1"], "s30": ["--scale", "30"],
            "none": ["--scale", "30", "--guidance-interval", "100", "200"],
            "every": ["--scale", "30", "--guidance-interval", "0", "inf"]}
    for name, extra in runs.items():
        assert run(tmp_path / name, tiny_model_dir, "a red cube", "--seed", "3", "--skip_grid", *extra) == 0
    image = {name: np.asarray(Image.open(tmp_path / name / "samples" / "00000.png")).astype(int) for name in runs}
    assert np.abs(image["s1"] - image["s30"]).max() > 8
    assert np.array_equal(image["none"], image["s1"]) and np.array_equal(image["every"], image["s30"])
    assert "Guidance interval: 100-200" in params(tmp_path / "none" / "samples" / "00000.png")


def test_random_seed_is_printed_and_saved(tmp_path, tiny_model_dir, capsys):
    assert run(tmp_path, tiny_model_dir, "a", "--skip_grid") == 0
    seed = capsys.readouterr().err.split("seed: ")[1].split()[0]
    assert f"Seed: {seed}," in params(tmp_path / "samples" / "00000.png")


@pytest.mark.parametrize("args,message", [
    (["x", "--H", "63"], "--H 63: width and height must be positive multiples of 8"),
    (["x", "--sampler", "foo"], "unknown sampler 'foo'; choose from: ddim, plms"),
    (["--n_samples", "0", "x"], "--n_samples must be from 1 to 64"),
    ([], "no prompt"),
    (["x", "--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["x", "--f", "4"], "--f 4: this model's VAE downsamples by 8"),
    (["x", "--guidance-interval", "3", "1"], "--guidance-interval got [3.0, 1.0]; give two sigmas, low then high"),
])
def test_bad_input_is_one_line(tmp_path, tiny_model_dir, capsys, args, message):
    assert run(tmp_path, tiny_model_dir, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("stablediff: error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_missing_model_from_the_installed_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stablediff.cli", "txt2img", "x", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"stablediff: error: model {tmp_path / 'nope'} not found: pass --model with a .safetensors/.ckpt checkpoint "
        "or a diffusers-layout folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"]


def test_ctrl_c_keeps_finished_images_and_writes_nothing_half(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from stablediff.api import StableDiffusion

    real, calls = StableDiffusion.txt2img, []

    def interrupted_on_second_batch(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(StableDiffusion, "txt2img", interrupted_on_second_batch)
    assert run(tmp_path, tiny_model_dir, "a", "--n_iter", "3", "--seed", "1") == 130
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["00000.png"]
    Image.open(tmp_path / "samples" / "00000.png").load()
    assert "interrupted" in capsys.readouterr().err


def test_lora_embeddings_hires_and_variation_flags(tmp_path, tiny_model_dir, ours, capsys):
    import torch
    from safetensors.torch import save_file

    from test_adapters import kohya_lora

    loras, embeddings = tmp_path / "loras", tmp_path / "embeddings"
    loras.mkdir()
    embeddings.mkdir()
    kohya_lora(ours, loras / "ink.safetensors")
    save_file({"emb_params": torch.randn(2, 128)}, str(embeddings / "toy.safetensors"))
    out = tmp_path / "out"
    assert run(out, tiny_model_dir, "a toy cube <lora:ink:0.5>", "--lora", f"{loras / 'ink.safetensors'}:0.3",
               "--lora-dir", str(loras), "--embeddings-dir", str(embeddings), "--hires-scale", "1.5",
               "--hires-steps", "2", "--hires-upscaler", "lanczos", "--subseed", "4", "--subseed-strength", "0.2",
               "--seed", "1", "--skip_grid") == 0
    image = Image.open(out / "samples" / "00000.png")
    assert image.size == (96, 96)
    info = image.info["parameters"]
    assert info.startswith("a toy cube <lora:ink:0.5>\n")
    for field in ('Lora hashes: "ink: ', 'TI hashes: "toy: ', "Variation seed: 4", "Hires upscale: 1.5",
                  "Hires upscaler: Lanczos", "Denoising strength: 0.7"):
        assert field in info
    ours.use_loras([])
    assert run(out, tiny_model_dir, "x", "--lora", "missing.safetensors:0.5") == 2
    assert "LoRA file missing.safetensors not found" in capsys.readouterr().err
    assert run(out, tiny_model_dir, "x <lora:nope>", "--lora-dir", str(loras)) == 2
    assert "has no nope.safetensors" in capsys.readouterr().err
    assert run(out, tiny_model_dir, "x", "--hires-scale", "2", "--hires-denoise", "0") == 2
    assert "hires fix" in capsys.readouterr().err
