"""The safety checker and the CLIP vision tower against diffusers' StableDiffusionSafetyChecker and transformers'
CLIPVisionModelWithProjection on random weights of the real shape (a smaller width and depth), their preprocessing
against CLIPImageProcessor, and the invisible watermark against the library's own embedding."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stablediff.checkpoints.keymaps import load_into
from stablediff.checkpoints.safety_checker import load as load_checker
from stablediff.errors import UserError
from stablediff.models.clip_vision import ClipVisionModel, vision_config
from stablediff.models.safety_checker import verdicts
from stablediff import safety

# ViT-L/14's layout and input size at a smaller width and depth (head size 64, as every CLIP ViT)
TINY_VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                   image_size=224, layer_norm_eps=1e-5)
PROJECTION = 32


def pictures(n: int, seed: int = 0) -> list[Image.Image]:
    """Varied pictures of varied sizes and aspects: noise, colour fields and shapes."""
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (256, 192), (517, 300), (224, 224), (300, 517), (640, 480), (97, 331), (512, 512)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i % 3 == 0 else \
            np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (h, w, 3)).copy()
        image = Image.fromarray(base)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 5))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            box = (x0, y0, x0 + int(rng.integers(5, w)), y0 + int(rng.integers(5, h)))
            draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out.append(image)
    return out


def reference_checker():
    """diffusers' checker with random tower weights, random concept embeddings and placeholder thresholds."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
                        vision_config=TINY_VISION, projection_dim=PROJECTION)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        for name, p in checker.named_parameters():
            if "norm" in name:
                p += 0.1 * torch.randn(p.shape)
        checker.concept_embeds.copy_(torch.randn(17, PROJECTION))
        checker.special_care_embeds.copy_(torch.randn(3, PROJECTION))
    return checker


def reference_cosines(checker, pixels):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        return cosine_distance(embeds, checker.special_care_embeds).numpy(), cosine_distance(embeds, checker.concept_embeds).numpy()


@pytest.fixture(scope="module")
def checker_dir(tmp_path_factory):
    """A diffusers-layout checker, its thresholds set at quantiles of its own similarities on the test pictures so
    that some pictures pass, some are flagged, and some hit a special-care concept."""
    from transformers import CLIPImageProcessor

    checker = reference_checker()
    processor = CLIPImageProcessor()
    special, concepts = reference_cosines(checker, processor(pictures(50), return_tensors="pt").pixel_values)
    with torch.no_grad():
        checker.special_care_embeds_weights.copy_(torch.from_numpy(np.quantile(special, 0.85, axis=0)))
        checker.concept_embeds_weights.copy_(torch.from_numpy(np.quantile(concepts, 0.96, axis=0)))
    folder = tmp_path_factory.mktemp("checker")
    checker.save_pretrained(folder / "safety_checker")
    processor.save_pretrained(folder / "feature_extractor")
    return folder


def test_preprocessing_equals_clip_image_processor():
    from transformers import CLIPImageProcessor

    from stablediff.models.safety_checker import Preprocess

    images = pictures(16, seed=1)
    raw = CLIPImageProcessor(do_normalize=False)(images, return_tensors="np").pixel_values
    ours = np.stack([np.asarray(Preprocess().resized(im)) for im in images]).transpose(0, 3, 1, 2) / 255
    assert np.abs(ours - raw).max() <= 1 / 255  # the bound; PIL's own resize makes it exact here
    assert np.abs(ours - raw).max() < 1e-6
    normalised = CLIPImageProcessor()(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(Preprocess()(images), normalised, atol=1e-6, rtol=0)


def test_vision_tower_equals_clip_vision_model_with_projection():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    config = CLIPVisionConfig(**TINY_VISION, projection_dim=PROJECTION)
    theirs = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p += 0.1 * torch.randn(p.shape)
    ours = ClipVisionModel(vision_config(config.to_dict(), PROJECTION))
    load_into(ours, theirs.state_dict(), None, "vision tower", torch.float32)
    pixels = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), theirs(pixel_values=pixels).image_embeds, atol=1e-4, rtol=0)


