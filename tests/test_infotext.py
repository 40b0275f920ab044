"""Infotext written as AUTOMATIC1111 writes it and read back as it reads it: render, read, render is the same image."""

import numpy as np
import pytest
import torch
from PIL import Image

from stablediff import cli
from stablediff.checkpoints.convert import convert
from stablediff.api import read_spec
from stablediff.diffusion.schedules import TrainSchedule, inference_sigmas
from stablediff.errors import UserError
from stablediff.names import A1111_AUTOMATIC, SAMPLER_LABELS, SCHEDULES, read_schedule
from stablediff.pipelines.common import schedule_label
from stablediff.pipelines.infotext import Params, quote, read_infotext, settings


@pytest.fixture(scope="module")
def oddly_named(tiny_model_dir, tmp_path_factory):
    """The tiny model as a single file whose name holds a comma and a colon."""
    path = tmp_path_factory.mktemp("odd") / "my, model: v2.safetensors"
    convert(read_spec(tiny_model_dir), path)
    return path


def test_values_are_quoted_as_the_webui_quotes_them():
    text = Params("a, b", "c", 20, "Euler", "Karras", 7.0, 1, 64, 64, "my, model: v2",
                  extra={"Lora hashes": "ink: 0123, ship: 4567", "Note": 'say "hi"'}).infotext()
    assert text.splitlines()[-1] == ('Steps: 20, Sampler: Euler, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 64x64, '
                                     'Model: "my, model: v2", Lora hashes: "ink: 0123, ship: 4567", Note: say "hi"')
    prompt, negative, fields = read_infotext(text)
    assert (prompt, negative, fields["Model"], fields["Lora hashes"]) == ("a, b", "c", "my, model: v2", "ink: 0123, ship: 4567")
    assert quote("plain") == "plain" and quote("two\nlines") == '"two\\nlines"'


def test_the_webuis_own_infotext_reads_by_its_meaning():
    text = ("a castle, (masterpiece:1.2)\nsecond line\nNegative prompt: blurry, [ugly]\n"
            "Steps: 28, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 6.5, Seed: 42, Size: 512x768, "
            "Model hash: abcdef1234, Model: v1-5, Clip skip: 2, Version: v1.10.1")
    got = settings(text)
    assert got["prompt"] == "a castle, (masterpiece:1.2)\nsecond line" and got["negative_prompt"] == "blurry, [ugly]"
    assert (got["sampler"], got["schedule"], got["steps"], got["scale"], got["seed"]) == ("dpmpp_2m", "karras", 28, 6.5, 42)
    assert (got["width"], got["height"], got["clip_skip"], got["model"]) == (512, 768, 2, "v1-5")
    assert settings("x\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, Seed: 1")["schedule"] == "uniform"
    assert settings("x\nSteps: 20, Sampler: DPM++ 2M SDE, Seed: 1, Size: 64x64")["schedule"] == "exponential"
    assert settings("x\nSteps: 20, Sampler: DPM++ 2M Karras, Seed: 1, Size: 64x64")["schedule"] == "karras"  # before 1.9
    assert settings("x\nSteps: 20, Sampler: DDIM, Schedule type: SGM Uniform, Seed: 1")["schedule"] == "sgm_uniform"
    with pytest.raises(UserError, match="Schedule type 'Align Your Steps' is not one stablediff has"):
        settings("x\nSteps: 20, Sampler: Euler, Schedule type: Align Your Steps, Seed: 1")
    with pytest.raises(UserError, match="Steps is 'many', not a number"):
        settings("x\nSteps: many, Sampler: Euler, Seed: 1")


SD = TrainSchedule()  # SD 1.x/2.x: leading, offset 1
DEMO = TrainSchedule(beta_end=0.03, prediction="v", spacing="trailing")


@pytest.mark.parametrize("sched", [SD, DEMO], ids=["sd", "trailing"])
def test_every_schedule_name_we_write_reads_back_to_the_same_sigmas(sched):
    for sampler in SAMPLER_LABELS:
        for schedule in SCHEDULES:
            for steps in (1, 3, 7, 20, 30):
                label = schedule_label(sched, schedule, (steps,))
                assert label != "Default" and label != "Automatic"
                back = read_schedule(label, sampler)
                assert torch.equal(inference_sigmas(sched, steps, back), inference_sigmas(sched, steps, schedule)), \
                    (sampler, schedule, steps, label)


