"""SDXL: two text encoders, the pooled text + size embedding, the refiner; on tiny random models of the real
design built by diffusers, image for image equal to diffusers' SDXL pipelines."""
import numpy as np
import pytest
import torch

from stablediff import StableDiffusion

from test_img2img import init_image, square_mask
from test_txt2img_parity import LEADING, KARRAS, assert_close

STEPS = 12
SAMPLERS = [("ddim", "default", "DDIMScheduler", {}),
            ("euler_a", "default", "EulerAncestralDiscreteScheduler", LEADING),
            ("dpmpp_2m", "karras", "DPMSolverMultistepScheduler", KARRAS)]
IDS = [s[0] for s in SAMPLERS]


def reference(pipe, scheduler, config, prompt="a photo of a cat", seed=3, steps=STEPS, **kw):
    import diffusers

    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.base_scheduler_config, **config)
    kw.setdefault("guidance_scale", 7.5)
    out = pipe(prompt, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(seed),
               **kw).images
    return (out * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    path, pipe = tiny_sdxl
    return StableDiffusion.load(path, device="cpu", dtype="fp32"), pipe


def test_text_states_and_pooled_equal_diffusers(sdxl):
    from stablediff.pipelines.conditioning import encode_text

    ours, pipe = sdxl
    prompt = "a red house by the sea"
    with torch.no_grad():
        states, pooled = encode_text(ours, [prompt])
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert states.shape == ref.shape == (1, 77, 128)
    torch.testing.assert_close(states, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-4, rtol=0)


def test_long_prompts_go_through_both_encoders_in_chunks_and_the_pooled_text_is_the_first_chunks(sdxl):
    from stablediff.pipelines.conditioning import encode_text

    ours, _ = sdxl
    first = "a red house by the sea, " * 12  # 84 tokens: two chunks, the first ending at a comma
    with torch.no_grad():
        states, pooled = encode_text(ours, [first + "at night"])
        _, alone = encode_text(ours, [first])
    assert states.shape == (1, 154, 128)
    # the first chunk's pooled text: the same as a prompt cut where the chunk ends (the webui breaks at the comma)
    torch.testing.assert_close(pooled, alone, atol=1e-6, rtol=0)


def test_unet_and_vae_equal_diffusers(sdxl):
    ours, pipe = sdxl
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, 128, generator=gen)
    pooled = torch.randn(2, 32, generator=gen)
    ids = torch.tensor([[64, 64, 0, 0, 64, 64], [96, 80, 8, 0, 64, 64]], dtype=torch.float32)
    t = torch.tensor([981.0, 401.0])
    from stablediff.models.unet import size_vector

    with torch.no_grad():
        expected = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        vector = torch.cat([pooled, size_vector(ids, ours.unet.config.vector_embed_dim)], 1)
        got = ours.unet(x, t, ctx, vector=vector)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        z = torch.randn(1, 4, 8, 8, generator=gen)
        torch.testing.assert_close(ours.vae.decode(z), pipe.vae.decode(z).sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=IDS)
def test_txt2img_matches_diffusers(sdxl, sampler, schedule, scheduler, config):
    ours, pipe = sdxl
    expected = reference(pipe, scheduler, config, height=64, width=64)
    got = ours.txt2img("a photo of a cat", steps=STEPS, sampler=sampler, schedule=schedule, seed=3, width=64,
                       height=64)
    assert_close(got, expected)


def test_negative_prompt_and_size(sdxl):
    ours, pipe = sdxl
    expected = reference(pipe, "EulerAncestralDiscreteScheduler", LEADING, prompt="a red house",
                         negative_prompt="blurry", height=72, width=56, seed=10)
    got = ours.txt2img("a red house", "blurry", steps=STEPS, sampler="euler_a", schedule="default", seed=10, width=56,
                       height=72)
    assert_close(got, expected)


@pytest.fixture(scope="module")
def img2img_pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl[1].components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=IDS)
def test_img2img_matches_diffusers(sdxl, img2img_pipe, sampler, schedule, scheduler, config):
    ours = sdxl[0]
    expected = reference(img2img_pipe, scheduler, config, image=init_image(), strength=0.6)
    got = ours.img2img(init_image(), "a photo of a cat", strength=0.6, steps=STEPS, sampler=sampler,
                       schedule=schedule, seed=3)
    assert_close(got, expected)


