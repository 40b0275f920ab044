"""The `stablediff` command. The only module that reads argv; CompVis' flag spellings are accepted."""
import argparse
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

from stablediff import __version__, checks, tasks
from stablediff.errors import UserError, out_of_memory
from stablediff.files import load_image, write_png

SAMPLER_HELP = ("ddim, plms, ddpm, lms, euler, euler_a, heun, dpm2, dpm2_a, dpmpp_2m, dpmpp_2s_a, dpmpp_sde, "
                "dpmpp_2m_sde, unipc; or an AUTOMATIC1111 name such as \"DPM++ 2M Karras\"")


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other error of the command."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(text: str) -> float:
    """A finite float (argparse type): NaN and infinity are refused."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def sigma(text: str) -> float:
    """A float that may be inf but not NaN (argparse type)."""
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def _add_model_flags(p, vae_help: str) -> None:
    p.add_argument("--config", help="an original YAML config (e.g. v1-inference.yaml) or a preset name: v1-inference, "
                                    "v1-inpainting-inference, v2-inference, v2-inference-v, v2-midas-inference, x4-upscaling")
    p.add_argument("--vae", help=vae_help)
    p.add_argument("--no-ema", "--no_ema", dest="no_ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--prediction", choices=("epsilon", "v"), help="for SD 2.x files whose weights do not say")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="read pickles with the full unpickler: code inside the file can run; only for files you trust")


def _add_finish_flags(p, who: str) -> None:
    p.add_argument("--safety-checker", nargs="?", const=True, default=None, metavar="PATH",
                   help=f"screen {who} with the Stable Diffusion safety checker: a flagged image is written black and "
                        "said to be; PATH: a diffusers folder with safety_checker/, that folder, or its .safetensors "
                        "(none: the model folder's own). Off by default. Give PATH as --safety-checker=PATH before a prompt")
    p.add_argument("--watermark", nargs="?", const="StableDiffusionV1", default=None, metavar="TEXT",
                   help=f"embed TEXT invisibly in {who} as CompVis' script does (default StableDiffusionV1; images of "
                        "256x256 or more; needs stablediff[watermark]); `stablediff watermark IMG` reads it. Off by default")


def _finish_kwargs(args) -> dict:
    return {"safety_checker": args.safety_checker, "watermark": args.watermark}


def _load_kwargs(args) -> dict:
    return {"config": args.config, "vae": args.vae, "use_ema": not args.no_ema, "prediction": args.prediction,
            "unsafe_pickle": args.unsafe_pickle}


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert between single files and diffusers folders",
                       description="Convert a model: single file <-> diffusers folder, pickle -> safetensors.")
    p.add_argument("input", help="a .safetensors/.ckpt checkpoint or a diffusers folder")
    p.add_argument("output", help="the file or folder to write (must not exist)")
    p.add_argument("--format", choices=("diffusers", "safetensors", "ckpt"),
                   help="default: from the output's suffix (.safetensors, .ckpt), else a diffusers folder")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="cast the weights (default: keep them)")
    _add_model_flags(p, "a separate VAE file (CompVis or diffusers layout), baked into the output")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="what a model is: family, prediction, channels, EMA, parameters",
                       description="Say what a model file or folder is, without loading it onto a device.")
    p.add_argument("model", help="a .safetensors/.ckpt checkpoint or a diffusers folder")
    p.add_argument("--hash", action="store_true",
                   help="compute AUTOMATIC1111's model hash (reads the whole file; cached in your cache folder)")
    _add_model_flags(p, "a separate VAE file (CompVis or diffusers layout), described in place of the model's own")


def _add_generation(sub, name: str, help_text: str, description: str):
    """The flags every image-making command shares (CompVis' spellings and clean ones)."""
    p = sub.add_parser(name, help=help_text, description=description)
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="the prompt (or --prompt)")
    p.add_argument("--prompt", help="the prompt")
    p.add_argument("--negative-prompt", "--negative_prompt", default="", help="what the image should not show")
    p.add_argument("--from-file", "--from_file", help="a text file with one prompt per line")
    p.add_argument("--model", "--ckpt", help="a .safetensors/.ckpt checkpoint or a diffusers-layout folder "
                                            "(default: the small demo model that ships with stablediff)")
    p.add_argument("--outdir", default=f"outputs/{name}-samples", help="where samples/ and grids go")
    p.add_argument("--steps", "--ddim_steps", type=int, default=None,
                   help="sampling steps (default: the model's own: 1 for Turbo models, 4 for LCM ones, else 20)")
    p.add_argument("--sampler", default=None,
                   help=f"one of {SAMPLER_HELP} (default: the model's own, else DPM++ 2M Karras)")
    p.add_argument("--plms", action="store_true", help="same as --sampler plms")
    p.add_argument("--dpm", action="store_true", help="same as --sampler dpmpp_2m (Stability's SD 2 scripts)")
    p.add_argument("--schedule", default=None,
                   help="default (the model's own spacing), karras, exponential, trailing, leading or linspace "
                        "(default: the one in the sampler's name, else the model's own)")
    p.add_argument("--scale", "--cfg-scale", type=number, default=None,
                   help="classifier-free guidance scale (default: the model's own, else 7.5)")
    _guidance_interval_flag(p)
    p.add_argument("--ddim_eta", "--eta", type=number, default=None, help="noise of DDIM and ancestral samplers")
    p.add_argument("--clip-skip", type=int, default=1, help="1: the text encoder's usual layer; 2: the one before, ...")
    size = "the model's size" if name == "txt2img" else "the init image's, rounded down to a multiple of 8"
    p.add_argument("--H", "--height", type=int, dest="H", help=f"image height in pixels (default: {size})")
    p.add_argument("--W", "--width", type=int, dest="W", help=f"image width in pixels (default: {size})")
    p.add_argument("--C", type=int, default=4, help="latent channels (must be 4)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (must match the VAE: 8 for SD)")
    p.add_argument("--n_samples", "--batch-size", type=int, default=1, help="images per batch (1)")
    p.add_argument("--n_iter", type=int, default=1, help="batches (1)")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image; image i uses seed + i (default and -1: a random seed)")
    p.add_argument("--fixed_code", action="store_true", help="every batch starts from the same noise")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid")
    p.add_argument("--skip_save", action="store_true", help="do not save individual samples")
    p.add_argument("--precision", default="autocast", choices=("autocast", "full", "fp32", "fp16", "bf16"),
                   help="autocast: fp16 on CUDA, fp32 elsewhere")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--subseed", "--variation-seed", type=int, default=None,
                   help="variation seed: with --subseed-strength, image i's noise leans towards subseed + i's")
    p.add_argument("--subseed-strength", "--variation-strength", type=number, default=0.0,
                   help="0 keeps the seed's image, 1 gives the variation seed's (default 0)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA (kohya/A1111 or diffusers/PEFT file) at a weight (default 1); repeatable")
    p.add_argument("--lora-dir", help="where <lora:name:weight> in a prompt finds name.safetensors (searched recursively)")
    p.add_argument("--embeddings-dir", help="textual inversion files, used where a prompt names them by file name")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: minutes at the first step of each image size; on 2-core CPUs the "
                        "compiled steps measured no faster than eager ones (BENCHMARKS.md); for GPUs and long batches")
    p.add_argument("--max-pixels", type=int, default=checks.MAX_PIXELS,
                   help=f"the largest image allowed, width x height in pixels (default {checks.MAX_PIXELS}: 2048x2048); "
                        "raise it where the memory is there")
    p.add_argument("--from-png", metavar="PNG",
                   help="take the prompt and settings from a PNG's parameters (ours or AUTOMATIC1111's); flags given "
                        "as well win over them")
    _add_sdxl_flags(p)
    _add_finish_flags(p, "every image")
    _add_model_flags(p, "a separate VAE file (CompVis or diffusers layout) to decode and encode with")
    return p


