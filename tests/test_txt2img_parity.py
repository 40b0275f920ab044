"""The final image of our txt2img equals diffusers' StableDiffusionPipeline with the matching scheduler,
within 2/255 per pixel, for every sampler that diffusers has.

Schedules are stated on both sides. Our `default` is the model's own spacing (leading, offset 1, for SD
folders); diffusers' Euler-family schedulers fall back to their class default (linspace) when the SD config
does not name one, so they are told `leading` here. diffusers' DPM-Solver and UniPC define their own
"leading" (steps + 1 divisions), so those are compared on `trailing`, on `karras`, and on our default
timesteps passed explicitly.
"""
import numpy as np
import pytest
import torch

from stablediff.diffusion.schedules import discrete_timesteps

LEADING = {"timestep_spacing": "leading"}
TRAILING = {"timestep_spacing": "trailing"}
KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
STEPS = 20

CASES = [
    # (our sampler, our schedule, our eta, diffusers scheduler, its config, pipeline kwargs)
    ("ddim", "default", None, "DDIMScheduler", {}, {}),
    ("ddim", "default", 0.7, "DDIMScheduler", {}, {"eta": 0.7}),
    ("ddim", "trailing", None, "DDIMScheduler", TRAILING, {}),
    ("plms", "default", None, "PNDMScheduler", {}, {}),
    ("ddpm", "default", None, "DDPMScheduler", {}, {}),
    ("lms", "default", None, "LMSDiscreteScheduler", LEADING, {}),
    ("euler", "default", None, "EulerDiscreteScheduler", LEADING, {}),
    ("euler_a", "default", None, "EulerAncestralDiscreteScheduler", LEADING, {}),
    ("heun", "default", None, "HeunDiscreteScheduler", LEADING, {}),
    ("dpm2", "default", None, "KDPM2DiscreteScheduler", LEADING, {}),
    ("dpm2_a", "default", None, "KDPM2AncestralDiscreteScheduler", LEADING, {}),
    ("dpmpp_2m", "default", None, "DPMSolverMultistepScheduler", {}, {"timesteps": "ours"}),
    ("dpmpp_2m", "trailing", None, "DPMSolverMultistepScheduler", TRAILING, {}),
    ("dpmpp_2m", "karras", None, "DPMSolverMultistepScheduler", KARRAS, {}),
    ("dpmpp_2m_sde", "trailing", None, "DPMSolverMultistepScheduler", {**TRAILING, **SDE}, {}),
    ("dpmpp_2m_sde", "karras", None, "DPMSolverMultistepScheduler", {**KARRAS, **SDE}, {}),
    ("unipc", "trailing", None, "UniPCMultistepScheduler", TRAILING, {}),
    ("lcm", "default", None, "LCMScheduler", {}, {}),
]


def reference_image(pipe, scheduler: str, config: dict, call: dict, prompt="a photo of a cat", negative=None,
                    seeds=(3,), size=(64, 64), **embeds) -> np.ndarray:
    import diffusers

    # always from the model's own scheduler config: from_config would carry options over from the last call
    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.base_scheduler_config, **config)
    if call.get("timesteps") == "ours":
        call = {**call, "timesteps": discrete_timesteps(STEPS, "leading", 1000, 1).astype(int).tolist()}
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
               generator=[torch.Generator().manual_seed(s) for s in seeds], num_images_per_prompt=len(seeds),
               height=size[0], width=size[1], output_type="np", **call, **embeds).images
    return (out * 255).round().astype(np.uint8)


def assert_close(ours, expected: np.ndarray):
    got = np.stack([np.asarray(im) for im in ours]).astype(int)
    assert got.shape == expected.shape
    assert expected.std() > 10, "the reference image is flat: the comparison would prove nothing"
    diff = np.abs(got - expected.astype(int)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


@pytest.mark.parametrize("sampler,schedule,eta,scheduler,config,call", CASES,
                         ids=[f"{c[0]}-{c[1]}" + ("-eta" if c[2] else "") for c in CASES])
def test_sampler_matches_diffusers(ours, reference, sampler, schedule, eta, scheduler, config, call):
    expected = reference_image(reference, scheduler, config, call)
    assert_close(ours.txt2img("a photo of a cat", steps=STEPS, sampler=sampler, schedule=schedule, eta=eta, seed=3,
                              width=64, height=64), expected)


def test_negative_prompt_batch_and_odd_size(ours, reference):
    """Image i of a batch is the image at seed + i; a negative prompt; a size that is not a multiple of 64."""
    expected = reference_image(reference, "EulerAncestralDiscreteScheduler", LEADING, {}, prompt="a red house",
                               negative="blurry, low quality", seeds=(10, 11), size=(72, 56))
    got = ours.txt2img("a red house", "blurry, low quality", steps=STEPS, sampler="euler_a", schedule="default",
                       seed=10, batch_size=2, width=56, height=72)
    assert_close(got, expected)
    single = ours.txt2img("a red house", "blurry, low quality", steps=STEPS, sampler="euler_a", schedule="default",
                          seed=11, width=56, height=72)
    # equal up to float error: a batch of 2 sums in another order than a batch of 1
    assert np.abs(np.asarray(single[0]).astype(int) - np.asarray(got[1]).astype(int)).max() <= 1


V_CASES = [("ddim", "default", "DDIMScheduler", {}), ("euler", "default", "EulerDiscreteScheduler", LEADING),
           ("dpmpp_2m", "karras", "DPMSolverMultistepScheduler", KARRAS),
           ("unipc", "trailing", "UniPCMultistepScheduler", TRAILING)]


@pytest.mark.parametrize("sampler,schedule,scheduler,config", V_CASES, ids=[c[0] for c in V_CASES])
def test_v_prediction_sd2_model(tiny_v_model_dir, sampler, schedule, scheduler, config):
    """An SD 2.x-shaped v-prediction model (linear projections, gelu, "!" padding, pickled .bin weights)."""
    from diffusers import StableDiffusionPipeline

    from stablediff import StableDiffusion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_v_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = reference_image(pipe, scheduler, config, {})
    model = StableDiffusion.load(tiny_v_model_dir, device="cpu", dtype="fp32")
    assert model.schedule.prediction == "v"
    assert_close(model.txt2img("a photo of a cat", steps=STEPS, sampler=sampler, schedule=schedule, seed=3,
                               width=64, height=64), expected)


def test_a_vae_that_overflows_in_fp16_is_retried_in_fp32(tiny_model_dir, capsys):
    """Never a black image passed as success: an fp16 decode that overflows is done again in fp32 (and the VAE stays
    fp32 for later decodes); it then equals an fp32 decode with the same (fp16-rounded) weights."""
    from stablediff import StableDiffusion
    from stablediff.errors import UserError
    from stablediff.pipelines.common import decode

    half = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp16")
    full = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    full.vae.load_state_dict({k: v.half().float() for k, v in half.vae.state_dict().items()})
    for model in (half, full):  # activations past fp16's 65504 after the first convolution
        model.vae.post_quant_conv.weight.data *= 1e5
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.isfinite(half.vae.decode(latents.half() / half.vae.config.scaling_factor)).all()
    got = np.asarray(decode(half, latents)[0]).astype(int)
    assert "decodes in fp32 from now on" in capsys.readouterr().err
    assert next(half.vae.parameters()).dtype == torch.float32
    expected = np.asarray(decode(full, latents)[0]).astype(int)
    assert expected.std() > 10 and np.abs(got - expected).max() <= 1
    with pytest.raises(UserError, match="NaN/inf even in fp32"):
        decode(full, torch.full((1, 4, 8, 8), float("nan")))