@pytest.fixture(scope="module")
def sdxl_inpaint(tmp_path_factory):
    from conftest import make_sdxl_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-inpaint"
    pipe = make_sdxl_pipeline(in_channels=9)
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return StableDiffusion.load(path, device="cpu", dtype="fp32"), pipe


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=IDS)
def test_nine_channel_inpainting_matches_diffusers_inside_the_mask(sdxl_inpaint, sampler, schedule, scheduler, config):
    ours, pipe = sdxl_inpaint
    assert ours.variant == "inpainting"
    expected = reference(pipe, scheduler, config, image=init_image(), mask_image=square_mask(), strength=1.0,
                         height=64, width=64)
    got = ours.inpaint(init_image(), square_mask(), "a photo of a cat", strength=1.0, mask_blur=0, steps=STEPS,
                       sampler=sampler, schedule=schedule, seed=3)
    inside = (slice(None), slice(16, 48), slice(16, 48))
    assert_close([np.stack([np.asarray(g) for g in got])[inside][0]], expected[inside])
    outside = np.asarray(got[0]).astype(int) - np.asarray(init_image()).astype(int)
    assert not outside[:16].any() and not outside[48:].any()


@pytest.fixture(scope="module")
def refiner_pair(tmp_path_factory):
    from conftest import make_sdxl_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny-sdxl-refiner"
    pipe = make_sdxl_pipeline(refiner=True)
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return StableDiffusion.load(path, device="cpu", dtype="fp32"), pipe


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=IDS)
def test_base_then_refiner_matches_diffusers_denoising_end_and_start(sdxl, refiner_pair, sampler, schedule, scheduler,
                                                                     config):
    """diffusers' "ensemble of expert denoisers": the base stops at denoising_end=0.7 with latents, the refiner goes
    on from them at denoising_start=0.7, one generator through both (Euler a's noise goes on from the base's)."""
    import diffusers

    from stablediff import Refiner

    ours, base = sdxl
    refiner, pipe = refiner_pair
    assert refiner.variant == "refiner" and refiner.text_encoder is None
    for p in (base, pipe):
        if not hasattr(p, "base_scheduler_config"):
            p.base_scheduler_config = dict(p.scheduler.config)
        p.scheduler = getattr(diffusers, scheduler).from_config(p.base_scheduler_config, **config)
    g = torch.Generator().manual_seed(3)
    latents = base("a photo of a cat", num_inference_steps=STEPS, denoising_end=0.7, output_type="latent", generator=g,
                   height=64, width=64, guidance_scale=7.5).images
    out = pipe("a photo of a cat", image=latents, num_inference_steps=STEPS, denoising_start=0.7, generator=g,
               output_type="np", guidance_scale=7.5).images
    expected = (out * 255).round().astype(np.uint8)
    got = ours.txt2img("a photo of a cat", steps=STEPS, sampler=sampler, schedule=schedule, seed=3, width=64, height=64,
                       refiner=Refiner(refiner, 0.7))
    assert_close(got, expected)
    alone = np.asarray(ours.txt2img("a photo of a cat", steps=STEPS, sampler=sampler, schedule=schedule, seed=3,
                                    width=64, height=64)[0]).astype(int)
    assert np.abs(alone - np.asarray(got[0]).astype(int)).max() > 10  # the refiner did the last steps
    assert f"Refiner: {refiner.name}, Refiner switch at: 0.7" in got[0].info["parameters"]


def test_refiner_img2img_matches_diffusers(refiner_pair):
    """The refiner alone (bigG only, the aesthetic score in its vector) as img2img."""
    ours, pipe = refiner_pair
    expected = reference(pipe, "EulerAncestralDiscreteScheduler", LEADING, image=init_image(), strength=0.6)
    got = ours.img2img(init_image(), "a photo of a cat", strength=0.6, steps=STEPS, sampler="euler_a",
                       schedule="default", seed=3)
    assert_close(got, expected)


def test_lcm_sampler_matches_lcm_scheduler(sdxl):
    """The LCM sampler on its own timesteps (LCMScheduler's: 4 of the 50 it was distilled on), guidance off as an
    LCM LoRA is used."""
    ours, pipe = sdxl
    expected = reference(pipe, "LCMScheduler", {}, steps=4, guidance_scale=1.0, height=64, width=64)
    got = ours.txt2img("a photo of a cat", steps=4, sampler="LCM", scale=1.0, seed=3, width=64, height=64)
    assert_close(got, expected)
    assert "Sampler: LCM, Schedule type: LCM" in got[0].info["parameters"]


