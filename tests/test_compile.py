"""`--compile`: the compiled UNet draws the eager one's image, and reads the live weights (LoRA merges copy into
them in place), so a merge changes the compiled model's image as it does the eager one's."""
import numpy as np
import pytest
import torch

from stablediff import devices
from stablediff.api import StableDiffusion
from stablediff.errors import UserError


def _render(model):
    image = model.txt2img("a red circle on a blue background", steps=4, seed=3)[0]
    return np.asarray(image, dtype=np.int16)


def test_compiled_unet_draws_the_eager_image_and_follows_weight_changes():
    eager = StableDiffusion.load(device="cpu", dtype="fp32")
    compiled = StableDiffusion.load(device="cpu", dtype="fp32", compile=True)
    assert np.abs(_render(compiled) - _render(eager)).max() <= 2
    before = _render(compiled)
    with torch.no_grad():
        for model in (eager, compiled):
            model.unet.out[-1].weight.mul_(1.5)
    after = _render(compiled)
    assert np.abs(after - before).max() > 10
    assert np.abs(after - _render(eager)).max() <= 2


def test_compile_without_a_compiler_is_one_line(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        devices.compile_module(torch.nn.Linear(2, 2), torch.device("cpu"))