def _add_sdxl_flags(p) -> None:
    g = p.add_argument_group("SDXL's size conditioning (default: original = target = the image's size, crop 0,0)")
    g.add_argument("--original-size", metavar="W,H", help="the size the model is told the source image had")
    g.add_argument("--target-size", metavar="W,H", help="the size the model is told to aim for")
    g.add_argument("--crop", metavar="LEFT,TOP", help="the crop the model is told was made (0,0: a centred subject)")
    g.add_argument("--aesthetic-score", type=number, default=None, help="the refiner's score for the prompt (6)")
    g.add_argument("--negative-aesthetic-score", type=number, default=None,
                   help="the refiner's score for the negative prompt (2.5)")


def _pair(text: str | None, flag: str) -> tuple[int, int] | None:
    """"W,H" (or "W x H") as two non-negative integers."""
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"{flag} {text}: give two whole numbers of pixels, as in {flag} 1024,1024")
    return int(parts[0]), int(parts[1])


def size_conditioning(args) -> dict:
    """model.size_conditioning from the SDXL flags: sizes as (height, width) and the crop as (top, left), as the model
    reads them."""
    out = {}
    for flag, key in (("--original-size", "original_size"), ("--target-size", "target_size"), ("--crop", "crop")):
        if (pair := _pair(getattr(args, key), flag)) is not None:
            out[key] = pair[::-1]
    for key in ("aesthetic_score", "negative_aesthetic_score"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    return out


def _add_image_flags(p, strength: float) -> None:
    p.add_argument("--init-img", "--init_img", required=True, help="the starting image")
    p.add_argument("--strength", type=number, default=strength,
                   help=f"how much to change it, 0..1: the last int(steps x strength) steps run (default {strength})")
    p.add_argument("--resize-mode", default="just-resize", choices=("just-resize", "crop-and-resize", "resize-and-fill"),
                   help="when the image is not the requested size")


def _add_refiner_flags(p) -> None:
    p.add_argument("--refiner", metavar="MODEL", help="a second model (SDXL's refiner) to run the steps after "
                                                      "--refiner-switch; loaded on the same device, in the same precision")
    p.add_argument("--refiner-switch", type=number, default=0.8,
                   help="the fraction of the schedule the main model runs before the refiner takes over (0.8)")


def _add_commands(sub) -> None:
    p = _add_generation(sub, "txt2img", "make images from a text prompt",
                        "Make images from a text prompt. CompVis' scripts/txt2img.py flags work too.")
    p.add_argument("--hires-scale", type=number, default=None,
                   help="hires fix: render at --W x --H, enlarge by this factor, then re-render (e.g. 2)")
    p.add_argument("--hires-steps", type=int, default=None, help="hires fix: steps of the second pass (default: --steps)")
    p.add_argument("--hires-denoise", type=number, default=0.7, help="hires fix: how much the second pass changes, 0..1 (0.7)")
    p.add_argument("--hires-upscaler", default="latent", choices=("latent", "latent-nearest", "lanczos"),
                   help="hires fix: enlarge the latents (default) or the decoded image with Lanczos")
    _add_refiner_flags(p)
    p = _add_generation(sub, "img2img", "re-render an image under a prompt",
                        "Re-render an image under a prompt (SDEdit). CompVis' scripts/img2img.py flags work too.")
    _add_image_flags(p, 0.75)
    _add_refiner_flags(p)
    p = _add_generation(sub, "depth2img", "re-render an image keeping its depth (SD 2 depth model)",
                        "Re-render an image under a prompt, keeping the scene's depth, with an SD 2 depth model.")
    _add_image_flags(p, 0.8)
    p.add_argument("--depth-map", help="a depth image (nearer = lighter or darker, any bit depth)")
    p.add_argument("--depth-model", help="a DPT/MiDaS model folder to estimate depth with (needs stablediff[depth])")
    p = _add_generation(sub, "inpaint", "repaint the masked part of an image",
                        "Repaint where the mask is white, with an inpainting model (9 channels) or any ordinary one.")
    _add_image_flags(p, 1.0)
    p.add_argument("--mask", required=True, help="white = repaint, black = keep")
    p.add_argument("--invert-mask", action="store_true", help="black = repaint instead")
    p.add_argument("--mask-blur", type=int, default=4, help="blur radius of the mask's edge in pixels (4)")
    p.add_argument("--fill", default="original", choices=("original", "fill", "latent-noise", "latent-nothing"),
                   help="what an ordinary model starts from inside the mask (AUTOMATIC1111's masked content)")
    p.add_argument("--only-masked", action="store_true", help="work on the mask's box at full size, then paste it back")
    p.add_argument("--padding", type=int, default=32, help="pixels around the mask's box with --only-masked (32)")
    p = _add_generation(sub, "upscale", "enlarge an image 4x with the SD x4 upscaler",
                        "Enlarge an image 4x with the Stable Diffusion x4 upscaler, guided by a prompt.")
    p.add_argument("--init-img", "--init_img", required=True, help="the image to enlarge")
    p.add_argument("--noise-level", type=int, default=20, help="noise added to the input, 0..350: more = more new detail")
    p.add_argument("--tile", type=int, default=128, help="larger inputs go in tiles of this many low-res pixels (128)")
    p.add_argument("--tile-overlap", type=int, default=32, help="overlap between tiles, blended (32)")
    p.set_defaults(scale=9.0)
    p = _add_generation(sub, "outpaint", "extend an image's canvas and paint the new border",
                        "Extend the canvas by left,right,up,down pixels and paint the new border to match the image.")
    p.add_argument("--init-img", "--init_img", required=True, help="the image to extend")
    p.add_argument("--extend", required=True, help="left,right,up,down in pixels, multiples of 8 (e.g. 0,128,0,0)")
    p.add_argument("--mask-blur", type=int, default=8, help="how far the new border fades into the seam (8)")


def _add_train(sub) -> None:
    from dataclasses import fields

    from stablediff.train.settings import Settings

    p = sub.add_parser("train", help="train a model of SD's architecture from scratch (the demo model's recipe)",
                       description="Train the VAE, then the text encoder to read captions, then the text encoder "
                                   "and UNet together, on the drawn shapes dataset; write one .safetensors in "
                                   "the original layout. Resumes from --work-dir.")
    p.add_argument("out", help="the .safetensors file to write (must not exist)")
    p.add_argument("--work-dir", help="checkpoints and cached latents, to resume from (default: OUT-work beside OUT)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    for f in fields(Settings):
        choices = {"precision": ("auto", "bf16", "fp32"), "dtype": ("fp16", "bf16", "fp32")}.get(f.name)
        kind = number if isinstance(f.default, float) else type(f.default)
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, choices=choices,
                       help=f"{Settings.help(f.name)} (default {f.default})")


def _add_finetune(sub) -> None:
    from dataclasses import fields

    from stablediff.train.settings import FINETUNE_HELP, FinetuneSettings

    p = sub.add_parser("finetune", help="fine-tune a checkpoint on your pictures: a LoRA or DreamBooth",
                       description="Teach --model the subject of the pictures in --images (NAME.txt captions beside "
                                   "them, N_name folders repeated N times, or --instance-prompt). lora: one .safetensors "
                                   "in kohya's layout with its ss_* metadata, for --lora here and for AUTOMATIC1111, "
                                   "ComfyUI and diffusers; dreambooth: the whole model, in its base's layout. "
                                   "--class-prompt adds DreamBooth's prior preservation to either. Rerun the same "
                                   "command to resume.")
    p.add_argument("out", help="the LoRA .safetensors, or the DreamBooth checkpoint, to write (must not exist)")
    p.add_argument("--model", "--ckpt", help="the checkpoint to fine-tune: a .safetensors/.ckpt file or a diffusers "
                                             "folder (default: the demo model)")
    p.add_argument("--images", required=True, help="the folder of pictures")
    p.add_argument("--method", choices=("lora", "dreambooth", "textual-inversion"), default="lora",
                   help="lora: a LoRA file (default); dreambooth: the UNet (and with --train-text-encoder the text "
                        "encoder) itself, written as a whole checkpoint (.safetensors/.ckpt, or a diffusers folder); "
                        "textual-inversion: an embedding (--token, --init-word, --vectors)")
    p.add_argument("--work-dir", help="checkpoints and class pictures, to resume from (default: OUT-work beside OUT)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                   help="DreamBooth: the dtype of the checkpoint written (default fp16)")
    for f in fields(FinetuneSettings):
        if f.name in ("method", "save_dtype"):
            continue
        if f.name == "ema":  # (its --no-ema is the base model's: raw weights, not EMA ones)
            p.add_argument("--ema", action="store_true", help=FINETUNE_HELP[f.name])
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=FINETUNE_HELP[f.name])
            continue
        if f.name in ("class_prompt", "sample_prompt"):  # repeatable
            p.add_argument(flag, action="append", default=[], help=FINETUNE_HELP[f.name])
            continue
        kind = {"instance_prompt": str, "token": str, "init_word": str, "epochs": int,
                "min_snr_gamma": number, "lr": number}.get(
            f.name, number if isinstance(f.default, float) else type(f.default))
        choices = {"precision": ("auto", "bf16", "fp16", "fp32"), "schedule": ("constant", "cosine"),
                   "optimizer": ("adamw", "adamw8bit"),
                   "embedding_format": ("a1111", "diffusers"), "lora_format": ("kohya", "peft")}.get(f.name)
        p.add_argument(flag, type=kind, default=f.default, choices=choices,
                       help=f"{FINETUNE_HELP[f.name]} (default {f.default})")
    _add_model_flags(p, "a separate VAE file to encode the pictures with")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval-demo", help="judge the demo model's pictures of held-out prompts by their pixels",
                       description="Render held-out prompts and report per-attribute accuracy (background, colour, "
                                   "shape, position, size) judged from the pixels.")
    p.add_argument("--model", help="a model trained on the shapes (default: the shipped demo model)")
    p.add_argument("--n", type=int, default=100, help="held-out prompts (100)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (20)")
    p.add_argument("--sampler", default="DPM++ 2M", help="sampler (DPM++ 2M)")
    p.add_argument("--scale", type=number, default=5.0, help="guidance scale (5)")
    _guidance_interval_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the first image (0)")
    p.add_argument("--outdir", help="also write each image with its prompt and what was judged in the name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def _add_watermark(sub) -> None:
    p = sub.add_parser("watermark", help="read the invisible watermark of images",
                       description="Read the invisible watermark (invisible-watermark's dwtDct, as CompVis' scripts and "
                                   "--watermark embed it). Exit status 1 when an image does not hold the text.")
    p.add_argument("images", nargs="+", metavar="IMG", help="the images to read")
    p.add_argument("--text", default="StableDiffusionV1", help="the text to look for (default StableDiffusionV1)")
    p.add_argument("--length", type=int, default=None, metavar="BYTES",
                   help="read this many bytes whatever they are, instead of looking for --text")


_LIMIT_FLAGS = (("--max-queue", "max_queued", "jobs waiting in all"),
                ("--max-queue-per-user", "max_queued_per_user", "jobs waiting per user"),
                ("--max-pixels", "max_pixels", "pixels of an image"),
                ("--max-steps", "max_steps", "sampling steps of a job"),
                ("--max-images", "max_images", "images of a job (batch_size x n_iter)"),
                ("--max-batch", "max_batch", "images rendered together (jobs batched up to it)"),
                ("--max-prompt", "max_prompt", "characters of a prompt"),
                ("--max-upload", "max_upload", "bytes of a request"))


def _add_queue_flags(p, who: str, limits: tuple[str, ...]) -> None:
    """The flags `serve` and `worker` share: the queue, the models, how they render, and limits."""
    from stablediff.server.jobs import Limits

    p.add_argument("--db", "--state", dest="db", metavar="DB",
                   help="the queue: a SQLite file (default OUTDIR/queue.sqlite3) or a PostgreSQL address, "
                        "postgresql://USER:PASS@HOST/DATABASE, that servers and workers on other machines share")
    p.add_argument("--heartbeat-timeout", type=number, default=60, metavar="S",
                   help="a PostgreSQL queue: a worker not heard from for S seconds has its jobs run elsewhere (default 60)")
    p.add_argument("--model", "--ckpt", help=f"the default model {who} (default: the demo model)")
    p.add_argument("--models-dir", help="more models jobs may choose by file name (.safetensors, .ckpt, diffusers folders)")
    p.add_argument("--lora-dir", help="the LoRA files <lora:name:weight> may name")
    p.add_argument("--embeddings-dir", help="the textual inversion files prompts may name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="autocast", choices=("autocast", "full", "fp32", "fp16", "bf16"))
    _add_finish_flags(p, "every image of every job (users cannot turn it off)")
    defaults = Limits()
    for flag, name, help_text in _LIMIT_FLAGS:
        if name in limits:
            p.add_argument(flag, type=int, default=getattr(defaults, name), dest=name,
                           help=f"the most {help_text} (default {getattr(defaults, name)})")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP server: a job API under /v1 and AUTOMATIC1111's under /sdapi/v1",
                       description="Serve the model over HTTP, with a persistent queue (SQLite, or PostgreSQL shared "
                                   "with other servers and workers), progress, previews, cancel, authentication and "
                                   "limits. Binds 127.0.0.1 unless told otherwise.")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="the port (default 7860, as AUTOMATIC1111)")
    p.add_argument("--listen", action="store_true", help="bind every interface (0.0.0.0); needs --auth or --auth-file")
    p.add_argument("--outdir", default="outputs/server", help="images, uploads and the queue (default outputs/server)")
    p.add_argument("--no-worker", dest="render", action="store_false",
                   help="only queue and answer; `stablediff worker --db` processes render (needs a PostgreSQL --db)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                   help="a user for both APIs (HTTP Basic); repeatable; the password may hold ':'")
    p.add_argument("--auth-file", help="users, one USER:HASH[:admin] a line (hashes from --hash-password)")
    p.add_argument("--admin", action="append", default=[], metavar="USER", help="a user who sees every user's jobs")
    p.add_argument("--hash-password", action="store_true", help="read a password on stdin, print its hash for --auth-file")
    p.add_argument("--cors-allow-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="other origins whose pages may call this server (default: none)")
    _add_queue_flags(p, "", tuple(name for _, name, _ in _LIMIT_FLAGS))


def _add_worker(sub) -> None:
    p = sub.add_parser("worker", help="render the jobs of a shared PostgreSQL queue (servers elsewhere take them)",
                       description="Take jobs from the PostgreSQL queue that `stablediff serve --db` servers fill, "
                                   "render them and store their images there. Run one per GPU, on any machine that "
                                   "reaches the database; each takes only jobs of the models it has. Ctrl-C or "
                                   "SIGTERM puts the batch it is rendering back in the queue.")
    _add_queue_flags(p, "of this worker", ("max_pixels", "max_batch"))


def _add_batch(sub) -> None:
    p = sub.add_parser("batch", help="many jobs from a file, here or on a Ray cluster; a rerun does what is left",
                       description="Render every job of JOBS: a JSON Lines file (an object a line with the parameters "
                                   "/v1/jobs takes: prompt, negative_prompt, seed, width, height, sampler, steps, "
                                   "model, task, id, image paths relative to the file, ...) or a prompts file (a "
                                   "prompt a line). PNGs with their infotext go to OUTDIR (a folder, or any URI "
                                   "pyarrow reaches: s3://...), named by the job's id, then OUTDIR/jobs/ID.json; "
                                   "OUTDIR/manifest.jsonl lists every job at the end. A rerun skips what is done; a "
                                   "job that fails is recorded with its reason and the rest go on.")
    p.add_argument("jobs", metavar="JOBS", help="a .jsonl file of jobs, or a text file of prompts")
    p.add_argument("--outdir", required=True, help="where the images and the manifest go (a folder or a URI)")
    p.add_argument("--seeds", type=batch_seeds, metavar="LIST", help="every line once per seed: 1,2,10-19")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (needs stablediff[ray]): the one `ray start` made on this machine, or "
                        "ADDRESS (HOST:PORT, or ray://HOST:10001); an actor per GPU, or per node without GPUs")
    p.add_argument("--actors", type=int, metavar="N", help="with --ray: this many actors (default: one per GPU or node)")
    p.add_argument("--cpus-per-actor", type=number, metavar="C",
                   help="with --ray: CPUs each actor takes (and its torch threads, without GPUs; default: an equal share)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch's CPU threads in each renderer (default: torch's own here, the actor's CPUs on Ray); "
                        "equal pixels on the CPU need equal counts: sums split over other thread counts differ in "
                        "the last bit")
    p.add_argument("--model", "--ckpt", help="the model jobs that name none use (default: the demo model)")
    p.add_argument("--models-dir", help="more models jobs may name by file name")
    p.add_argument("--lora-dir", help="the LoRA files <lora:name:weight> may name")
    p.add_argument("--embeddings-dir", help="the textual inversion files prompts may name")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="autocast", choices=("autocast", "full", "fp32", "fp16", "bf16"))


