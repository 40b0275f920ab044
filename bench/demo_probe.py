"""Where the demo model's prompt-following fails: can the UNet learn a scene's layout from its conditioning?

Trains a fresh UNet of the demo config only at the noisiest timesteps (t in [--tmin, 999]), where the picture must
come from the conditioning alone, then judges the raw model's x0 prediction at t = 999 on 64 prompts that name a
position. What the UNet's cross-attention reads (--mode):
  text    the text encoder of the config, trained along (as `stablediff train` does)
  bag     only the text encoder's token + position embeddings (no transformer)
  oracle  one learned token per attribute (colour, shape, position, background): no text at all
  read    the text encoder after `stablediff train`'s caption-reading stage (--text-steps), then trained
          along at the recipe's joint rate, as `stablediff train` does

    python bench/demo_probe.py --work WORK_DIR [--config shapes-demo] [--mode text] [--steps 600] [--tmin 900]
                               [--text-steps 400]

WORK_DIR is a `stablediff train` work folder after its VAE stage (vae.pt and latents.pt). Prints the loss per 100
steps and the accuracies; --out saves the first 16 predictions as one strip.
"""
import argparse
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stablediff import prompts
from stablediff.checkpoints.original import (clip_from_yaml, config_text, parse_yaml, schedule_from_yaml,
                                             unet_from_yaml, vae_from_yaml)
from stablediff.demo.shapes import VOCABULARY, ShapesDataset, caption, judge, sample_scene
from stablediff.models.clip_text import ClipTextConfig, ClipTextModel
from stablediff.models.tokenizer import ClipTokenizer
from stablediff.models.unet import UNet
from stablediff.models.vae import AutoencoderKL
from stablediff.pipelines.common import to_uint8
from stablediff.train.objectives import init_fresh
from stablediff.train.recipe import latent_scale, train_text
from stablediff.train.settings import Settings

VOCAB = {k: VOCABULARY[k] for k in ("colour", "shape", "position", "background")}


class Conditioning(torch.nn.Module):
    """(B, tokens, width) context for scenes and their captions, in one of the three modes."""

    def __init__(self, mode: str, text_encoder: ClipTextModel):
        super().__init__()
        self.mode, self.text_encoder = mode, text_encoder
        width = text_encoder.config.width
        self.tokenizer = ClipTokenizer(max_len=text_encoder.config.max_len)
        self.table = torch.nn.ModuleDict({k: torch.nn.Embedding(len(v), width) for k, v in VOCAB.items()})
        for e in self.table.values():
            torch.nn.init.normal_(e.weight, std=1.0)

    def forward(self, scenes, captions):
        if self.mode == "oracle":
            return torch.stack([torch.stack([self.table[k].weight[VOCAB[k].index(getattr(s, k))] for k in VOCAB])
                                for s in scenes])
        ids = torch.tensor([prompts.chunks(self.tokenizer, c)[0][0] for c in captions])
        return self.text_encoder.embeddings(ids) if self.mode == "bag" else self.text_encoder(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--config", default="shapes-demo")
    parser.add_argument("--mode", default="text", choices=("text", "bag", "oracle", "read"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--tmin", type=int, default=900)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--text-steps", type=int, default=Settings.text_steps, help="the read mode's first stage")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    params = parse_yaml(config_text(args.config), args.config)
    unet = init_fresh(UNet(unet_from_yaml(params["unet_config"]["params"])))
    cond = Conditioning(args.mode, init_fresh(ClipTextModel(clip_from_yaml(params, ClipTextConfig()))))
    alphas = schedule_from_yaml(params).alphas_cumprod().float()
    latents = torch.load(args.work / "latents.pt", weights_only=True)
    mean, std = latents["mean"], latents["std"]
    scale = latent_scale(mean, std)
    data = ShapesDataset(len(mean), 0)
    groups = [{"params": [*unet.parameters(), *cond.table.parameters()]}]
    if args.mode == "read":  # as the recipe: CLIP's init, the caption-reading stage, then a lower joint rate
        settings = Settings(config=args.config, text_steps=args.text_steps)
        with tempfile.TemporaryDirectory() as work:
            train_text(cond.text_encoder, cond.tokenizer, data, settings, Path(work), torch.device("cpu"),
                       progress=False)
        cond.text_encoder.requires_grad_(True)
        groups.append({"params": list(cond.text_encoder.parameters()), "lr": settings.joint_text_lr})
    else:  # token embeddings at std 1: at CLIP's 0.02 a fresh text encoder gives every caption the same states
        torch.nn.init.normal_(cond.text_encoder.embeddings.token_embedding.weight, std=1.0)
        groups[0]["params"] += cond.text_encoder.parameters()
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        rng, g = random.Random(step), torch.Generator().manual_seed(step)
        index = [rng.randrange(len(data)) for _ in range(32)]
        z = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=g)) * scale
        t = torch.randint(args.tmin, 1000, (32,), generator=g)
        a, noise = alphas[t][:, None, None, None], torch.randn(z.shape, generator=g)
        context = cond([data.scenes[i] for i in index], [data.caption(i, rng) for i in index])
        pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t.float(), context)
        loss = F.mse_loss(pred, a.sqrt() * noise - (1 - a).sqrt() * z)  # v-prediction, as the demo config
        opt.zero_grad()
        loss.backward()
        opt.step()
        warmup.step()
        losses.append(loss.item())
    print(f"{args.mode}, {args.config}: {time.perf_counter() - start:.0f} s; loss per 100 steps:",
          [round(float(np.mean(losses[i:i + 100])), 3) for i in range(0, args.steps, 100)])

    vae = AutoencoderKL(replace(vae_from_yaml(params), scaling_factor=scale))
    vae.load_state_dict(torch.load(args.work / "vae.pt", weights_only=True)["ema"]["vae"])
    rng = random.Random(7)
    scenes = [sample_scene(rng, name_position=1.0) for _ in range(64)]
    with torch.no_grad():
        x = (1 - alphas[999]).sqrt() * torch.randn(64, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        v = unet(x, torch.full((64,), 999.0), cond(scenes, [caption(s) for s in scenes]))
        pixels = vae.decode((alphas[999].sqrt() * x - (1 - alphas[999]).sqrt() * v) / scale)
    images = [Image.fromarray(p) for p in to_uint8(pixels).numpy()]
    seen = [judge(im) for im in images]
    print({k: f"{np.mean([getattr(s, k) == j[k] for s, j in zip(scenes, seen)]):.0%}"
           for k in ("background", "colour", "shape", "position")})
    if args.out:
        strip = Image.new("RGB", (64 * 16, 64))
        for i, im in enumerate(images[:16]):
            strip.paste(im, (64 * i, 0))
        strip.save(args.out)


if __name__ == "__main__":
    main()
