"""Loading a diffusers-layout folder: dtypes, clear errors, and pickles that never run code."""
import json
import pickle
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from stablediff import StableDiffusion, devices
from stablediff.errors import UserError
from stablediff.nn import winograd


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_half_precision_loads_every_weight_in_that_dtype(tiny_model_dir):
    model = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="bf16")
    for part in (model.unet, model.vae, model.text_encoder):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    # bf16 convolutions on the CPU run channels-last (oneDNN's layout); fp32 ones stay NCHW, but for the UNet's on
    # AVX512 CPUs (devices.weight_layout)
    assert model.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    full = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="fp32")
    avx512 = torch.backends.cpu.get_cpu_capability() in winograd.SLOWER_ON
    assert full.unet.input_blocks[0][0].weight.is_contiguous() != avx512
    assert full.vae.decoder.conv_in.weight.is_contiguous()
    image = model.txt2img("a cat", steps=2, seed=0, width=64, height=64)[0]
    assert image.size == (64, 64)


def test_bf16_image_is_close_to_fp32(tiny_model_dir, ours):
    """bf16 keeps the sampler state and schedule in fp32; the image stays close (mean abs diff < 3/255)."""
    import numpy as np

    half = StableDiffusion.load(tiny_model_dir, device="cpu", dtype="bf16")
    a, b = (np.asarray(m.txt2img("a cat", steps=10, seed=0, width=64, height=64)[0]).astype(int) for m in (ours, half))
    assert np.abs(a - b).mean() < 3


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_that_would_run_code_is_refused(model_copy, tmp_path):
    target = tmp_path / "pwned"
    weights = model_copy / "unet" / "diffusion_pytorch_model.bin"
    (model_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": _Exploit(str(target))}, weights)
    with pytest.raises(UserError, match="refused to unpickle"):
        StableDiffusion.load(model_copy, device="cpu")
    assert not target.exists()
    # and the raw pickle protocol, outside torch's zip container
    weights.write_bytes(pickle.dumps(_Exploit(str(target))))
    with pytest.raises(UserError):
        StableDiffusion.load(model_copy, device="cpu")
    assert not target.exists()


def test_wrong_shapes_and_missing_weights_are_named(model_copy):
    from safetensors.torch import load_file, save_file

    path = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    sd["decoder.conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(sd, path)
    with pytest.raises(UserError, match=r"decoder.conv_in.weight has shape \(3, 3, 3, 3\), expected"):
        StableDiffusion.load(model_copy, device="cpu")
    del sd["decoder.conv_in.weight"]
    save_file(sd, path)
    with pytest.raises(UserError, match="vae: the weights do not fit this model: missing 1 weights"):
        StableDiffusion.load(model_copy, device="cpu")


def test_missing_part_and_foreign_families(model_copy):
    shutil.rmtree(model_copy / "scheduler")
    with pytest.raises(UserError, match="no scheduler/scheduler_config.json"):
        StableDiffusion.load(model_copy, device="cpu")
    config_path = model_copy / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["addition_embed_type"] = "image"  # Kandinsky's
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match="not a Stable Diffusion 1.x/2.x/XL UNet"):
        StableDiffusion.load(model_copy, device="cpu")


def test_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not really")
    with pytest.raises(UserError, match="is a folder but not a diffusers model"):
        StableDiffusion.load(tmp_path, device="cpu")
    with pytest.raises(UserError, match="not a valid .safetensors file"):
        StableDiffusion.load(tmp_path / "model.safetensors", device="cpu")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown weights format"):
        StableDiffusion.load(tmp_path / "notes.txt", device="cpu")


_FAULTS = """
import resource, sys, torch
from stablediff.devices import keep_freed_memory
cpu = torch.device("cpu")
set_ = keep_freed_memory(cpu) if sys.argv[1] != "default" else False
if sys.argv[1] == "off":
    set_ = keep_freed_memory(cpu, False)
torch.ones(1 << 25, dtype=torch.bfloat16)  # 64 MB, made and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(3 << 23, dtype=torch.bfloat16)  # 48 MB
print(set_, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_tensor_memory_is_reused_without_page_faults():
    """A 48 MB tensor made after a 64 MB one was freed takes the freed memory (no fresh pages from the kernel)
    once keep_freed_memory is set; by default, or set on then off (as the bench runs diffusers), glibc maps and
    faults in its 12,288 pages anew."""
    runs = {flag: subprocess.run([sys.executable, "-c", _FAULTS, flag], capture_output=True, text=True, check=True)
            for flag in ("on", "off", "default")}
    (on_set, on), (off_set, off), (_, default) = (runs[f].stdout.split() for f in ("on", "off", "default"))
    assert (on_set, off_set) == ("True", "True")
    assert int(on) < 1000 < 12000 < min(int(off), int(default))
    assert not devices.keep_freed_memory(torch.device("cuda"))


_THREAD_FAULTS = """
import resource, sys, threading, torch
from stablediff.devices import keep_freed_memory, one_heap
cpu = torch.device("cpu")
keep_freed_memory(cpu)
set_ = one_heap(cpu) if sys.argv[1] == "one" else False

def render():
    torch.ones(1 << 25, dtype=torch.bfloat16)  # 64 MB, made and freed in the thread
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(3 << 23, dtype=torch.bfloat16)  # 48 MB
    print(set_, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=render)
thread.start()
thread.join()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_one_heap_lets_a_thread_reuse_freed_memory():
    """The server renders in a thread: with one heap, its 48 MB tensor takes the 64 MB it freed; on a thread's own
    heaps (64 MB at most) glibc maps and faults in its 12,288 pages anew."""
    runs = {flag: subprocess.run([sys.executable, "-c", _THREAD_FAULTS, flag], capture_output=True, text=True,
                                 check=True).stdout.split() for flag in ("one", "own")}
    assert runs["one"][0] == "True" and int(runs["one"][1]) < 1000 < 12000 < int(runs["own"][1])
    assert not devices.one_heap(torch.device("cuda"))