def batch_seeds(text: str) -> list[int]:
    from stablediff.batch import parse_seeds

    try:
        return parse_seeds(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def batch(args) -> int:
    from stablediff.api import DEMO_MODEL
    from stablediff.batch import read_jobs, run

    model = Path(args.model) if args.model else DEMO_MODEL
    if not model.exists():
        raise UserError(f"model {model} not found: pass --model with a .safetensors/.ckpt file or a diffusers folder")
    if args.ray is None and (args.actors or args.cpus_per_actor):
        raise UserError("--actors and --cpus-per-actor are for --ray")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: give 1 or more")
    jobs = read_jobs(Path(args.jobs), args.seeds)
    renderer = {"model": str(model), "models_dir": args.models_dir, "device": args.device, "dtype": args.precision,
                "lora_dir": args.lora_dir, "embeddings_dir": args.embeddings_dir, "threads": args.threads}
    counts = run(jobs, args.outdir, renderer, ray_address=args.ray or None, use_ray=args.ray is not None,
                 actors=args.actors, cpus_per_actor=args.cpus_per_actor)
    print(f"stablediff batch: {counts['done']} rendered, {counts['skipped']} done before, {counts['failed']} failed "
          f"(reasons in {args.outdir}/manifest.jsonl)" if counts["failed"] else
          f"stablediff batch: {counts['done']} rendered, {counts['skipped']} done before", file=sys.stderr)
    return 1 if counts["failed"] else 0


def serve(args) -> None:
    import getpass

    if args.hash_password:
        from stablediff.server.auth import hash_password

        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass("password: ")
        print(hash_password(password))
        return
    try:
        import uvicorn

        from stablediff.server.app import create_app
    except ImportError as e:
        raise UserError(f"the server needs the {e.name} package, one of stablediff's requirements: pip install "
                        "stablediff again") from None
    config, host = _server_config(args)
    print(f"stablediff: serving {config.model.name} on http://{host}:{args.port} (open it in a browser; API docs at "
          "/docs)" + ("; every image screened by the safety checker" if config.safety_checker else "") +
          ("" if config.render else "; `stablediff worker` processes render its jobs"), file=sys.stderr)
    if config.safety_checker is None and config.users.enabled:
        print("stablediff: note: other people can use this server and its images are not screened: "
              "--safety-checker PATH screens them (see the README)", file=sys.stderr)
    uvicorn.run(create_app(config), host=host, port=args.port, log_level="warning")


def worker(args) -> int:
    from stablediff.server.app import make_worker
    from stablediff.server.jobs import find_models
    from stablediff.server.store import open_store

    config = _queue_config(args, Path("."))
    if not (config.db or "").startswith(("postgresql://", "postgres://")):
        raise UserError("stablediff worker needs the shared queue: --db postgresql://USER:PASS@HOST/DATABASE (the one "
                        "the servers were given)")
    store = open_store(config.db, Path("."), config.heartbeat_timeout)
    models = find_models(config.model, config.models_dir)
    work = make_worker(store, models, config)
    work.start()
    print(f"stablediff worker {work.id}: taking jobs for {', '.join(models)}", file=sys.stderr)
    try:
        while work.thread.is_alive():
            work.thread.join(1)
    except KeyboardInterrupt:
        work.stop()
        print("stablediff worker: stopped; the jobs it was rendering went back to the queue", file=sys.stderr)
    finally:
        store.close()
    return 0


def _queue_config(args, outdir: Path, **more):
    """The configuration `serve` and `worker` share, from their flags, checked."""
    from stablediff.api import DEMO_MODEL
    from stablediff.server.app import ServerConfig
    from stablediff.server.jobs import Limits

    model = Path(args.model) if args.model else DEMO_MODEL
    if not model.exists():
        raise UserError(f"model {model} not found: pass --model with a .safetensors/.ckpt file or a diffusers folder")
    if args.heartbeat_timeout <= 0:
        raise UserError(f"--heartbeat-timeout {args.heartbeat_timeout}: give a number of seconds above 0")

    def folder(value):
        return Path(value) if value else None
    limits = Limits(**{name: getattr(args, name) for name in vars(Limits()) if hasattr(args, name)})
    return ServerConfig(model=model, outdir=outdir, db=args.db, models_dir=folder(args.models_dir),
                        lora_dir=folder(args.lora_dir), embeddings_dir=folder(args.embeddings_dir), device=args.device,
                        dtype=args.precision, limits=limits, safety_checker=_server_checker(args, model),
                        watermark=args.watermark, heartbeat_timeout=args.heartbeat_timeout, **more)


def _server_config(args):
    """The server's configuration from its flags, checked: no other address than loopback without users."""
    import ipaddress

    from stablediff.server.auth import Users

    users = Users.from_options(args.auth, args.auth_file, args.admin)
    host = "0.0.0.0" if args.listen else args.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not users.enabled:
        raise UserError(f"refusing to serve {host} without authentication: add --auth USER:PASS or --auth-file F")
    if not args.render and not (args.db or "").startswith(("postgresql://", "postgres://")):
        raise UserError("--no-worker: then `stablediff worker` processes render, and they need a queue they share: "
                        "add --db postgresql://USER:PASS@HOST/DATABASE")
    try:
        Path(args.outdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--outdir {args.outdir}: cannot be made ({e.strerror or e})") from None
    return _queue_config(args, Path(args.outdir), users=users, cors_origins=tuple(args.cors_allow_origins),
                         render=args.render), host


def _server_checker(args, model: Path) -> Path | None:
    """The one safety checker for every model of the server: as given, or the default model folder's own; the
    watermark library is there if it is asked for. Checked before the server starts."""
    from stablediff.safety import check_watermark_text

    if args.watermark is not None:
        check_watermark_text(args.watermark)
    if args.safety_checker is None:
        return None
    path = model if args.safety_checker is True else Path(args.safety_checker)
    if args.safety_checker is True and not (model / "safety_checker").is_dir():
        raise UserError(f"--safety-checker: the model {model} has no safety_checker/ folder; give its path, "
                        "--safety-checker=PATH (a diffusers folder with safety_checker/, that folder, or its .safetensors)")
    if not path.exists():
        raise UserError(f"--safety-checker {path}: not found")
    return path


def _guidance_interval_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guidance-interval", nargs=2, type=sigma, metavar=("LOW", "HIGH"), default=None,
                   help="guide only at sigmas from LOW to HIGH, elsewhere the prompt alone (default: the model's "
                        "own, else every step; 0 inf guides every step)")


def _guidance_interval(args) -> tuple[float, float] | None:
    """--guidance-interval, checked (before the model loads)."""
    return None if args.guidance_interval is None else checks.guidance_interval(args.guidance_interval,
                                                                                "--guidance-interval got")


def _set_guidance_interval(model, interval: tuple[float, float] | None) -> None:
    if interval is not None:  # over the model's own
        model.sampling["guidance_interval"] = interval


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="stablediff", allow_abbrev=False, description="Stable Diffusion on your own machine.")
    parser.add_argument("--version", action="version", version=f"stablediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_commands(sub)
    _add_convert(sub)
    _add_info(sub)
    _add_train(sub)
    _add_finetune(sub)
    _add_eval(sub)
    _add_serve(sub)
    _add_worker(sub)
    _add_batch(sub)
    _add_watermark(sub)
    args = parser.parse_args(argv)
    if getattr(args, "from_png", None):  # the PNG's settings become defaults, so flags given still win
        sub.choices[args.command].set_defaults(**png_defaults(args.from_png, args.command))
        args = parser.parse_args(argv)
    return args


# infotext settings (pipelines.infotext.settings) -> the dest of the flag that sets them
_PNG_FLAGS = {"negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler", "schedule": "schedule",
              "scale": "scale", "seed": "seed", "width": "W", "height": "H", "clip_skip": "clip_skip", "eta": "ddim_eta",
              "subseed": "subseed", "subseed_strength": "subseed_strength", "hires_scale": "hires_scale",
              "hires_steps": "hires_steps", "hires_upscaler": "hires_upscaler", "mask_blur": "mask_blur",
              "noise_level": "noise_level", "prompt": "png_prompt"}


def png_defaults(path: str, command: str) -> dict:
    """The flag defaults that render a PNG's parameters again with `command`."""
    from PIL import Image

    from stablediff.pipelines.infotext import settings

    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except FileNotFoundError:
        raise UserError(f"--from-png {path}: no such file") from None
    except OSError as e:
        raise UserError(f"--from-png {path}: not an image Pillow can read ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--from-png {path}: the image has no generation parameters (no 'parameters' text chunk)")
    found = settings(text)
    out = {_PNG_FLAGS[k]: v for k, v in found.items() if k in _PNG_FLAGS}
    if "denoising_strength" in found:
        out["hires_denoise" if command == "txt2img" else "strength"] = found["denoising_strength"]
    if "guidance_interval" in found:
        out["guidance_interval"] = list(found["guidance_interval"])
    for key, value in found.get("size_conditioning", {}).items():  # back to the flags' W,H and LEFT,TOP
        out[key] = f"{value[1]},{value[0]}" if isinstance(value, tuple) else value
    if command != "txt2img":  # their size comes from the init image unless given
        out.pop("W", None), out.pop("H", None)
    out["png_model"] = found.get("model")
    return out


def read_prompts(args) -> list[str]:
    """The prompts to render, from --from-file, the command line or --from-png, without control characters."""
    if args.from_file:
        try:
            text = Path(args.from_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompts from {args.from_file}: {e}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"{args.from_file} has no prompts (one prompt per line)")
    else:
        if args.prompt is not None and args.prompt_pos is not None:
            raise UserError("give the prompt once: either positionally or with --prompt")
        prompt = next((p for p in (args.prompt, args.prompt_pos, getattr(args, "png_prompt", None)) if p is not None), None)
        if prompt is None:
            raise UserError('no prompt: stablediff txt2img "a photograph of an astronaut riding a horse"')
        prompts = [prompt]
    cleaned = [checks.clean_prompt(p) for p in [*prompts, args.negative_prompt]]
    if removed := sum(n for _, n in cleaned):
        print(f"stablediff: note: removed {removed} control character(s) from the prompts (NUL, escape and the "
              "like have no place in a prompt or a PNG's text)", file=sys.stderr)
    args.negative_prompt = cleaned[-1][0]
    return [p for p, _ in cleaned[:-1]]


def make_grid(images, per_row: int, pad: int = 2):
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + per_row - 1) // per_row
    grid = Image.new("RGB", (per_row * (w + pad) + pad, rows * (h + pad) + pad))
    for i, image in enumerate(images):
        grid.paste(image, (pad + (i % per_row) * (w + pad), pad + (i // per_row) * (h + pad)))
    return grid


# flag: the task parameter (tasks.py) whose bounds it has; the dest is the same name unless CompVis' differs
_BOUNDED = {"--steps": "steps", "--n_samples": "batch_size", "--n_iter": "n_iter", "--clip-skip": "clip_skip",
            "--ddim_eta": "eta", "--subseed-strength": "subseed_strength", "--strength": "strength",
            "--mask-blur": "mask_blur", "--padding": "padding", "--noise-level": "noise_level", "--tile": "tile",
            "--tile-overlap": "overlap", "--hires-steps": "hires_steps"}
DESTS = {"batch_size": "n_samples", "eta": "ddim_eta", "overlap": "tile_overlap"}  # task parameter -> flag's dest


def _check_numbers(args) -> None:
    """Every number the image commands take, within its task parameter's bounds, before anything is loaded."""
    table = tasks.params(args.command)
    bounds = {flag: (DESTS.get(name, name), table[name].low, table[name].high)
              for flag, name in _BOUNDED.items() if name in table}
    bounds.update({"--n_rows": ("n_rows", 0, None), "--max-pixels": ("max_pixels", 1, None)})
    for flag, (dest, low, high) in bounds.items():
        value = getattr(args, dest, None)
        if value is not None and (value < low or (high is not None and value > high)):
            within = f"at least {low:g}" if high is None else f"from {low:g} to {high:g}"
            raise UserError(f"{flag} must be {within} (got {value:g})")
    for name in ("H", "W"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UserError(f"--{name} {value}: width and height must be positive multiples of 8")
    if args.C != 4:
        raise UserError(f"--C {args.C}: Stable Diffusion latents have 4 channels")
    if getattr(args, "tile_overlap", 0) >= getattr(args, "tile", 1):
        raise UserError(f"--tile-overlap {args.tile_overlap} must be smaller than --tile {args.tile}")
    size_conditioning(args)
    if getattr(args, "refiner", None):
        if not 0 < args.refiner_switch < 1:
            raise UserError(f"--refiner-switch must be between 0 and 1, the fraction of the steps the main model runs "
                            f"(got {args.refiner_switch:g})")
        if getattr(args, "hires_scale", None) is not None:
            raise UserError("--refiner and the hires fix (--hires-scale) do not go together yet: use one of them")
        if not Path(args.refiner).exists():
            raise UserError(f"--refiner {args.refiner}: no such file or folder")


def batches(prompts: list[str], args, seed: int):
    """(prompts, seeds) per batch, in file order, n_iter times; image j overall uses seed + j."""
    chunks = [prompts[i:i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
    if len(prompts) == 1:
        chunks = [prompts * args.n_samples]
    j = 0
    for _ in range(args.n_iter):
        for chunk in chunks:
            yield chunk, [seed + (i if args.fixed_code else j + i) for i in range(len(chunk))]
            j += len(chunk)


def _render(model, args, images: dict, prompts: list[str], seeds: list[int], callback):
    """One batch of the command's images."""
    shared = dict(seed=seeds, steps=args.steps, sampler=args.sampler_key, schedule=args.schedule_key, scale=args.scale,
                  eta=args.ddim_eta, clip_skip=args.clip_skip, subseed=args.subseed, subseed_strength=args.subseed_strength,
                  callback=callback)
    if args.command == "txt2img":
        return model.txt2img(prompts, args.negative_prompt, width=args.W or model.native_size,
                             height=args.H or model.native_size, hires=_hires(args), refiner=args.refiner_model,
                             **shared)
    if args.command == "upscale":
        return model.upscale(images["init"], prompts, args.negative_prompt, noise_level=args.noise_level, tile=args.tile,
                             overlap=args.tile_overlap, **shared)
    if args.command == "outpaint":
        return model.outpaint(images["init"], prompts, args.negative_prompt, extend=args.extend_px,
                              mask_blur=args.mask_blur, **shared)
    shared.update(width=args.W, height=args.H, strength=args.strength, resize_mode=args.resize_mode)
    if args.command == "img2img":
        return model.img2img(images["init"], prompts, args.negative_prompt, refiner=args.refiner_model, **shared)
    if args.command == "depth2img":
        return model.depth2img(images["init"], prompts, args.negative_prompt, depth_map=images.get("depth"),
                               depth_model=args.depth_model, **shared)
    return model.inpaint(images["init"], images["mask"], prompts, args.negative_prompt, fill=args.fill,
                         mask_blur=args.mask_blur, invert_mask=args.invert_mask, only_masked=args.only_masked,
                         padding=args.padding, **shared)


def _hires(args):
    from stablediff.pipelines.hires import Hires

    if getattr(args, "hires_scale", None) is None:
        return None
    hires = Hires(args.hires_scale, args.hires_steps, args.hires_denoise, args.hires_upscaler)
    hires.check()
    return hires


def _progress_steps(args) -> int:
    """Sampler steps per batch, for the progress bar."""
    return tasks.sampling_steps(args.command, {name: getattr(args, name, None)
                                               for name in ("steps", "strength", "hires_scale", "hires_steps")})


def _extend(args) -> tuple[int, int, int, int]:
    try:
        extend = tuple(int(v) for v in args.extend.split(","))
    except ValueError:
        extend = ()
    if len(extend) != 4 or min(extend) < 0:
        raise UserError(f"--extend {args.extend}: give four numbers of pixels, left,right,up,down (e.g. 0,128,0,0)")
    return extend


def _read_images(args) -> dict:
    """The command's input images, read before the model so that a bad path fails fast."""
    if args.command == "txt2img":
        return {}
    images = {"init": load_image(args.init_img)}
    if args.command == "inpaint":
        images["mask"] = load_image(args.mask, "L")
        if images["mask"].size != images["init"].size:
            print(f"note: the mask is {images['mask'].width}x{images['mask'].height} and the image "
                  f"{images['init'].width}x{images['init'].height}; the mask is resized to fit", file=sys.stderr)
    if args.command == "depth2img" and args.depth_map:
        images["depth"] = load_image(args.depth_map, "F")
    elif args.command == "depth2img" and not args.depth_model:
        from stablediff.pipelines.depth import NO_DEPTH_SOURCE

        raise UserError(NO_DEPTH_SOURCE)
    return images


def _check_size(args, images: dict, native: int | None = None) -> None:
    """The images the command will make, within --max-pixels and large enough for --watermark; txt2img's default size
    is the model's (`native`, once it is loaded)."""
    from stablediff.safety import check_watermark_size

    sizes = []
    if args.command == "txt2img" and ((args.W and args.H) or native):
        w, h = args.W or native, args.H or native
        sizes.append((w, h))
        if hires := _hires(args):
            sizes.append(hires.size(w, h))
    elif "init" in images:
        w, h = images["init"].size
        if args.command == "upscale":
            sizes.append((w * 4, h * 4))
        elif args.command == "outpaint":
            left, right, up, down = args.extend_px
            sizes.append((w // 8 * 8 + left + right, h // 8 * 8 + up + down))
        else:
            sizes.append((args.W or w // 8 * 8, args.H or h // 8 * 8))
    for width, height in sizes:
        checks.check_pixels(width, height, args.max_pixels)
    if args.watermark is not None and sizes:
        check_watermark_size(*sizes[-1])


def _output_folder(outdir: str) -> Path:
    """The samples folder under --outdir, created, with a file written and removed there to prove it can be."""
    samples = Path(outdir) / "samples"
    try:
        samples.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=samples):
            pass
    except OSError as e:
        why = "it is a file" if Path(outdir).is_file() else e.strerror or str(e)
        raise UserError(f"--outdir {outdir}: cannot write images there ({why}); choose a folder you can write to") from None
    return samples


def _seeds(args, prompts: list[str]) -> int:
    """The first image's seed (-1 or none: a random one), checked for every image the command makes."""
    count = max(seed for _, seeds in batches(prompts, args, 0) for seed in seeds) + 1
    seed = checks.seeds(args.seed, count)[0]
    if args.subseed is not None:
        checks.seeds(args.subseed, count, "--subseed")
    return seed


def generate(args) -> None:
    """Every image-making command: batches, progress, numbered PNGs with their parameters, a grid. Every argument
    is checked before torch is imported, and the output folder before the model loads."""
    from stablediff.names import parse_sampler

    _check_numbers(args)
    prompts = read_prompts(args)
    args.sampler_key, args.schedule_key = parse_sampler("plms" if args.plms else "dpmpp_2m" if args.dpm else args.sampler,
                                                        args.schedule)
    if args.command == "outpaint":
        args.extend_px = _extend(args)
    _hires(args)
    interval = _guidance_interval(args)
    seed = _seeds(args, prompts)
    images = _read_images(args)
    _check_size(args, images)
    samples_dir = _output_folder(args.outdir)
    model = _load_for(args, prompts)
    if args.command == "txt2img" and not (args.W and args.H):
        _check_size(args, images, model.native_size)
    _set_guidance_interval(model, interval)
    print(f"seed: {seed}", file=sys.stderr)
    made = _render_all(model, args, images, prompts, seed, samples_dir)
    grid = None
    if not args.skip_grid:
        grid = make_grid(made, args.n_rows or args.n_samples)
        if args.watermark is not None:  # as CompVis' script marks its grids
            from stablediff.safety import stamp

            grid = stamp(grid, args.watermark)
        grid = write_png(grid, None, made[0].info.get("parameters"), samples_dir.parent, "grid-{:04d}.png")
    print(f"wrote {0 if args.skip_save else len(made)} image(s) to {samples_dir}" +
          ("" if grid is None else f" and a grid to {grid}"), file=sys.stderr)


def _load_for(args, prompts: list[str]):
    """The model, with its LoRAs and embeddings; a missing LoRA named in a prompt fails before it loads."""
    from stablediff.adapters.lora import take_tags
    from stablediff.api import StableDiffusion

    for prompt in prompts:
        take_tags(prompt, Path(args.lora_dir) if args.lora_dir else None)
    model = StableDiffusion.load(args.model, device=args.device, dtype="bf16" if args.bf16 else args.precision,
                                 embeddings_dir=args.embeddings_dir, lora_dir=args.lora_dir, loras=args.lora,
                                 compile=args.compile, **_finish_kwargs(args), **_load_kwargs(args))
    model.max_pixels = args.max_pixels
    model.size_conditioning = size_conditioning(args)
    args.steps = model.sampling["steps"] if args.steps is None else args.steps
    args.refiner_model = None
    if getattr(args, "refiner", None):
        from stablediff.pipelines.refiner import Refiner

        refiner = StableDiffusion.load(args.refiner, device=model.device, dtype=model.dtype,
                                       unsafe_pickle=args.unsafe_pickle)
        refiner.size_conditioning = model.size_conditioning
        args.refiner_model = Refiner(refiner, args.refiner_switch)
        args.refiner_model.check()
    if args.f is not None and args.f != model.vae_scale:
        raise UserError(f"--f {args.f}: this model's VAE downsamples by {model.vae_scale}")
    if getattr(args, "png_model", None) and args.png_model != model.name:
        print(f"stablediff: note: {args.from_png} was made with the model {args.png_model}; this is {model.name}",
              file=sys.stderr)
    return model


def _render_all(model, args, images: dict, prompts: list[str], seed: int, samples_dir: Path) -> list:
    """Every batch, each image written as it is made at the next number nobody else has taken."""
    from tqdm import tqdm

    made, steps = [], _progress_steps(args)
    for batch_prompts, seeds in batches(prompts, args, seed):
        with tqdm(total=steps, unit="step", desc="sampling", leave=False) as bar:
            batch = _render(model, args, images, batch_prompts, seeds, lambda *_: bar.update(1))
        for i, image in enumerate(batch):
            path = None if args.skip_save else write_png(image, None, image.info.get("parameters"), samples_dir, "{:05d}.png")
            _note_finish(image, path, len(made) + i + 1)
        made += batch
    return made


def _note_finish(image, path: Path | None, number: int) -> None:
    """What the safety checker and the watermark did to an image, where it is worth a line."""
    from stablediff.safety import FLAGGED

    which = f"{path}" if path is not None else f"image {number}"
    if image.info.get("nsfw"):
        print(f"stablediff: {which}: {FLAGGED}; written black", file=sys.stderr)
    if image.info.get("watermark") is False:
        print(f"stablediff: note: {which}: the watermark does not read back from this image (the library's dwtDct "
              "fails on large flat or saturated areas)", file=sys.stderr)


def watermark(args) -> int:
    """Read the invisible watermark of each image: 0 when every one holds the text, 1 otherwise."""
    from stablediff.safety import read_watermark

    if args.length is not None and args.length < 1:
        raise UserError(f"--length {args.length}: give a number of bytes, at least 1")
    if not args.text and not args.length:
        raise UserError("--text is empty: give the text to look for, or --length N to read N bytes")
    missing = 0
    for name in args.images:
        image = load_image(name)
        found = read_watermark(image, args.length or len(args.text.encode("utf-8")))
        if args.length:
            print(f"{name}: {found.decode('utf-8', errors='replace')!r}")
        elif found == args.text.encode("utf-8"):
            print(f"{name}: watermark {args.text!r}")
        else:
            missing += 1
            print(f"{name}: no {args.text!r} watermark (read {found.decode('utf-8', errors='replace')!r})")
    return 1 if missing else 0


def convert(args) -> None:
    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import convert as write

    spec = read_spec(Path(args.input), **_load_kwargs(args))
    fmt = write(spec, Path(args.output), args.format, args.dtype)
    print(f"wrote {args.output} ({fmt})", file=sys.stderr)


def info(args) -> None:
    import json

    from stablediff.api import read_spec
    from stablediff.checkpoints.convert import describe
    from stablediff.checkpoints.hashing import cached_hash, compute_hash

    path = Path(args.model)
    facts = describe(read_spec(path, **_load_kwargs(args)))
    if path.is_file():
        facts["model hash"] = compute_hash(path) if args.hash else cached_hash(path) or "not computed (--hash)"
    print(json.dumps(facts, indent=2))


def train(args) -> None:
    from dataclasses import fields

    from stablediff.devices import resolve_device
    from stablediff.train.recipe import train as run
    from stablediff.train.settings import Settings

    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "-work")
    summary = run(settings, out, work, resolve_device(args.device))
    loss = summary["diffusion_loss"][-100:]
    print(f"wrote {out} (latent scale {summary['scale_factor']:.4f}; last 100 steps' mean loss "
          f"{sum(loss) / max(1, len(loss)):.4f}; seconds: " +
          ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()) + f"); checkpoints stay in {work}",
          file=sys.stderr)


def finetune(args) -> None:
    from dataclasses import fields

    from stablediff.api import DEMO_MODEL
    from stablediff.devices import resolve_device
    from stablediff.train.finetune import finetune as run
    from stablediff.train.settings import FinetuneSettings

    settings = FinetuneSettings(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                                   for f in fields(FinetuneSettings)})
    out = Path(args.out.rstrip("/"))
    work = Path(args.work_dir) if args.work_dir else out.with_name(out.stem + "-work")
    summary = run(Path(args.model) if args.model else DEMO_MODEL, Path(args.images), out, work, settings,
                  resolve_device(args.device), _load_kwargs(args))
    loss = summary["losses"][-50:]
    if not summary["main"]:  # (under accelerate launch: the main process writes and says so)
        return
    print(f"wrote {out} ({summary['parameters']:,} parameters trained; {summary['steps']} steps, "
          f"the last {len(loss)} steps' mean loss {sum(loss) / max(1, len(loss)):.4f}; {summary['seconds']:.0f} s); "
          f"checkpoints stay in {work}", file=sys.stderr)


def eval_demo(args) -> None:
    from stablediff.api import StableDiffusion
    from stablediff.demo.evaluate import ATTRIBUTES, evaluate, percent

    if args.n < 1 or args.steps < 1:
        raise UserError("--n and --steps must be at least 1")
    interval = _guidance_interval(args)
    model = StableDiffusion.load(args.model, device=args.device)
    _set_guidance_interval(model, interval)
    result = evaluate(model, args.n, args.steps, args.sampler, args.scale, args.seed)
    if args.outdir:
        outdir = Path(args.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for i, (image, prompt, judged) in enumerate(zip(result["images"], result["prompts"], result["judged"])):
            seen = "-".join(str(judged[a]) for a in ATTRIBUTES[:4]).replace(" ", "_")
            write_png(image, outdir / f"{i:03d}-{seen}.png", prompt)
    interval = model.sampling.get("guidance_interval")
    within = f" at sigmas {interval[0]:g} to {interval[1]:g}" if interval else ""
    print(f"{args.n} held-out prompts, {args.sampler}, {args.steps} steps, guidance {args.scale}{within}:")
    for name in ATTRIBUTES:
        print(f"  {name:<10} {percent(result['accuracy'][name])}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that it unwinds as after Ctrl-C: temporary files go, nothing is
    left half-written."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UserError as e:  # --from-png's file
        print(f"stablediff: error: {e}", file=sys.stderr)
        return 2
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    try:
        commands = {"convert": convert, "info": info, "train": train, "finetune": finetune, "eval-demo": eval_demo,
                    "serve": serve, "worker": worker, "batch": batch, "watermark": watermark}
        status = commands.get(args.command, generate)(args)
        sys.stdout.flush()
    except UserError as e:
        print(f"stablediff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kept = ("the last checkpoint was kept: run the same command to resume" if args.command in ("train", "finetune")
                else "finished images were kept")
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"stablediff: {what}; {kept}, nothing half-written", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # `stablediff info X | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (MemoryError, RuntimeError) as e:
        if (line := out_of_memory(e)) is None:
            raise
        print(f"stablediff: error: {line}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
