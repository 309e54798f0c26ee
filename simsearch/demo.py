"""A self-contained demo folder: generated pictures plus edited copies (resized, re-encoded, cropped, brightened).

It lets a new user see real index, query and dedup output on a fresh machine with no photos and no internet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

N_SCENES = 24


def _scene(rng: np.random.Generator, size: tuple[int, int] = (640, 480)) -> Image.Image:
    w, h = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    sky = (top * (1 - t) + bottom * t).astype(np.uint8).repeat(w, axis=1)
    im = Image.fromarray(sky)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 14))):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(30, w // 2)), y0 + int(rng.integers(30, h // 2))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=color)
    return im


def make_demo_folder(folder: str | Path, seed: int = 7) -> Path:
    """Write the demo pictures into `folder` (created if needed) and return it."""
    folder = Path(folder)
    (folder / "edited").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(N_SCENES):
        _scene(rng).save(folder / f"scene-{i:02d}.jpg", quality=90)
    with Image.open(folder / "scene-00.jpg") as im:
        im.resize((320, 240), Image.BICUBIC).save(folder / "edited" / "scene-00-small.jpg", quality=85)
    with Image.open(folder / "scene-01.jpg") as im:
        im.save(folder / "edited" / "scene-01-q30.jpg", quality=30)
    with Image.open(folder / "scene-02.jpg") as im:
        im.crop((32, 24, 608, 456)).save(folder / "edited" / "scene-02-crop.jpg", quality=90)
    with Image.open(folder / "scene-03.jpg") as im:
        ImageEnhance.Brightness(im).enhance(1.3).save(folder / "edited" / "scene-03-bright.jpg", quality=90)
    (folder / "edited" / "scene-04-copy.jpg").write_bytes((folder / "scene-04.jpg").read_bytes())
    return folder