def test_the_model_spacing_is_written_as_the_webui_schedule_that_equals_it():
    assert schedule_label(SD, "default", (20,)) == "DDIM"  # 1, 51, ..., 951: the webui's DDIM timesteps
    assert schedule_label(SD, "default", (30,)) == "Leading"  # the webui's DDIM takes 31 steps there: no name of its
    assert schedule_label(DEMO, "default", (20,)) == "Simple"
    assert schedule_label(SD, "default", (20, 28)) == "Leading"  # a hires fix's second pass must agree as well
    assert A1111_AUTOMATIC["dpmpp_2m"] == "karras" and len(inference_sigmas(SD, 7, "ddim")) == 9  # 8 steps, as the webui


ROUND_TRIPS = {
    "negative, eta, clip skip": ["--negative-prompt", "blurry, dark: very", "--sampler", "Euler a", "--eta", "0.5",
                                 "--clip-skip", "2"],
    "karras and variation": ["--sampler", "DPM++ 2M", "--schedule", "karras", "--subseed", "9",
                             "--subseed-strength", "0.3", "--scale", "5.5"],
    "hires": ["--sampler", "Euler", "--hires-scale", "1.5", "--hires-steps", "2", "--hires-denoise", "0.6",
              "--hires-upscaler", "latent-nearest"],
    "guidance interval, trailing": ["--guidance-interval", "0.5", "5", "--schedule", "trailing", "--sampler", "DDIM"],
    "leading at 6 steps": ["--schedule", "leading", "--steps", "6", "--sampler", "lms"],
    "uniform": ["--schedule", "uniform", "--sampler", "heun", "--steps", "3"],
}


@pytest.mark.parametrize("flags", list(ROUND_TRIPS.values()), ids=list(ROUND_TRIPS))
def test_render_read_render_is_the_same_image(oddly_named, tmp_path, flags):
    base = ["--model", str(oddly_named), "--H", "64", "--W", "64", "--steps", "4", "--seed", "11", "--skip_grid"]
    assert cli.main(["txt2img", "a red, round: cube", *base, *flags, "--outdir", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "samples" / "00000.png"
    assert cli.main(["txt2img", "--from-png", str(first), "--model", str(oddly_named), "--skip_grid",
                     "--outdir", str(tmp_path / "b")]) == 0
    second = tmp_path / "b" / "samples" / "00000.png"
    assert Image.open(second).info["parameters"] == Image.open(first).info["parameters"]
    assert 'Model: "my, model: v2"' in Image.open(first).info["parameters"]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_from_png_flags_win_and_img2img_reads_its_strength(oddly_named, tmp_path):
    base = ["--model", str(oddly_named), "--steps", "4", "--skip_grid"]
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    assert cli.main(["img2img", "a bird", "--init-img", str(init), "--strength", "0.6", "--seed", "2", *base,
                     "--outdir", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "samples" / "00000.png"
    assert cli.main(["img2img", "--from-png", str(first), "--init-img", str(init), *base, "--outdir", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(tmp_path / "b" / "samples" / "00000.png")))
    assert cli.main(["img2img", "--from-png", str(first), "--init-img", str(init), "--seed", "3", *base,
                     "--outdir", str(tmp_path / "c")]) == 0
    assert "Seed: 3," in Image.open(tmp_path / "c" / "samples" / "00000.png").info["parameters"]


def test_a_pasted_infotext_from_another_model_says_so(oddly_named, tmp_path, capsys):
    png = tmp_path / "theirs.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, "
                                "Size: 64x64, Model hash: 0123456789, Model: someone-elses")
    Image.new("RGB", (64, 64)).save(png, pnginfo=info)
    assert cli.main(["txt2img", "--from-png", str(png), "--model", str(oddly_named), "--skip_grid",
                     "--outdir", str(tmp_path / "o")]) == 0
    assert "was made with the model someone-elses" in capsys.readouterr().err
    made = Image.open(tmp_path / "o" / "samples" / "00000.png").info["parameters"]
    assert "Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 5, Size: 64x64" in made


def test_sdxl_size_conditioning_fields_read_back_as_the_model_takes_them():
    from stablediff.pipelines.infotext import size_fields

    given = {"original_size": (768, 1024), "target_size": (1024, 1024), "crop": (0, 64), "aesthetic_score": 6.5}
    fields = size_fields(given)
    assert fields == {"Original size": "1024x768", "Target size": "1024x1024", "Crop left": 64, "Crop top": 0,
                      "Aesthetic score": "6.5"}
    text = Params("x", "", 20, "Euler", "Automatic", 7.0, 1, 64, 64, "m", extra=fields).infotext()
    assert settings(text)["size_conditioning"] == given
    assert size_fields({}) == {} and "size_conditioning" not in settings("x\nSteps: 20, Seed: 1, Size: 64x64")
    with pytest.raises(UserError, match="Original size is 'big'; expected WIDTHxHEIGHT"):
        settings("x\nSteps: 20, Seed: 1, Original size: big")
