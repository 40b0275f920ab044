"""How well the demo model draws what it is asked: held-out prompts judged by their pixels.

Runs `stablediff eval-demo`'s evaluation at the settings the issue names (100 held-out prompts, DPM++ 2M,
20 steps, guidance 5), at guidance 1 for comparison, and for a few samplers at 10 and 50 steps; then two
rows that bound the others: the same settings on prompts of the training combinations (what generalising to
the held-out ones costs), and the held-out scenes' own pictures through the VAE and back with no diffusion
(what the VAE lets the judge see). Appends the table to BENCHMARKS.md.

    python bench/demo_eval.py [--model FILE] [--n 100]
"""
import argparse
import sys
import time

from report import append, machine

from stablediff.api import StableDiffusion
from stablediff.demo.evaluate import ATTRIBUTES, evaluate, table_row, vae_round_trip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="default: the shipped demo model")
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args()
    model = StableDiffusion.load(args.model)
    runs = [("DPM++ 2M", 20, 5.0), ("DPM++ 2M", 20, 1.0)]
    runs += [(sampler, steps, 5.0) for sampler in ("DPM++ 2M", "Euler a", "DDIM") for steps in (10, 50)]
    measures = [(f"{sampler}, {steps} steps, guidance {scale:g}",
                 lambda sampler=sampler, steps=steps, scale=scale: evaluate(model, args.n, steps, sampler, scale))
                for sampler, steps, scale in runs]
    measures += [("training combinations: DPM++ 2M, 20 steps, guidance 5",
                  lambda: evaluate(model, args.n, 20, "DPM++ 2M", 5.0, held_out=False)),
                 ("held-out pictures through the VAE and back (no diffusion)", lambda: vae_round_trip(model, args.n))]
    rows = []
    for label, measure in measures:
        t = time.perf_counter()
        accuracy = measure()["accuracy"]
        rows.append(table_row(label, accuracy) + f" {time.perf_counter() - t:.0f} s |")
        print(rows[-1], flush=True)
    append("Demo model: held-out prompts judged by their pixels", [
        f"Machine: {machine()}.",
        f"Command: `python {' '.join(sys.argv)}`. Model: {model.name} ({args.model or 'shipped'}). {args.n} prompts "
        "from the colour/shape/background combinations held out of training, each naming a position, half a size; "
        "seeds 0..n-1, 64x64. Judged from pixels: background = the border's median colour, shape colour = the median "
        "of pixels far from it (nearest named colour), position = the shape's box centre by thirds, shape = how much "
        "of its box it fills, size = box side (only where the prompt names one). Time is for all n images."
        + (" Guidance applies at sigmas {:g} to {:g} (the model's default interval), the prompt alone below.".format(
            *model.sampling["guidance_interval"]) if "guidance_interval" in model.sampling else "") + "\n",
        "| run | " + " | ".join(ATTRIBUTES) + " | time |",
        "|---|" + "---|" * (len(ATTRIBUTES) + 1),
        *rows])


if __name__ == "__main__":
    main()