def test_scores_and_flags_equal_diffusers(checker_dir):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    images = pictures(50)
    theirs = StableDiffusionSafetyChecker.from_pretrained(checker_dir / "safety_checker").eval()
    pixels = CLIPImageProcessor.from_pretrained(checker_dir / "feature_extractor")(images, return_tensors="pt").pixel_values
    _, flags = theirs(clip_input=pixels, images=[np.asarray(im) for im in images])
    special_cos, concept_cos = reference_cosines(theirs, pixels)

    checker, prep = load_checker(checker_dir)
    with torch.no_grad():
        special, concepts = checker(prep(images))
    np.testing.assert_allclose(special.numpy(), special_cos, atol=1e-4, rtol=0)
    np.testing.assert_allclose(concepts.numpy(), concept_cos, atol=1e-4, rtol=0)
    ours = verdicts(special.numpy(), concepts.numpy(), *checker.thresholds())
    assert [v.flagged for v in ours] == flags
    theirs_scores = verdicts(special_cos, concept_cos, *checker.thresholds())  # diffusers' rule on its own similarities
    for a, b in zip(ours, theirs_scores):
        np.testing.assert_allclose(a.special + a.concepts, b.special + b.concepts, atol=1e-4, rtol=0)
    # the test means something: both outcomes, and special care deciding some
    assert 5 <= sum(flags) <= 45
    special_hit = [any(s > 0 for s in v.special) for v in ours]
    assert any(special_hit)
    thresholds = checker.thresholds()[1]
    decided_by_care = [hit and not (concept_cos[i] - thresholds > 0.0005).any() and flags[i]
                       for i, hit in enumerate(special_hit)]
    assert any(decided_by_care), "no picture is flagged only through the special-care adjustment"