def test_kohya_sdxl_lora_matches_diffusers_fuse_lora(tiny_sdxl, tmp_path):
    """A kohya SDXL LoRA as sd-scripts writes it: lora_unet_ with the SGM block names (input_blocks_4_1_...),
    lora_te1_ and lora_te2_ for the two text encoders; merged at 0.8 as diffusers' load_lora_weights + fuse_lora."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from stablediff.adapters.lora import module_names

    path, _ = tiny_sdxl
    ours = StableDiffusion.load(path, device="cpu", dtype="fp32")
    gen = torch.Generator().manual_seed(7)
    # the text encoders' MLPs (diffusers under transformers 5 drops kohya text attention keys: see test_adapters)
    wanted = ("to_q", "to_k", "to_v", "to_out_0", "ff_net", "proj_in", "mlp_fc1")
    sd = {}
    for name, (part, module) in module_names(ours).items():
        sgm = name.startswith("lora_unet_") and name == "lora_unet_" + module.replace(".", "_")
        if (sgm or name.startswith(("lora_te1_", "lora_te2_"))) and any(w in name for w in wanted):
            weight = getattr(ours, part).get_submodule(module).weight
            sd[f"{name}.lora_down.weight"] = torch.randn(4, weight.shape[1], generator=gen) * 0.2
            sd[f"{name}.lora_up.weight"] = torch.randn(weight.shape[0], 4, generator=gen) * 0.2
            sd[f"{name}.alpha"] = torch.tensor(4.0)
    assert any(k.startswith("lora_te2_") for k in sd) and any("input_blocks" in k for k in sd)
    save_file(sd, str(tmp_path / "style.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    before = reference(pipe, "EulerDiscreteScheduler", LEADING, height=64, width=64)
    pipe.load_lora_weights(str(tmp_path / "style.safetensors"), adapter_name="style")
    # the same LoRA as diffusers saves it (PEFT names: unet.*, text_encoder.*, text_encoder_2.*, lora_A / lora_B)
    from peft.utils import get_peft_model_state_dict

    layers = {f"{part}_lora_layers": get_peft_model_state_dict(getattr(pipe, part), adapter_name="style")
              for part in ("unet", "text_encoder", "text_encoder_2")}
    pipe.save_lora_weights(tmp_path / "peft", **layers)
    pipe.fuse_lora(lora_scale=0.8)
    expected = reference(pipe, "EulerDiscreteScheduler", LEADING, height=64, width=64)
    assert np.abs(expected.astype(int) - before.astype(int)).max() > 10
    # PEFT's files carry no alpha (it is 1 per rank): the same LoRA, since this one's alpha is its rank
    for lora in (tmp_path / "style.safetensors", tmp_path / "peft" / "pytorch_lora_weights.safetensors"):
        got = ours.use_loras([(lora, 0.8)]).txt2img("a photo of a cat", steps=STEPS, sampler="euler",
                                                    schedule="default", seed=3, width=64, height=64)
        assert_close(got, expected)


def test_sdxl_embedding_matches_diffusers_load_textual_inversion_on_both_encoders(tiny_sdxl, tmp_path):
    """An SDXL embedding ({"clip_l": ..., "clip_g": ...}, as the webui and kohya write them): each encoder gets its
    own vectors, as diffusers' load_textual_inversion called once per encoder."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from stablediff.errors import UserError

    gen = torch.Generator().manual_seed(5)
    vectors = {"clip_l": torch.randn(2, 64, generator=gen), "clip_g": torch.randn(2, 64, generator=gen)}
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file(vectors, str(folder / "cat-toy.safetensors"))
    save_file({"emb_params": torch.randn(2, 64)}, str(folder / "sd1-toy.safetensors"))
    path, _ = tiny_sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(vectors["clip_l"], token="cat-toy", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token="cat-toy", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of cat-toy on a table"
    expected = reference(pipe, "EulerDiscreteScheduler", LEADING, prompt=prompt, height=64, width=64)
    ours = StableDiffusion.load(path, device="cpu", dtype="fp32", embeddings_dir=folder)
    got = ours.txt2img(prompt, steps=STEPS, sampler="euler", schedule="default", seed=3, width=64, height=64)
    assert_close(got, expected)
    assert 'TI hashes: "cat-toy: ' in got[0].info["parameters"]
    with pytest.raises(UserError, match="for a model with one text encoder; this model is SDXL"):
        ours.txt2img("a sd1-toy", steps=1, width=64, height=64)


def test_turbo_defaults_from_the_name_match_diffusers_sdxl_turbo_settings(tiny_sdxl, tmp_path):
    """A file or folder named as SDXL-Turbo samples as Stability's card says, unless told otherwise: one step of
    Euler a on trailing timesteps, guidance off, at 512 (diffusers: EulerAncestral trailing, guidance_scale 0)."""
    import shutil

    from test_txt2img_parity import TRAILING

    path, pipe = tiny_sdxl
    turbo = tmp_path / "sdxl-turbo"
    shutil.copytree(path, turbo)
    model = StableDiffusion.load(turbo, device="cpu", dtype="fp32")
    assert model.native_size == 512 and model.sampling["steps"] == 1
    expected = reference(pipe, "EulerAncestralDiscreteScheduler", TRAILING, steps=1, guidance_scale=0.0, height=64,
                         width=64)
    got = model.txt2img("a photo of a cat", seed=3, width=64, height=64)
    assert_close(got, expected)
    info = got[0].info["parameters"]
    # one trailing step is the webui's Simple schedule at one step (timestep 999), so it is written in its words
    assert "Steps: 1, Sampler: Euler a, Schedule type: Simple, CFG scale: 1," in info


def test_refiner_and_size_flags_on_the_command_line(tiny_sdxl, refiner_pair, tmp_path, capsys):
    from PIL import Image

    from stablediff import Refiner, cli

    path, _ = tiny_sdxl
    refiner, _ = refiner_pair
    refiner_dir = tmp_path / "refiner"
    from conftest import make_sdxl_pipeline

    make_sdxl_pipeline(refiner=True).save_pretrained(refiner_dir)
    out = tmp_path / "out"
    args = ["txt2img", "a photo of a cat", "--model", str(path), "--outdir", str(out), "--W", "64", "--H", "64",
            "--steps", "6", "--sampler", "euler", "--seed", "3", "--skip_grid"]
    assert cli.main(args + ["--refiner", str(refiner_dir), "--refiner-switch", "0.5"]) == 0
    model = StableDiffusion.load(path, device="cpu", dtype="fp32")
    expected = model.txt2img("a photo of a cat", steps=6, sampler="euler", seed=3, width=64, height=64,
                             refiner=Refiner(StableDiffusion.load(refiner_dir, device="cpu", dtype="fp32"), 0.5))
    got = Image.open(out / "samples" / "00000.png")
    assert np.array_equal(np.asarray(got), np.asarray(expected[0]))
    assert "Refiner: refiner, Refiner switch at: 0.5" in got.info["parameters"]
    assert cli.main(args + ["--original-size", "128,96", "--crop", "8,0"]) == 0
    model.size_conditioning = {"original_size": (96, 128), "crop": (0, 8)}
    sized = model.txt2img("a photo of a cat", steps=6, sampler="euler", seed=3, width=64, height=64)
    got = Image.open(out / "samples" / "00001.png")
    assert np.array_equal(np.asarray(got), np.asarray(sized[0]))
    assert not np.array_equal(np.asarray(sized[0]), np.asarray(expected[0]))
    assert got.info["parameters"].endswith("Model: tiny-sdxl, Original size: 128x96, Crop left: 8, Crop top: 0")
    assert "Original size" not in expected[0].info["parameters"]  # the defaults are not written
    # --from-png sets the size flags again from those fields
    assert cli.main(["txt2img", "--from-png", str(out / "samples" / "00001.png"), "--model", str(path),
                     "--outdir", str(out), "--skip_grid"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "samples" / "00002.png")), np.asarray(sized[0]))
    for bad, message in [(["--refiner", str(refiner_dir), "--refiner-switch", "1.5"], "--refiner-switch must be"),
                         (["--refiner", str(tmp_path / "none")], "no such file or folder"),
                         (["--original-size", "big"], "--original-size big: give two whole numbers")]:
        assert cli.main(args + bad) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["base", "refiner", "inpainting"])
