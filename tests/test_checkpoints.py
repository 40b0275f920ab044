"""Single-file checkpoints: the same image from every format, EMA, dtypes, --vae, convert round trips,
info and its hash, and files that must be refused (pickles that run code, zip tricks, bad safetensors)."""
import json
import os
import pickle
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from stablediff import StableDiffusion, cli
from stablediff.api import probe_v_prediction, read_spec
from stablediff.checkpoints.convert import convert
from stablediff.checkpoints.diffusers_folder import weights_file
from stablediff.checkpoints.io import read_state_dict
from stablediff.checkpoints.keymaps import ema_key
from stablediff.checkpoints.original import preset_path
from stablediff.errors import UserError

from test_txt2img_parity import KARRAS, TRAILING, assert_close, reference_image


def tiny_yaml(path, sd2: bool):
    """The original-format config of the tiny test models (the CI path: an explicit --config)."""
    cfg = yaml.safe_load(preset_path("v2-inference-v" if sd2 else "v1-inference").read_text())
    p = cfg["model"]["params"]
    unet = p["unet_config"]["params"]
    unet.update(model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[1, 2], context_dim=128)
    if sd2:
        unet["num_head_channels"] = 16
    p["first_stage_config"]["params"]["ddconfig"].update(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """The tiny SD 1.x model written as .safetensors and .ckpt in the original layout."""
    out = tmp_path_factory.mktemp("single")
    spec = read_spec(tiny_model_dir)
    convert(spec, out / "tiny.safetensors")
    convert(spec, out / "tiny.ckpt")
    tiny_yaml(out / "tiny-v1.yaml", sd2=False)
    return out


def render(model, **kw):
    return model.txt2img("a photo of a cat", steps=20, sampler="dpmpp_2m", schedule="karras", seed=3, width=64, height=64, **kw)


@pytest.mark.parametrize("name,config", [("tiny.safetensors", None), ("tiny.ckpt", None), ("tiny.safetensors", "tiny-v1.yaml"),
                                         ("tiny.ckpt", "tiny-v1.yaml")])
def test_every_format_gives_diffusers_image(files, reference, name, config):
    expected = reference_image(reference, "DPMSolverMultistepScheduler", KARRAS, {})
    model = StableDiffusion.load(files / name, device="cpu", dtype="fp32", config=config and files / config)
    assert_close(render(model), expected)


def test_sd2_openclip_file_with_config(tiny_v_model_dir, tmp_path):
    """SD 2.x: OpenCLIP names with fused in_proj, penultimate layer, v-prediction from the YAML."""
    from diffusers import StableDiffusionPipeline

    convert(read_spec(tiny_v_model_dir), tmp_path / "v.safetensors")
    keys = load_file(tmp_path / "v.safetensors").keys()
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    model = StableDiffusion.load(tmp_path / "v.safetensors", device="cpu", dtype="fp32",
                                 config=tiny_yaml(tmp_path / "v.yaml", sd2=True))
    assert (model.family, model.schedule.prediction, model.text_encoder.config.skip_layers) == ("sd2", "v", 1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_v_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert_close(render(model), reference_image(pipe, "DPMSolverMultistepScheduler", KARRAS, {}))
    # the YAML beside the file is found on its own
    tiny_yaml(tmp_path / "v.yaml", sd2=True)
    assert StableDiffusion.load(tmp_path / "v.safetensors", device="cpu").schedule.prediction == "v"


def test_yaml_sampling_defaults(files, reference, tmp_path):
    """stablediff's own keys (the demo model's): `timestep_spacing` is what the `default` schedule samples with,
    as in a diffusers scheduler config; `default_sampler` and `default_scale` are what a call naming none uses.
    CompVis configs have none of them: leading, DPM++ 2M Karras, 7.5."""
    def load(**keys):
        cfg = yaml.safe_load((files / "tiny-v1.yaml").read_text())
        cfg["model"]["params"].update(keys)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        return StableDiffusion.load(files / "tiny.safetensors", device="cpu", dtype="fp32", config=tmp_path / "c.yaml")

    model = load(timestep_spacing="trailing", default_sampler="Euler", default_scale=7.5)
    assert (model.schedule.spacing, model.sampling) == ("trailing", {"sampler": "Euler", "scale": 7.5, "steps": 20})
    image = model.txt2img("a photo of a cat", steps=20, seed=3, width=64, height=64)
    assert_close(image, reference_image(reference, "EulerDiscreteScheduler", TRAILING, {}))
    plain = load()
    assert (plain.schedule.spacing, plain.sampling) == ("leading", {"sampler": "DPM++ 2M Karras", "scale": 7.5,
                                                                   "steps": 20})
    # the model's scale is the one used: the same image as naming it
    model = load(default_scale=4)
    same = model.txt2img("a photo of a cat", steps=4, seed=3, width=64, height=64, scale=4, sampler="DPM++ 2M Karras")
    assert np.array_equal(np.asarray(model.txt2img("a photo of a cat", steps=4, seed=3, width=64, height=64)[0]),
                          np.asarray(same[0]))
    with pytest.raises(UserError, match="timestep_spacing 'uniform'; use one of leading, trailing, linspace"):
        load(timestep_spacing="uniform")
    with pytest.raises(UserError, match="default_scale 'high'; give a number"):
        load(default_scale="high")
    with pytest.raises(UserError, match="config has default_sampler: unknown sampler 'Euler b'"):
        load(default_sampler="Euler b")


def test_ema_weights_by_default_raw_with_no_ema(files, tmp_path):
    sd = load_file(files / "tiny.safetensors")
    unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    full = {**sd, **{ema_key(k): v + 1 for k, v in unet.items()}, "model_ema.decay": torch.tensor(0.9999),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    torch.save({"state_dict": full, "global_step": 1000, "epoch": 3}, tmp_path / "ema.ckpt")
    key = "input_blocks.1.0.in_layers.2.weight"
    ema = StableDiffusion.load(tmp_path / "ema.ckpt", device="cpu", dtype="fp32")
    raw = StableDiffusion.load(tmp_path / "ema.ckpt", device="cpu", dtype="fp32", use_ema=False)
    assert torch.equal(ema.unet.state_dict()[key], unet[key] + 1)
    assert torch.equal(raw.unet.state_dict()[key], unet[key])


def test_half_precision_file_is_converted_once_to_the_run_dtype(files, tmp_path):
    convert(read_spec(files / "tiny.safetensors"), tmp_path / "half.safetensors", dtype="fp16")
    half = load_file(tmp_path / "half.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}
    model = StableDiffusion.load(tmp_path / "half.safetensors", device="cpu", dtype="fp32")
    w = model.unet.state_dict()["out.2.weight"]
    assert w.dtype == torch.float32 and torch.equal(w, half["model.diffusion_model.out.2.weight"].float())


@pytest.mark.parametrize("layout", ["compvis", "diffusers"])
def test_separate_vae_file(files, tiny_model_dir, tmp_path, layout):
    if layout == "compvis":
        sd = {k: v + 0.5 for k, v in load_file(files / "tiny.safetensors").items() if k.startswith("first_stage_model.")}
    else:
        sd = {k: v + 0.5 for k, v in load_file(tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors").items()}
    save_file(sd, tmp_path / "vae.safetensors")
    base = StableDiffusion.load(files / "tiny.safetensors", device="cpu", dtype="fp32")
    model = StableDiffusion.load(files / "tiny.safetensors", device="cpu", dtype="fp32", vae=tmp_path / "vae.safetensors")
    for k, v in model.vae.state_dict().items():
        assert torch.equal(v, base.vae.state_dict()[k] + 0.5), k


def test_v_prediction_probe():
    class Fake(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"in_channels": 4, "context_dim": 8})

        def forward(self, x, t, ctx):
            return x + self.shift

    assert probe_v_prediction(Fake(-2.0)) and not probe_v_prediction(Fake(0.0))


# --- convert -----------------------------------------------------------------------------------------

def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_round_trips_are_bit_exact(files, tmp_path):
    convert(read_spec(files / "tiny.safetensors"), tmp_path / "folder")
    convert(read_spec(tmp_path / "folder"), tmp_path / "again.safetensors")
    assert tensors_equal(load_file(files / "tiny.safetensors"), load_file(tmp_path / "again.safetensors"))
    convert(read_spec(files / "tiny.ckpt"), tmp_path / "from-pickle.safetensors")
    assert tensors_equal(load_file(files / "tiny.safetensors"), load_file(tmp_path / "from-pickle.safetensors"))
    assert tensors_equal(read_state_dict(files / "tiny.ckpt"), load_file(files / "tiny.safetensors"))


def test_sd2_folder_to_file_to_folder_is_bit_exact(tiny_v_model_dir, tmp_path):
    convert(read_spec(tiny_v_model_dir), tmp_path / "v.safetensors")
    convert(read_spec(tmp_path / "v.safetensors", config=tiny_yaml(tmp_path / "v.yaml", sd2=True)), tmp_path / "back")
    def named(folder, part):  # transformers may write CLIP keys with or without the text_model. level
        return {k.removeprefix("text_model."): v for k, v in read_state_dict(weights_file(folder, part)).items()
                if not k.endswith("position_ids")}

    for part in ("unet", "vae", "text_encoder"):
        assert tensors_equal(named(tiny_v_model_dir, part), named(tmp_path / "back", part)), part


def test_converted_folder_loads_and_renders_in_diffusers(files, reference, tmp_path):
    from diffusers import StableDiffusionPipeline

    convert(read_spec(files / "tiny.ckpt"), tmp_path / "folder")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "folder", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    got = reference_image(pipe, "DPMSolverMultistepScheduler", KARRAS, {})
    assert np.array_equal(got, reference_image(reference, "DPMSolverMultistepScheduler", KARRAS, {}))


def test_convert_cli_and_refusals(files, tmp_path, capsys):
    assert cli.main(["convert", str(files / "tiny.safetensors"), str(tmp_path / "t.ckpt"), "--dtype", "bf16"]) == 0
    assert {v.dtype for v in read_state_dict(tmp_path / "t.ckpt").values()} == {torch.bfloat16}
    assert cli.main(["convert", str(files / "tiny.safetensors"), str(tmp_path / "t.ckpt")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_info_and_model_hash(files, tmp_path, capsys):
    import hashlib
    import shutil

    path = shutil.copy(files / "tiny.safetensors", tmp_path / "m.safetensors")
    assert cli.main(["info", str(path)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["family"], facts["variant"], facts["prediction"], facts["ema"]) == ("SD 1.x", "base", "epsilon", "no EMA weights")
    assert facts["parts"]["unet"]["dtype"] == "float32" and facts["model hash"].startswith("not computed")
    assert cli.main(["info", str(path), "--hash"]) == 0
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert json.loads(capsys.readouterr().out)["model hash"] == expected
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # the cache is not beside the file
    assert len(list((Path(os.environ["XDG_CACHE_HOME"]) / "stablediff" / "hashes").glob("*.json"))) >= 1
    out = tmp_path / "out"
    assert cli.main(["txt2img", "a", "--model", str(path), "--outdir", str(out), "--H", "64", "--W", "64",
                     "--steps", "2", "--skip_grid", "--seed", "1"]) == 0
    assert f"Model hash: {expected}, Model: m" in Image.open(out / "samples" / "00000.png").info["parameters"]


# --- files that must be refused ------------------------------------------------------------------------

class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious(tmp_path):
    target = tmp_path / "created-by-pickle"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": CreatesFile(target)}, path)
    return path, target


def test_pickle_that_would_create_a_file_is_refused(tmp_path):
    path, target = malicious(tmp_path)
    with pytest.raises(UserError, match=r"refused to unpickle: the file asks for (io|builtins)\.open"):
        StableDiffusion.load(path, device="cpu")
    assert not target.exists()


def test_broken_stream_and_nested_archive_are_refused(tmp_path):
    path, target = malicious(tmp_path)
    raw = pickle.dumps({"x": CreatesFile(target)})
    for i, data in enumerate([raw, raw[: len(raw) // 2], raw[:-1] + b"\x00garbage"]):
        (tmp_path / f"raw{i}.pt").write_bytes(data)
        with pytest.raises(UserError):
            read_state_dict(tmp_path / f"raw{i}.pt")
    with zipfile.ZipFile(tmp_path / "nested.ckpt", "w") as z:
        z.write(path, "inner/evil.ckpt")
    with pytest.raises(UserError):
        read_state_dict(tmp_path / "nested.ckpt")
    assert not target.exists()


def test_unsafe_pickle_is_the_one_way_out(tmp_path, capsys):
    import argparse

    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "odd.ckpt")
    with pytest.raises(UserError, match="argparse.Namespace"):
        read_state_dict(tmp_path / "odd.ckpt")
    assert set(read_state_dict(tmp_path / "odd.ckpt", unsafe_pickle=True)) == {"w"}
    assert "code inside it can run" in capsys.readouterr().err


def test_lightning_checkpoint_extras_are_read_as_placeholders(tmp_path):
    """Real .ckpt files carry Lightning callbacks and numpy step counters beside the weights."""
    import sys
    import types

    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    module = types.ModuleType(names[-1])
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": module.__name__})
    module.ModelCheckpoint = ModelCheckpoint
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]} | {names[-1]: module})
    try:
        callback = ModelCheckpoint()
        callback.best_model_score = torch.tensor(0.1)
        torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": np.int64(470000),
                    "callbacks": {ModelCheckpoint: {"monitor": None}}, "cb": callback}, tmp_path / "real.ckpt")
    finally:
        for n in names:
            del sys.modules[n]
    assert set(read_state_dict(tmp_path / "real.ckpt")) == {"w"}


def test_zip_members_with_absurd_sizes_are_refused(tmp_path):
    path = tmp_path / "bomb.ckpt"
    torch.save({"w": torch.ones(4)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")  # first central-directory entry: its uncompressed size is at +24
    data[at + 24: at + 28] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="declares 4294967280 bytes"):
        read_state_dict(path)
    with zipfile.ZipFile(tmp_path / "deflated.ckpt", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(UserError, match="torch.save never writes that"):
        read_state_dict(tmp_path / "deflated.ckpt")


def st_file(path, header, data=b"", declared=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if declared is None else declared) + raw + data)
    return path


F4 = {"dtype": "F32", "shape": [2]}
MALFORMED = [
    ("huge-header", b"{}", b"", 200 * 1024 * 1024, "over 100 MB"),
    ("past-end", b"{}", b"", 5000, "past the end"),
    ("overlap", {"a": {**F4, "data_offsets": [0, 8]}, "b": {**F4, "data_offsets": [4, 12]}}, bytes(12), None, "overlapping"),
    ("gap", {"a": {**F4, "data_offsets": [0, 8]}, "b": {**F4, "data_offsets": [12, 20]}}, bytes(20), None, "a gap"),
    ("length", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(8), None, "needs 16"),
    ("duplicate", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                  b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8), None, "appears twice"),
    ("beyond-data", {"a": {**F4, "data_offsets": [0, 8]}}, bytes(4), None, "past the end"),
    ("not-json", b"{not json", b"", None, "not valid JSON"),
    ("dtype", {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "unknown dtype"),
    ("trailing", {"a": {**F4, "data_offsets": [0, 8]}}, bytes(16), None, "belong to none"),
]


@pytest.mark.parametrize("name,header,data,declared,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_safetensors_are_refused_within_a_second(tmp_path, name, header, data, declared, message):
    path = st_file(tmp_path / f"{name}.safetensors", header, data, declared)
    start = time.perf_counter()
    with pytest.raises(UserError, match=message):
        read_state_dict(path)
    assert time.perf_counter() - start < 1.0


def test_valid_safetensors_read_as_zero_copy_views(files):
    ours, theirs = read_state_dict(files / "tiny.safetensors"), load_file(files / "tiny.safetensors")
    assert tensors_equal(ours, theirs)


def test_convert_bakes_in_a_separate_vae(files, tmp_path):
    vae = {k: v + 0.5 for k, v in load_file(files / "tiny.safetensors").items() if k.startswith("first_stage_model.")}
    save_file(vae, tmp_path / "vae.safetensors")
    assert cli.main(["convert", str(files / "tiny.safetensors"), str(tmp_path / "baked.safetensors"),
                     "--vae", str(tmp_path / "vae.safetensors")]) == 0
    baked = load_file(tmp_path / "baked.safetensors")
    assert all(torch.equal(baked[k], v) for k, v in vae.items())
