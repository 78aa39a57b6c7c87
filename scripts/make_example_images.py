"""Draws the small input images the bridge example workflows load (example_workflows/input/), so a
new user can run them before finding images of their own. Deterministic; run from the repository root:

    python scripts/make_example_images.py

- handbag.png: a drawn handbag on white (the edges -> handbag and the encode / morph examples turn it
  into an edge map first, as the edges2handbags model was trained);
- photo.png: a drawn outdoor scene (the ImageNet centre-inpainting example masks its centre);
- normals.png: a normal map of a sphere on a ground plane before a wall, RGB = (n + 1) / 2 (the DIODE example).
They are drawings, not photos: the models' outputs on them show what the nodes do, not their best.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "example_workflows" / "input"
SIZE = 256


def handbag() -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    d.arc((78, 30, 178, 130), 180, 360, fill=(90, 50, 25), width=9)  # handle
    d.polygon([(60, 92), (196, 92), (222, 222), (34, 222)], fill=(150, 85, 40), outline=(80, 40, 15))  # body
    d.line([(48, 150), (208, 150)], fill=(110, 60, 25), width=4)  # seam
    d.rectangle((116, 140, 140, 162), fill=(215, 185, 80), outline=(120, 95, 30))  # clasp
    return img


def photo() -> Image.Image:
    y = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 230]) + y * np.array([200, 225, 250])
    arr = np.broadcast_to(sky, (SIZE, SIZE, 3)).copy()
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse((180, 30, 226, 76), fill=(250, 220, 120))  # sun
    d.polygon([(0, 170), (70, 110), (140, 165), (200, 120), (256, 160), (256, 256), (0, 256)], fill=(70, 120, 60))
    d.rectangle((0, 200, 256, 256), fill=(95, 150, 70))  # field
    d.ellipse((96, 150, 176, 214), fill=(200, 160, 90), outline=(120, 90, 40))  # a dog-coloured blob
    return img


def normals() -> Image.Image:
    n = np.zeros((SIZE, SIZE, 3))
    n[..., 1] = 1.0  # ground plane: normal up (y)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    cx, cy, r = 128.0, 120.0, 70.0
    dx, dy = (xx - cx) / r, (cy - yy) / r
    inside = dx**2 + dy**2 < 1
    n[inside] = np.stack([dx, dy, np.sqrt(np.clip(1 - dx**2 - dy**2, 0, 1))], -1)[inside]
    wall = yy < 60
    n[wall & ~inside] = (0.0, 0.0, 1.0)  # a wall facing the camera behind the sphere
    rgb = (n + 1) / 2
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


IMAGES = {"handbag.png": handbag, "photo.png": photo, "normals.png": normals}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in IMAGES.items():
        path = OUT / name
        tmp = path.with_suffix(".tmp.png")
        draw().save(tmp, optimize=True)
        tmp.replace(path)
        print(path, path.stat().st_size, "bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