def test_scores_rule_equals_diffusers_forward_at_the_boundaries():
    """diffusers' own per-image loop (its forward) and our rule, on similarities placed at and around the rounding
    boundaries and the special-care adjustment: the concepts and special-care embeddings are unit vectors, so an
    image embedding's components are its similarities (and one more component makes its norm 1)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance

    rng = np.random.default_rng(3)
    special_thr, concept_thr = rng.uniform(0.05, 0.2, 3).astype(np.float32), rng.uniform(0.05, 0.2, 17).astype(np.float32)
    offsets = np.array([-0.0105, -0.01, -0.0095, -0.0006, -0.0005, -0.0004, 0, 0.0004, 0.0005, 0.0006, 0.02])
    sims = np.concatenate([concept_thr + rng.choice(offsets, (300, 17)), special_thr + rng.choice(offsets, (300, 3))], 1)
    embeds = torch.from_numpy(np.concatenate([sims, (1 - (sims ** 2).sum(1, keepdims=True)) ** 0.5], 1).astype(np.float32))

    class Tower(torch.nn.Module):  # stands in for the CLIP tower: the embeddings are given
        def forward(self, x):
            return None, x

    reference = StableDiffusionSafetyChecker.__new__(StableDiffusionSafetyChecker)
    torch.nn.Module.__init__(reference)
    reference.vision_model, reference.visual_projection = Tower(), torch.nn.Identity()
    unit = torch.eye(21)
    for name, value in (("concept_embeds", unit[:17]), ("special_care_embeds", unit[17:20]),
                        ("concept_embeds_weights", torch.from_numpy(concept_thr)),
                        ("special_care_embeds_weights", torch.from_numpy(special_thr))):
        setattr(reference, name, torch.nn.Parameter(value, requires_grad=False))
    _, flags = reference(clip_input=embeds, images=[np.zeros(1)] * len(embeds))
    special = cosine_distance(embeds, reference.special_care_embeds).numpy()
    concepts = cosine_distance(embeds, reference.concept_embeds).numpy()
    assert [v.flagged for v in verdicts(special, concepts, special_thr, concept_thr)] == flags
    assert 0 < sum(flags) < len(flags)


def test_checker_loads_as_a_file_with_no_config(checker_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(checker_dir / "safety_checker" / "model.safetensors")  # transformers 5's layout
    # the published files' (transformers 4's): CLIPVisionModel's own .vision_model level inside the checker's
    save_file({k.replace("vision_model.", "vision_model.vision_model.", 1): v for k, v in sd.items()},
              tmp_path / "checker.safetensors")
    a, prep_a = load_checker(checker_dir)
    b, prep_b = load_checker(tmp_path / "checker.safetensors")
    assert a.clip.config == b.clip.config and prep_a == prep_b
    pixels = prep_a(pictures(3))
    with torch.no_grad():
        for x, y in zip(a(pixels), b(pixels)):
            assert torch.equal(x, y)


def test_checker_errors_are_one_line(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="not found"):
        load_checker(tmp_path / "nothing")
    with pytest.raises(UserError, match="has no safety_checker/"):
        load_checker(tiny_model_dir)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a Stable Diffusion safety checker"):
        load_checker(tmp_path / "other.safetensors")


def test_watermark_equals_the_library_and_reads_back():
    from imwatermark import WatermarkDecoder, WatermarkEncoder

    image = pictures(8, seed=2)[7].convert("RGB")  # 512x512
    ours = safety.stamp(image, safety.WATERMARK)
    encoder = WatermarkEncoder()  # CompVis' put_watermark, as its script writes it
    encoder.set_watermark("bytes", safety.WATERMARK.encode("utf-8"))
    import cv2
    theirs = Image.fromarray(encoder.encode(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), "dwtDct")[:, :, ::-1])
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.array_equal(np.asarray(ours), np.asarray(image))
    decoded = WatermarkDecoder("bytes", 8 * len(safety.WATERMARK)).decode(
        cv2.cvtColor(np.array(ours), cv2.COLOR_RGB2BGR), "dwtDct")
    assert decoded == safety.WATERMARK.encode()
    assert safety.read_watermark(ours, len(safety.WATERMARK)) == safety.WATERMARK.encode()
    with pytest.raises(UserError, match="at least 65,536 pixels"):
        safety.stamp(image.resize((128, 128)), "x")


# --- the checker and the watermark at work: the command line, the Python API and the server ------------------

PROMPT = "a red circle on a blue background"


def fixed_checker(folder, threshold: float):
    """A checker folder whose every concept threshold is `threshold`: -2 flags every image, 2 none."""
    checker = reference_checker()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(folder / "safety_checker")
    return folder


@pytest.fixture(scope="module")
def flag_all(tmp_path_factory):
    return fixed_checker(tmp_path_factory.mktemp("flag-all"), -2.0)


@pytest.fixture(scope="module")
def pass_all(tmp_path_factory):
    return fixed_checker(tmp_path_factory.mktemp("pass-all"), 2.0)


def render(tmp_path, *args) -> tuple[list[Image.Image], Image.Image, str]:
    """The command's samples, its grid and its stderr."""
    import subprocess
    import sys

    out = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    done = subprocess.run([sys.executable, "-m", "stablediff.cli", *args, "--outdir", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    samples = [Image.open(p) for p in sorted((out / "samples").glob("*.png"))]
    return samples, Image.open(next(out.glob("grid-*.png"))), done.stderr


def test_command_line_writes_a_flagged_image_black_and_says_so(tmp_path, flag_all, pass_all):
    base = ["txt2img", PROMPT, "--steps", "3", "--n_samples", "2", "--seed", "4"]
    plain, _, _ = render(tmp_path, *base)
    flagged, grid, err = render(tmp_path, *base, f"--safety-checker={flag_all}")
    assert len(flagged) == 2 and err.count("flagged by the safety checker; written black") == 2
    for image, original in zip(flagged, plain):
        assert image.size == original.size and not np.asarray(image.convert("RGB")).any()  # black, never as rendered
        assert image.info["parameters"] == original.info["parameters"] + ", Safety checker: flagged"
    assert not np.asarray(grid.convert("RGB"))[2:-2, 2:-2].any()  # the grid holds the black images too
    passed, _, err = render(tmp_path, *base, f"--safety-checker={pass_all / 'safety_checker'}")  # the folder itself
    assert "flagged" not in err
    for image, original in zip(passed, plain):
        assert np.array_equal(np.asarray(image), np.asarray(original))
        assert image.info["parameters"] == original.info["parameters"] + ", Safety checker: passed"


def test_python_api_returns_flagged_images_black_with_nsfw_set(flag_all):
    from stablediff import StableDiffusion

    model = StableDiffusion.load(safety_checker=flag_all)
    for images in (model.txt2img(PROMPT, steps=2, seed=1, batch_size=2),
                   model.inpaint(pictures(1)[0], Image.new("L", (64, 64), 255), PROMPT, steps=2, seed=1, only_masked=True)):
        for image in images:
            assert image.info["nsfw"] is True and not np.asarray(image).any()
            assert image.info["parameters"].endswith("Safety checker: flagged")


def test_command_line_watermark_is_the_library_embedding_and_is_read_back(tmp_path):
    import subprocess
    import sys

    base = ["txt2img", PROMPT, "--steps", "2", "--seed", "9", "--W", "256", "--H", "256"]
    (plain,), _, _ = render(tmp_path, *base)
    (marked,), grid, err = render(tmp_path, *base, "--watermark")
    assert np.array_equal(np.asarray(marked), np.asarray(safety.stamp(plain, safety.WATERMARK)))
    assert marked.info["parameters"] == plain.info["parameters"]  # the infotext written after the mark, kept
    readable = safety.read_watermark(marked, len(safety.WATERMARK)) == safety.WATERMARK.encode()
    assert ("does not read back" in err) is not readable  # the demo's flat colours defeat dwtDct: said, not hidden
    good = safety.stamp(pictures(8, seed=2)[7], "made here")  # a picture dwtDct survives
    good.save(tmp_path / "good.png")
    read = subprocess.run([sys.executable, "-m", "stablediff.cli", "watermark", str(tmp_path / "good.png"), "--text",
                           "made here"], capture_output=True, text=True)
    assert read.returncode == 0 and "watermark 'made here'" in read.stdout
    pictures(8, seed=2)[7].save(tmp_path / "unmarked.png")
    read = subprocess.run([sys.executable, "-m", "stablediff.cli", "watermark", str(tmp_path / "unmarked.png")],
                          capture_output=True, text=True)
    assert read.returncode == 1 and "no 'StableDiffusionV1' watermark" in read.stdout
    small = subprocess.run([sys.executable, "-m", "stablediff.cli", "txt2img", PROMPT, "--watermark", "--steps", "1",
                            "--outdir", str(tmp_path / "small")], capture_output=True, text=True)
    assert small.returncode == 2 and small.stderr.count("\n") == 1 and "at least 65,536 pixels" in small.stderr
    assert not list((tmp_path / "small" / "samples").glob("*.png"))


def test_server_screens_every_job_and_answers_which_images_were_flagged(tmp_path, flag_all):
    import io

    import httpx
    import webuiapi

    from serving import Server
    from test_server import wait_state

    with Server(tmp_path / "out", f"--safety-checker={flag_all}") as server, httpx.Client(base_url=server.url) as client:
        job = client.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2, "seed": 3,
                                            "batch_size": 2}).json()
        job = wait_state(client, f"/v1/jobs/{job['id']}")
        assert job["state"] == "done" and len(job["images"]) == 2
        for im in job["images"]:
            assert im["nsfw_content_detected"] is True and "flagged by the safety checker" in im["warning"]
            png = Image.open(io.BytesIO(client.get(im["url"]).content))
            assert not np.asarray(png.convert("RGB")).any() and png.info["parameters"].endswith("Safety checker: flagged")
        result = webuiapi.WebUIApi(port=server.port).txt2img(prompt=PROMPT, steps=2, seed=3, width=64, height=64)
        assert result.info["nsfw_content_detected"] == [True] and not np.asarray(result.image.convert("RGB")).any()


