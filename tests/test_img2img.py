"""img2img and inpainting: equal to diffusers' pipelines where they define the result, and the guarantees
users rely on (original pixels kept outside the mask, clear errors) where they do not."""
import numpy as np
import pytest
import torch
from PIL import Image

from stablediff import StableDiffusion, cli
from stablediff.errors import UserError

from test_txt2img_parity import LEADING, assert_close

STEPS = 20


def init_image(size=64, seed=0) -> Image.Image:
    """Smooth colour gradients plus a little noise: something the VAE encodes to a structured latent."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x + y) / 2], -1) + np.random.RandomState(seed).rand(size, size, 3) * 0.2
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


def square_mask(size=64, box=(16, 16, 48, 48)) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, box)
    return mask


def run_reference(pipe, scheduler, config, **kw):
    import diffusers

    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.base_scheduler_config, **config)
    kw.setdefault("guidance_scale", 7.5)
    out = pipe("a photo of a cat", num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(3),
               **kw).images
    return (out * 255).round().astype(np.uint8)


SAMPLERS = [("ddim", "default", "DDIMScheduler", {}), ("euler_a", "default", "EulerAncestralDiscreteScheduler", LEADING)]


@pytest.fixture(scope="module")
def img2img_pipe(tiny_model_dir):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=[s[0] for s in SAMPLERS])
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers(ours, img2img_pipe, sampler, schedule, scheduler, config, strength):
    expected = run_reference(img2img_pipe, scheduler, config, image=init_image(), strength=strength)
    got = ours.img2img(init_image(), "a photo of a cat", strength=strength, steps=STEPS, sampler=sampler,
                       schedule=schedule, seed=3)
    assert_close(got, expected)
    assert "Denoising strength: " + f"{strength:g}" in got[0].info["parameters"]


@pytest.fixture(scope="module")
def inpaint_pair(tiny_inpaint_dir):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_inpaint_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return StableDiffusion.load(tiny_inpaint_dir, device="cpu", dtype="fp32"), pipe


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=[s[0] for s in SAMPLERS])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_nine_channel_inpainting_matches_diffusers_inside_the_mask(inpaint_pair, sampler, schedule, scheduler, config,
                                                                    strength):
    ours, pipe = inpaint_pair
    expected = run_reference(pipe, scheduler, config, image=init_image(), mask_image=square_mask(), strength=strength,
                             height=64, width=64)
    got = ours.inpaint(init_image(), square_mask(), "a photo of a cat", strength=strength, mask_blur=0, steps=STEPS,
                       sampler=sampler, schedule=schedule, seed=3)
    inside = (slice(None), slice(16, 48), slice(16, 48))
    assert_close([Image.fromarray(np.stack([np.asarray(g) for g in got])[inside][0])], expected[inside])
    outside = np.asarray(got[0]).astype(int) - np.asarray(init_image()).astype(int)
    assert not outside[:16].any() and not outside[48:].any()  # paste-back: the original, exactly


@pytest.mark.parametrize("fill", ["original", "fill", "latent-noise", "latent-nothing"])
def test_ordinary_model_keeps_everything_outside_the_blurred_mask(ours, fill):
    image, mask = init_image(), square_mask(box=(24, 24, 40, 40))
    got = np.asarray(ours.inpaint(image, mask, "a photo of a cat", fill=fill, mask_blur=4, steps=8, seed=5)[0]).astype(int)
    blurred = np.asarray(mask.filter(__import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(4)))
    original = np.asarray(image).astype(int)
    assert np.abs(got - original)[blurred == 0].max() <= 1
    assert np.abs(got - original)[28:36, 28:36].mean() > 10  # and the inside was repainted


def test_invert_mask_repaints_the_other_side(ours):
    image = init_image()
    got = np.asarray(ours.inpaint(image, square_mask(), "a cat", invert_mask=True, mask_blur=0, steps=4, seed=1)[0])
    assert np.array_equal(got[16:48, 16:48], np.asarray(image)[16:48, 16:48])


def test_strength_zero_returns_the_encoded_image_and_bad_input_is_one_line(ours, tmp_path):
    with pytest.raises(UserError, match="strength 1.5 is outside 0..1"):
        ours.img2img(init_image(), "x", strength=1.5)
    with pytest.raises(UserError, match="the mask is empty"):
        ours.inpaint(init_image(), Image.new("L", (64, 64), 0), "x")
    with pytest.raises(UserError, match="no such image file"):
        ours.img2img(tmp_path / "missing.png", "x")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(UserError, match="not an image Pillow can read"):
        ours.img2img(tmp_path / "bad.png", "x")
    assert ours.img2img(init_image(), "x", strength=0.0, seed=1)[0].size == (64, 64)


def test_nine_channel_model_refuses_txt2img_and_img2img(inpaint_pair):
    ours, _ = inpaint_pair
    with pytest.raises(UserError, match="9 input channels"):
        ours.txt2img("x", width=64, height=64)
    with pytest.raises(UserError, match="img2img needs a model whose UNet takes 4 input channels"):
        ours.img2img(init_image(), "x")


@pytest.mark.parametrize("mode,size", [("just-resize", (64, 48)), ("crop-and-resize", (64, 48)),
                                       ("resize-and-fill", (64, 48))])
def test_resize_modes_give_the_requested_size(mode, size):
    from stablediff.pipelines.common import fit

    out = fit(init_image(96), *size, mode)
    assert out.size == size
    if mode == "resize-and-fill":  # a square into a wide frame: borders copy the edge columns
        a = np.asarray(out)
        assert np.array_equal(a[:, 0], a[:, 7])


def test_img2img_and_inpaint_commands(ours, tiny_model_dir, tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init_image().save(init)
    square_mask().save(mask)
    out = tmp_path / "out"
    assert cli.main(["img2img", "a photo of a cat", "--init-img", str(init), "--model", str(tiny_model_dir), "--outdir",
                     str(out), "--strength", "0.5", "--ddim_steps", "20", "--sampler", "ddim", "--seed", "3",
                     "--skip_grid"]) == 0
    expected = ours.img2img(init_image(), "a photo of a cat", strength=0.5, steps=20, sampler="ddim", seed=3)[0]
    got = Image.open(out / "samples" / "00000.png")
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert "Denoising strength: 0.5" in got.info["parameters"]
    assert cli.main(["inpaint", "a cat", "--init-img", str(init), "--mask", str(mask), "--model", str(tiny_model_dir),
                     "--outdir", str(out), "--fill", "latent-nothing", "--mask-blur", "0", "--steps", "4", "--seed", "1",
                     "--skip_grid"]) == 0
    repainted = np.asarray(Image.open(out / "samples" / "00001.png")).astype(int)
    assert np.array_equal(repainted[:16], np.asarray(init_image())[:16])
    assert "Masked content: latent-nothing" in Image.open(out / "samples" / "00001.png").info["parameters"]
    assert cli.main(["img2img", "x", "--init-img", str(init), "--model", str(tiny_model_dir), "--strength", "2",
                     "--outdir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "stablediff: error: --strength must be from 0 to 1 (got 2)"


def depth_map(size=64) -> Image.Image:
    """A 16-bit depth map: a tilted plane with a bump, as MiDaS-style maps look."""
    y, x = np.mgrid[0:size, 0:size] / size
    d = 0.5 * x + 0.3 * y + 0.4 * np.exp(-((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.02)
    return Image.fromarray((d / d.max() * 65535).astype(np.uint16))


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_depth2img_matches_diffusers_given_the_same_depth_map(tiny_depth, sampler, schedule, scheduler, config):
    from stablediff.pipelines.depth import depth_from_image

    path, pipe = tiny_depth
    depth = depth_from_image(depth_map())
    expected = run_reference(pipe, scheduler, config, image=init_image(), depth_map=depth[None], strength=0.8)
    model = StableDiffusion.load(path, device="cpu", dtype="fp32")
    assert model.variant == "depth"
    got = model.depth2img(init_image(), "a photo of a cat", depth_map=depth_map(), strength=0.8, steps=STEPS,
                          sampler=sampler, schedule=schedule, seed=3)
    assert_close(got, expected)


def test_depth2img_needs_a_depth_source_and_a_depth_model(ours, tiny_depth):
    model = StableDiffusion.load(tiny_depth[0], device="cpu", dtype="fp32")
    with pytest.raises(UserError, match="needs a depth map"):
        model.depth2img(init_image(), "x")
    with pytest.raises(UserError, match="depth2img needs a model whose UNet takes 5 input channels; this one takes 4"):
        ours.depth2img(init_image(), "x", depth_map=depth_map())
    with pytest.raises(UserError, match="the depth map is flat"):
        model.depth2img(init_image(), "x", depth_map=Image.new("L", (64, 64), 7))


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                    fusion_hidden_size=16, is_hybrid=False)
    model = DPTForDepthEstimation(cfg)
    for p in model.parameters():  # random init predicts a flat map; jitter it so depth varies
        p.data += 0.2 * torch.randn_like(p)
    path = tmp_path_factory.mktemp("dpt") / "tiny-dpt"
    model.save_pretrained(path)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path, model


def test_estimated_depth_matches_diffusers_depth_preparation(tiny_depth, tiny_dpt):
    from transformers import DPTImageProcessor

    from stablediff.pipelines.depth import depth_condition, estimate_depth

    path, pipe = tiny_depth
    pipe.depth_estimator, pipe.feature_extractor = tiny_dpt[1], DPTImageProcessor.from_pretrained(tiny_dpt[0])
    try:
        expected = pipe.prepare_depth_map(init_image(), None, 1, False, torch.float32, torch.device("cpu"))
    finally:
        pipe.depth_estimator = pipe.feature_extractor = None
    got = depth_condition(estimate_depth([init_image()], tiny_dpt[0]), (8, 8), "cpu")
    assert expected.std() > 0.1 and (got - expected).abs().max() < 1e-4


def test_depth_estimation_without_transformers_says_what_to_install(monkeypatch):
    import sys

    from stablediff.pipelines.depth import estimate_depth

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"pip install 'stablediff\[depth\]'"):
        estimate_depth([init_image()], "anywhere")


def test_outpaint_keeps_the_original_exactly_and_fills_from_its_edges(ours, tmp_path):
    from stablediff.pipelines.img2img import outpaint_canvas

    canvas, mask = outpaint_canvas(init_image(), 16, 8, 0, 24)
    border = np.asarray(canvas).astype(int)
    assert abs(border[10, 2].mean() - border[10, 17].mean()) < 40  # edge colours, not grey or black
    out = ours.outpaint(init_image(), "a cat", extend=(16, 8, 0, 24), steps=6, seed=1)[0]
    assert out.size == (88, 88)
    assert np.array_equal(np.asarray(out)[0:64, 16:80], np.asarray(init_image()))
    with pytest.raises(UserError, match="multiples of 8"):
        ours.outpaint(init_image(), "x", extend=(5, 0, 0, 0))
    path = tmp_path / "init.png"
    init_image().save(path)
    assert cli.main(["outpaint", "x", "--init-img", str(path), "--extend", "0,16,8,0", "--model", str(tmp_path / "m"),
                     "--outdir", str(tmp_path)]) == 2  # no such model: a one-line error, after the flags parsed


def test_only_masked_touches_nothing_outside_its_box(ours, tiny_model_dir, tmp_path):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 40, 52, 52))
    original = np.asarray(init_image()).astype(int)
    got = np.asarray(ours.inpaint(init_image(), mask, "a cat", only_masked=True, padding=4, steps=6, seed=1)[0]).astype(int)
    outside_box = np.ones((64, 64), bool)
    outside_box[36:56, 36:56] = False
    assert not (got - original)[outside_box].any()
    assert np.abs(got - original)[42:50, 42:50].mean() > 10
    init, mask_path = tmp_path / "init.png", tmp_path / "mask.png"
    init_image().save(init)
    mask.save(mask_path)
    assert cli.main(["inpaint", "a cat", "--init-img", str(init), "--mask", str(mask_path), "--only-masked", "--padding",
                     "4", "--model", str(tiny_model_dir), "--outdir", str(tmp_path / "out"), "--steps", "6", "--seed", "1",
                     "--skip_grid"]) == 0
    cli_image = np.asarray(Image.open(tmp_path / "out" / "samples" / "00000.png")).astype(int)
    assert np.array_equal(cli_image, got)


@pytest.mark.parametrize("sampler,schedule,scheduler,config", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_upscale_matches_diffusers(tiny_upscaler, sampler, schedule, scheduler, config):
    path, pipe = tiny_upscaler
    low = init_image(16)
    expected = run_reference(pipe, scheduler, config, image=low, noise_level=40, guidance_scale=9.0)
    model = StableDiffusion.load(path, device="cpu", dtype="fp32")
    assert (model.variant, model.vae_scale, model.schedule.prediction) == ("upscaler", 4, "v")
    got = model.upscale(low, "a photo of a cat", noise_level=40, steps=STEPS, sampler=sampler, schedule=schedule,
                        scale=9.0, seed=3)
    assert got[0].size == (64, 64)
    assert_close(got, expected)


def test_upscale_command_and_refusals(tiny_upscaler, ours, tmp_path):
    path, _ = tiny_upscaler
    init_image(16).save(tmp_path / "low.png")
    assert cli.main(["upscale", "a cat", "--init-img", str(tmp_path / "low.png"), "--model", str(path), "--outdir",
                     str(tmp_path / "out"), "--steps", "4", "--seed", "1", "--skip_grid", "--noise-level", "30"]) == 0
    image = Image.open(tmp_path / "out" / "samples" / "00000.png")
    assert image.size == (64, 64) and "Noise level: 30" in image.info["parameters"]
    assert "CFG scale: 9," in image.info["parameters"]
    with pytest.raises(UserError, match="upscale needs the SD x4 upscaler"):
        ours.upscale(init_image(16), "x")
    with pytest.raises(UserError, match="noise level 400 is outside 0..350"):
        StableDiffusion.load(path, device="cpu").upscale(init_image(16), "x", noise_level=400)


def test_tiled_upscale_covers_the_image_and_blends_the_seams(tiny_upscaler):
    from stablediff.pipelines.upscale import _ramp, _tiles

    assert _tiles(40, 24, 16, 4) == [(x, y, 16, 16) for y in (0, 8) for x in (0, 12, 24)]
    ramp = _ramp(16, 16, 4, True, False, False, False)
    assert ramp[0, 0, 0] < 0.2 and ramp[0, -1, 0] == 1.0
    model = StableDiffusion.load(tiny_upscaler[0], device="cpu", dtype="fp32")
    low = init_image(40).crop((0, 0, 40, 24))
    kw = dict(noise_level=20, steps=4, sampler="ddim", schedule="default", seed=1)
    tiled = model.upscale(low, "a cat", tile=16, overlap=4, **kw)[0]
    assert tiled.size == (160, 96) and "Size: 160x96" in tiled.info["parameters"]
    # where only the first tile contributes, the result is that tile's own upscale
    alone = np.asarray(model.upscale(low.crop((0, 0, 16, 16)), "a cat", **kw)[0]).astype(int)
    assert np.abs(np.asarray(tiled).astype(int)[:32, :32] - alone[:32, :32]).max() <= 1
    # across a seam the picture changes no more sharply than it does elsewhere
    a = np.asarray(tiled).astype(float)
    column_steps = np.abs(np.diff(a, axis=1)).mean(axis=(0, 2))
    assert column_steps[44:52].max() < 4 * np.median(column_steps)
