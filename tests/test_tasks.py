"""tasks.py is the one definition of each task's parameters: the Python API, the command line and the HTTP schemas
agree with it, and `validate` is the check both the server and the bounds of the command line use."""
import inspect
from dataclasses import fields

import pytest

from stablediff import StableDiffusion, cli, tasks
from stablediff.errors import UserError
from stablediff.pipelines.hires import Hires

NOT_KEYWORDS = {"self", "image", "mask", "prompt", "callback", "hires", "refiner", "depth_model"}  # positional, or objects


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_the_python_api_takes_the_tasks_parameters_with_their_defaults(task):
    signature = inspect.signature(getattr(StableDiffusion, task)).parameters
    table = tasks.params(task)
    for name, param in signature.items():
        if name in NOT_KEYWORDS:
            continue
        assert name in table, f"{task}({name}=...) is not in tasks.py"
        assert param.default == table[name].default, (task, name)
    missing = set(table) - set(signature) - set(tasks.JOB_ONLY) - {"hires_scale", "hires_steps", "hires_denoise",
                                                                     "hires_upscaler"}
    assert missing == set(), f"tasks.py names what {task}() does not take: {missing}"


def test_the_hires_parameters_are_the_hires_fix_defaults():
    table = tasks.params("txt2img")
    for f in fields(Hires):
        if f.name != "scale":  # hires_scale None is "no hires fix"; Hires(scale) has a default for the Python API
            assert table[f"hires_{f.name}"].default == f.default, f.name


CLI_DESTS = {"negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler", "schedule": "schedule",
             "scale": "scale", "eta": "ddim_eta", "clip_skip": "clip_skip", "seed": "seed", "subseed": "subseed",
             "subseed_strength": "subseed_strength", "batch_size": "n_samples", "n_iter": "n_iter", "width": "W",
             "height": "H", "strength": "strength", "resize_mode": "resize_mode", "fill": "fill", "mask_blur": "mask_blur",
             "invert_mask": "invert_mask", "only_masked": "only_masked", "padding": "padding",
             "noise_level": "noise_level", "tile": "tile", "overlap": "tile_overlap", "hires_scale": "hires_scale",
             "hires_steps": "hires_steps", "hires_denoise": "hires_denoise", "hires_upscaler": "hires_upscaler"}
REQUIRED = {"img2img": ["--init-img", "a.png"], "depth2img": ["--init-img", "a.png"], "upscale": ["--init-img", "a.png"],
            "inpaint": ["--init-img", "a.png", "--mask", "m.png"], "outpaint": ["--init-img", "a.png", "--extend", "0,8,0,0"]}


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_the_command_line_defaults_are_the_tasks_defaults(task):
    args = cli.parse_args([task, "x", *REQUIRED.get(task, [])])
    checked = 0
    for name, p in tasks.params(task).items():
        dest = CLI_DESTS.get(name)
        if dest is not None and hasattr(args, dest):
            assert getattr(args, dest) == p.default, (task, name, getattr(args, dest), p.default)
            checked += 1
    assert checked >= 12


def test_the_native_schema_comes_from_the_table():
    from stablediff.server.schemas import JobRequest

    names = set(JobRequest.model_fields)
    assert names == {"task", "model"} | {p.name for params in tasks.TASKS.values() for p in params}


def test_validate_fills_defaults_and_says_what_was_wrong():
    got = tasks.validate("img2img", {"image": "ref", "prompt": "a cat", "strength": 0.5})
    assert got["strength"] == 0.5 and got["steps"] is None and got["resize_mode"] == "just-resize"
    for given, message in [({"steps": 0}, "steps must be from 1 to 1000"), ({"steps": 2.5}, "steps must be int"),
                           ({"scale": float("inf")}, "scale must be a finite number"), ({"width": 60}, "not a multiple of 8"),
                           ({"sampler": "DPM fast"}, "unknown sampler"), ({"batch_size": True}, "batch_size must be int"),
                           ({"prompt": "a\x00"}, "control character U\\+0000"), ({"mystery": 1}, "takes no mystery"),
                           ({"width": 4096, "height": 4096}, "over the limit")]:
        with pytest.raises(UserError, match=message):
            tasks.validate("txt2img", given)
    with pytest.raises(UserError, match="image is required"):
        tasks.validate("img2img", {})
    with pytest.raises(UserError, match="extend must be four whole numbers"):
        tasks.validate("outpaint", {"image": "ref", "extend": [8, 8]})