def test_server_watermarks_every_image_and_refuses_sizes_it_cannot_mark(tmp_path, pass_all):
    import io

    import httpx

    from serving import Server
    from test_server import wait_state

    (plain,), _, _ = render(tmp_path, "txt2img", PROMPT, "--steps", "2", "--seed", "6", "--W", "256", "--H", "256")
    with Server(tmp_path / "out", f"--safety-checker={pass_all}", "--watermark") as server, \
            httpx.Client(base_url=server.url) as client:
        small = client.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "width": 64, "height": 64})
        assert small.status_code == 400 and small.json()["field"] == "width" and "65,536" in small.json()["error"]
        job = client.post("/v1/jobs", json={"task": "txt2img", "prompt": PROMPT, "steps": 2, "seed": 6, "width": 256,
                                            "height": 256}).json()
        (im,) = wait_state(client, f"/v1/jobs/{job['id']}")["images"]
        assert im["nsfw_content_detected"] is False and isinstance(im["watermark"], bool) and "warning" not in im
        png = Image.open(io.BytesIO(client.get(im["url"]).content))
        assert np.array_equal(np.asarray(png), np.asarray(safety.stamp(plain, safety.WATERMARK)))
        assert png.info["parameters"].endswith("Safety checker: passed")  # (with the model hash once the server has it)
