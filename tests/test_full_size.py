"""The same parity on a full-size SD 1.5-shaped random model (860M-parameter UNet), at 64x64 pixels (and one
image at 256x256), from the diffusers folder and from single files in the original layout recognised with no config.

Opt-in: `python -m pytest --runslow tests/test_full_size.py` (about 10 GB of memory, a few minutes on 2 cores).
"""
import numpy as np
import pytest
import torch

from test_txt2img_parity import KARRAS, LEADING, assert_close, reference_image

pytestmark = pytest.mark.slow


def sd15_shaped_pipeline():
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from conftest import TABLES

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, max_position_embeddings=77, hidden_act="quick_gelu",
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    tok = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), model_max_length=77)
    sched = PNDMScheduler.from_config(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "sd15-shaped"
    sd15_shaped_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(folder):
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return StableDiffusion.load(folder, device="cpu", dtype="fp32"), pipe


@torch.no_grad()
def test_components_within_1e_4(pair):
    ours, ref = pair
    ids = ours.tokenizer(["a photograph of an astronaut riding a horse"])
    assert (ours.text_encoder(ids) - ref.text_encoder(ids)[0]).abs().max() < 1e-4
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([981.0, 20.5])
    assert (ours.unet(x, t, ctx) - ref.unet(x, t, ctx).sample).abs().max() < 1e-4
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert (ours.vae.decode(z) - ref.vae.decode(z).sample).abs().max() < 1e-4


@pytest.mark.parametrize("sampler,schedule,scheduler,config", [
    ("ddim", "default", "DDIMScheduler", {}), ("euler_a", "default", "EulerAncestralDiscreteScheduler", LEADING),
    ("dpmpp_2m", "karras", "DPMSolverMultistepScheduler", KARRAS)])
def test_image_matches_diffusers(pair, sampler, schedule, scheduler, config):
    ours, ref = pair
    expected = reference_image(ref, scheduler, config, {}, prompt="a photograph of an astronaut riding a horse")
    got = ours.txt2img("a photograph of an astronaut riding a horse", steps=20, sampler=sampler, schedule=schedule,
                       seed=3, width=64, height=64)
    assert_close(got, expected)
    assert np.asarray(got[0]).std() > 10


def test_image_at_256_with_winograd_convolutions_matches_diffusers(pair, monkeypatch):
    """At 256x256 the UNet's first level (32x32 latents, 320 channels) and the VAE decoder's 512-channel layers at
    64x64 go by Winograd F(4x4, 3x3) (stablediff.nn.winograd), at their real thresholds; on CPUs where it would
    not be chosen (AVX512) as well."""
    from stablediff.nn import winograd

    monkeypatch.setattr(winograd, "SLOWER_ON", ())
    ours, ref = pair
    with torch.no_grad():
        assert winograd.applies(ours.unet.input_blocks[1][0].in_layers[2], torch.empty(2, 320, 32, 32))
        assert winograd.applies(ours.vae.decoder.up[2].block[0].conv1, torch.empty(1, 512, 64, 64))
    expected = reference_image(ref, "DPMSolverMultistepScheduler", KARRAS, {}, prompt="a red house",
                               size=(256, 256))
    assert_close(ours.txt2img("a red house", steps=20, sampler="dpmpp_2m", schedule="karras", seed=3, width=256,
                              height=256), expected)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_recognised_without_config(pair, folder, tmp_path, suffix):
    from stablediff import StableDiffusion
    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import convert

    _, ref = pair
    convert(read_spec(folder), tmp_path / f"sd15{suffix}")
    model = StableDiffusion.load(tmp_path / f"sd15{suffix}", device="cpu", dtype="fp32")
    assert (model.family, model.variant, model.schedule.prediction, model.native_size) == ("sd1", "base", "epsilon", 512)
    expected = reference_image(ref, "DPMSolverMultistepScheduler", KARRAS, {}, prompt="a red house")
    assert_close(model.txt2img("a red house", steps=20, sampler="dpmpp_2m", schedule="karras", seed=3, width=64,
                               height=64), expected)


def sdxl_shaped_pipeline():
    """SDXL 1.0's shapes with random weights: the 2.6B-parameter UNet, CLIP ViT-L and OpenCLIP bigG text encoders."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from conftest import TABLES

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024, scaling_factor=0.13025)
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text = CLIPTextModel(CLIPTextConfig(**common, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, hidden_act="quick_gelu", pad_token_id=49407))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=1280, num_hidden_layers=32,
                                                        num_attention_heads=20, intermediate_size=5120,
                                                        hidden_act="gelu", pad_token_id=1, projection_dim=1280))
    tok = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), model_max_length=77)
    tok_2 = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), pad_token="!", model_max_length=77)
    sched = EulerDiscreteScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        clip_sample=False, set_alpha_to_one=False))
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=sched)


def test_sdxl_single_file_recognised_without_config_renders_as_diffusers_at_256(tmp_path):
    """A full-size SDXL-shaped file in Stability's layout: recognised from its tensors, and at 256x256 the image of
    diffusers' pipeline on the same weights (one model in memory at a time: about 16 GB)."""
    import gc

    from diffusers import StableDiffusionXLPipeline

    from stablediff import StableDiffusion
    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import convert
    from test_sdxl import reference

    sdxl_shaped_pipeline().save_pretrained(tmp_path / "folder")
    gc.collect()
    convert(read_spec(tmp_path / "folder"), tmp_path / "sdxl.safetensors")
    model = StableDiffusion.load(tmp_path / "sdxl.safetensors", device="cpu", dtype="fp32")
    assert (model.family, model.variant, model.native_size) == ("sdxl", "base", 1024)
    assert model.unet.config.depth(2) == 10 and model.text_encoder_2.config.layers == 32
    got = model.txt2img("a red house", steps=8, sampler="euler_a", schedule="default", seed=3, width=256, height=256)
    del model
    gc.collect()
    # diffusers stamps its invisible watermark into SDXL images of 256 pixels and wider; ours is opt-in (--watermark)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder", add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = reference(pipe, "EulerAncestralDiscreteScheduler", LEADING, prompt="a red house", steps=8,
                         height=256, width=256)
    assert_close(got, expected)
