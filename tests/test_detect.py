"""Recognition from names and shapes alone, on fake state dicts of torch.empty tensors on the meta device."""
import pytest
import torch

from stablediff.checkpoints.detect import CLIP_HF, CLIP_OPEN, UNET, VAE, detect
from stablediff.checkpoints.keymaps import hf_to_openclip
from stablediff.checkpoints.original import preset_path, read_yaml, unet_from_yaml
from stablediff.errors import UserError
from stablediff.models.clip_text import SD1_CLIP, SD2_CLIP, ClipTextModel
from stablediff.models.unet import SD1_UNET, SD2_UNET, UNet, UNetConfig
from stablediff.models.vae import SD_VAE, AutoencoderKL, VAEConfig


def shapes(module: torch.nn.Module, prefix: str) -> dict:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def fake(unet: UNetConfig, family: str = "sd1", vae: VAEConfig = SD_VAE, ema: bool = False) -> dict:
    with torch.device("meta"):
        sd = shapes(UNet(unet), UNET) | shapes(AutoencoderKL(vae), VAE)
        if family == "sd1":
            sd |= shapes(ClipTextModel(SD1_CLIP), CLIP_HF + "text_model.")
        else:
            tower = {k: torch.empty(v, device="meta") for k, v in shapes(ClipTextModel(SD2_CLIP), "").items()}
            sd |= {CLIP_OPEN + k: tuple(v.shape) for k, v in hf_to_openclip(tower, SD2_CLIP.layers).items()}
            sd |= {CLIP_OPEN + "text_projection": (1024, 1024), CLIP_OPEN + "logit_scale": ()}
    if ema:
        sd |= {"model_ema.decay": (), "model_ema.num_updates": ()}
    return sd


def preset_unet(name: str) -> UNetConfig:
    return unet_from_yaml(read_yaml(preset_path(name))["unet_config"]["params"])


CASES = [  # (fake state dict maker, family, variant, prediction known from weights, expected UNet config)
    (lambda: fake(SD1_UNET), "sd1", "base", "epsilon", SD1_UNET),
    (lambda: fake(SD1_UNET, ema=True), "sd1", "base", "epsilon", SD1_UNET),
    (lambda: fake(UNetConfig(in_channels=9)), "sd1", "inpainting", "epsilon", UNetConfig(in_channels=9)),
    (lambda: fake(SD2_UNET, "sd2"), "sd2", "base", None, SD2_UNET),
    (lambda: fake(preset_unet("v2-midas-inference"), "sd2"), "sd2", "depth", "epsilon", preset_unet("v2-midas-inference")),
    (lambda: fake(preset_unet("x4-upscaling"), "sd2", VAEConfig(ch_mult=(1, 2, 4), scaling_factor=0.08333)),
     "sd2", "upscaler", "v", preset_unet("x4-upscaling")),
]


@pytest.mark.parametrize("make,family,variant,prediction,unet", CASES,
                         ids=["sd1", "sd1-ema", "sd1-inpainting", "sd2", "sd2-depth", "x4-upscaler"])
def test_recognised_from_shapes(make, family, variant, prediction, unet):
    found = detect(make())
    assert (found.family, found.variant, found.prediction) == (family, variant, prediction)
    assert found.unet == unet
    assert found.clip == (SD1_CLIP if family == "sd1" else SD2_CLIP)
    assert found.vae.ch_mult == ((1, 2, 4) if variant == "upscaler" else (1, 2, 4, 4))


def test_presets_match_the_configs_of_record():
    assert preset_unet("v1-inference") == SD1_UNET
    assert preset_unet("v2-inference") == SD2_UNET == preset_unet("v2-inference-v")
    assert preset_unet("v1-inpainting-inference") == UNetConfig(in_channels=9)
    assert read_yaml("v2-inference-v")["parameterization"] == "v"


FOREIGN = [
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,), "first_stage_model.x": (1,),
      UNET + "input_blocks.0.0.weight": (320, 4, 3, 3)}, "an SDXL file without its OpenCLIP bigG text encoder"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "an SD3 model"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "a Flux model"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "a LoRA"),
    ({"string_to_param.*": (2, 768), "string_to_token.*": (1,)}, "a textual inversion embedding"),
    ({"emb_params": (2, 768)}, "a textual inversion embedding"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "a VAE on its own"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "a ControlNet"),
    ({"some.random.weight": (3, 3)}, "not a Stable Diffusion checkpoint"),
]


@pytest.mark.parametrize("sd,looks_like", FOREIGN, ids=[f[1] for f in FOREIGN])
def test_anything_else_gets_a_one_line_error_naming_it(sd, looks_like):
    with pytest.raises(UserError, match=looks_like) as e:
        detect(sd, "model.safetensors")
    assert "\n" not in str(e.value)


def test_unknown_channel_count():
    with pytest.raises(UserError, match="6 input channels"):
        detect(fake(UNetConfig(in_channels=6)))