def test_single_files_in_stabilitys_layout_are_recognised_and_render_as_the_folder(kind, sdxl, refiner_pair,
                                                                                    sdxl_inpaint, tmp_path, capsys):
    """Folder -> Stability's single-file layout (conditioner.embedders.*) -> recognised from its tensors alone ->
    the same image as the folder; and back to a folder diffusers loads with the same weights. In fp16 too."""
    import json

    from safetensors.torch import load_file

    from stablediff import cli
    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import convert

    model, pipe = {"base": sdxl, "refiner": refiner_pair, "inpainting": sdxl_inpaint}[kind]
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    convert(read_spec(folder), tmp_path / "model.safetensors")
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(k.startswith("conditioner.embedders.0.") for k in keys)
    assert not any(k.startswith("cond_stage") for k in keys)
    single = StableDiffusion.load(tmp_path / "model.safetensors", device="cpu", dtype="fp32")
    assert (single.family, single.variant, single.native_size) == ("sdxl", kind, 1024)
    def run(m):
        if kind == "inpainting":
            return m.inpaint(init_image(), square_mask(), "a cat", mask_blur=0, steps=4, seed=1)
        return m.img2img(init_image(), "a cat", strength=0.6, steps=4, seed=1)
    assert np.array_equal(np.asarray(run(single)[0]), np.asarray(run(model)[0]))
    assert cli.main(["info", str(tmp_path / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "SDXL" in out and kind in out
    convert(read_spec(tmp_path / "model.safetensors"), tmp_path / "half.safetensors", dtype="fp16")
    half = StableDiffusion.load(tmp_path / "half.safetensors", device="cpu", dtype="fp32")
    assert np.abs(np.asarray(run(half)[0]).astype(int) - np.asarray(run(model)[0]).astype(int)).max() <= 3
    convert(read_spec(tmp_path / "model.safetensors"), tmp_path / "back")
    index = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert index["_class_name"] == type(pipe).__name__
    import diffusers

    again = getattr(diffusers, index["_class_name"]).from_pretrained(tmp_path / "back")
    for name in ("unet", "vae", "text_encoder_2"):
        mine, theirs = getattr(again, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs if not k.endswith("position_ids")), name


def test_hires_fix_and_outpainting_run_on_sdxl_with_the_size_conditioning_of_each_pass(sdxl, monkeypatch):
    """No diffusers pipeline defines these for SDXL: each pass is conditioned on its own size, and the border of an
    outpainted image is new while the original stays."""
    from stablediff import Hires
    from stablediff.pipelines import conditioning

    ours, _ = sdxl
    seen = []
    numbers = conditioning.size_numbers
    monkeypatch.setattr("stablediff.pipelines.common.size_numbers",
                        lambda m, w, h: seen.append((w, h)) or numbers(m, w, h))
    big = ours.txt2img("a cat", steps=4, seed=1, width=64, height=64, hires=Hires(scale=2.0, denoise=0.5))
    assert big[0].size == (128, 128) and seen == [(64, 64), (128, 128)]
    wide = ours.outpaint(init_image(), "a cat", extend=(0, 32, 0, 0), steps=4, seed=1)[0]
    assert wide.size == (96, 64)
    assert np.array_equal(np.asarray(wide)[:, :48], np.asarray(init_image())[:, :48])


def test_sharded_folders_load_and_a_shard_name_outside_the_folder_is_refused(sdxl, tmp_path):
    """Full-size fp32 SDXL UNets are saved in shards (diffusers' max_shard_size): NAME.index.json and its files."""
    import json

    from stablediff.errors import UserError

    ours, pipe = sdxl
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    index = tmp_path / "sharded" / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    model = StableDiffusion.load(tmp_path / "sharded", device="cpu", dtype="fp32")
    run = lambda m: np.asarray(m.txt2img("a cat", steps=2, seed=1, width=64, height=64)[0])
    assert np.array_equal(run(model), run(ours))
    data = json.loads(index.read_text())
    data["weight_map"] = {k: "../../../etc/passwd" for k in data["weight_map"]}
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match="reaches outside"):
        StableDiffusion.load(tmp_path / "sharded", device="cpu")
