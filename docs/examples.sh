#!/usr/bin/env bash
# Makes the README's example images with the shipped demo model: each command exactly as the README shows it.
# Run from the repository root: bash docs/examples.sh
set -euo pipefail
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
img=docs/images
last() { ls "$1"/samples/*.png | tail -1; }

stablediff txt2img "a yellow triangle on a purple background" --seed 1 --outdir "$out/t" --skip_grid
cp "$(last "$out/t")" $img/txt2img.png

stablediff img2img "a yellow circle on a purple background" --init-img $img/txt2img.png --strength 0.7 --seed 1 \
    --outdir "$out/i" --skip_grid
cp "$(last "$out/i")" $img/img2img.png

python - <<'PY'
from PIL import Image, ImageDraw
from stablediff.demo.shapes import Scene, draw
draw(Scene("square", "red", "blue", "large", "left", 0.3, 0.5, 0.18)).save("docs/images/scene.png")
mask = Image.new("L", (64, 64), 0)
ImageDraw.Draw(mask).rectangle((4, 12, 36, 52), fill=255)
mask.save("docs/images/mask.png")
PY
stablediff inpaint "a green circle on the left on a blue background" --init-img $img/scene.png --mask $img/mask.png \
    --fill latent-noise --seed 2 --outdir "$out/p" --skip_grid
cp "$(last "$out/p")" $img/inpaint.png

stablediff outpaint "a red square on a blue background" --init-img $img/scene.png --extend 0,32,0,0 --seed 1 \
    --outdir "$out/o" --skip_grid
cp "$(last "$out/o")" $img/outpaint.png
ls -la $img
