"""Shared fixtures: tiny random-weight models of the real architecture, built and saved by the reference
libraries (diffusers, transformers), so our loader reads the same files users have."""
import os
from pathlib import Path

import pytest
import torch

TABLES = Path(__file__).resolve().parents[1] / "stablediff" / "data" / "clip-tokenizer"


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run full-size slow tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Model hashes and the like are cached in a folder of the test run's own, never the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def _jitter_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm layers start at weight 1, bias 0; perturb them so a swapped norm mapping cannot go unnoticed."""
    for name, p in module.named_parameters():
        if "norm" in name:
            p.data += 0.1 * torch.randn(p.shape, generator=gen)


def make_reference_pipeline(v_prediction: bool = False, sd2: bool = False, in_channels: int = 4):
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=128,
        attention_head_dim=(2, 4, 4) if sd2 else 8, use_linear_projection=sd2, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=64)
    # 64-wide heads like every real SD text tower: single files do not record the head count
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                                        intermediate_size=37, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407,
                                        hidden_act="gelu" if sd2 else "quick_gelu"))
    for m in (unet, vae, text):
        _jitter_norms(m, gen)
    tok = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), pad_token="!" if sd2 else "<|endoftext|>",
                        model_max_length=77)
    # the scheduler config shipped with SD 1.5 / 2.x (clip_sample false matters: DDIM's class default clips x0)
    sched = PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
        set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
        prediction_type="v_prediction" if v_prediction else "epsilon"))
    if in_channels == 5:  # SD 2 depth: the depth estimator is optional when a depth map is passed
        from diffusers import StableDiffusionDepth2ImgPipeline

        return StableDiffusionDepth2ImgPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                                depth_estimator=None, feature_extractor=None)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    return cls(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x-shaped model folder in the diffusers layout (safetensors)."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd1"
    make_reference_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory) -> Path:
    """A tiny SD 2.x-shaped (linear projections, gelu, "!" padding) v-prediction model folder, as .bin pickles."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd2-v"
    make_reference_pipeline(v_prediction=True, sd2=True).save_pretrained(path, safe_serialization=False)
    return path


@pytest.fixture(scope="session")
def tiny_inpaint_dir(tmp_path_factory) -> Path:
    """A tiny 9-channel inpainting model folder (latents + mask + masked-image latents)."""
    path = tmp_path_factory.mktemp("models") / "tiny-inpaint"
    make_reference_pipeline(in_channels=9).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_depth(tmp_path_factory):
    """A tiny 5-channel SD 2 depth model: (its folder, diffusers' pipeline on the same weights)."""
    path = tmp_path_factory.mktemp("models") / "tiny-depth"
    pipe = make_reference_pipeline(in_channels=5)
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe


@pytest.fixture(scope="session")
def tiny_upscaler(tmp_path_factory):
    """A tiny x4 upscaler: 7-channel UNet with a noise-level class embedding, f=4 VAE, v-prediction."""
    from diffusers import (AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, num_class_embeds=1000,
        only_cross_attention=(False, True, False), norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64), latent_channels=4, layers_per_block=1, norm_num_groups=32,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        scaling_factor=0.08333)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=37, max_position_embeddings=77, hidden_act="gelu"))
    for m in (unet, vae, text):
        _jitter_norms(m, gen)
    tok = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), pad_token="!", model_max_length=77)
    sched = PNDMScheduler.from_config(dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True,
                                           steps_offset=1, prediction_type="v_prediction"))
    low = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, low_res_scheduler=low,
                                          scheduler=sched, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path_factory.mktemp("models") / "tiny-x4"
    pipe.save_pretrained(path)
    return path, pipe


@pytest.fixture(scope="session")
def reference(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ours(tiny_model_dir):
    from stablediff import StableDiffusion

    return StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")


def make_sdxl_pipeline(in_channels: int = 4, refiner: bool = False):
    """A tiny SDXL of the real design: CLIP ViT-L-like and bigG-like text encoders (64-wide heads, as every real SDXL
    text tower and UNet attention layer: single files do not record head counts), a three-level UNet with per-level
    transformer depths and the pooled text + size "text_time" embedding; the refiner: the second encoder alone and
    a vector with the aesthetic score. diffusers' invisible watermark is off: it stamps SDXL images 256 pixels wide or
    more, and ours is opt-in (--watermark)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0 if not refiner else 5)
    gen = torch.Generator().manual_seed(3)
    pooled, time_dim = 32, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 if refiner else 128, attention_head_dim=(1, 1, 2), use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + (5 if refiner else 6) * time_dim, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.13025)
    common = dict(vocab_size=49408, hidden_size=64, num_hidden_layers=3, num_attention_heads=1, intermediate_size=37,
                  max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    text = CLIPTextModel(CLIPTextConfig(**common, pad_token_id=49407, hidden_act="quick_gelu"))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, pad_token_id=1, hidden_act="gelu",
                                                        projection_dim=pooled))
    for m in (unet, vae, text, text_2):
        _jitter_norms(m, gen)
    tok = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=77)
    tok_2 = CLIPTokenizer(str(TABLES / "vocab.json"), str(TABLES / "merges.txt"), pad_token="!", model_max_length=77)
    # SDXL 1.0's scheduler config
    sched = EulerDiscreteScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
        clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0))
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_2, tokenizer=None,
                                                tokenizer_2=tok_2, unet=unet, scheduler=sched,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)
    cls = StableDiffusionXLInpaintPipeline if in_channels == 9 else StableDiffusionXLPipeline
    return cls(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok_2, unet=unet,
               scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL base folder (diffusers layout) and diffusers' pipeline on it."""
    path = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    pipe = make_sdxl_pipeline()
    pipe.save_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return path, pipe
