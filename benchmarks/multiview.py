"""Multi-view object sets for the transfer benchmark, split by object (evaluated objects are never trained on).

    python benchmarks/multiview.py synthetic ../shared/data/clothing OUT [--train-items 400 --test-items 150]
    python benchmarks/multiview.py covers ../shared/data/covers OUT [--train-objects 25]

- `synthetic` (synthetic viewpoints of real photos): each clothing photo is one "object"; its folder holds the photo
  itself (view 00, the clean "scan") and `--views - 1` synthetic phone photos of it made by
  `instance.phone_photo` (partial view, rotation, perspective, scale, glare, pasted on another clothing photo as
  clutter, JPEG q60-80). OUT/train/<item>/ and OUT/test/<item>/ hold disjoint items; backgrounds of the test
  photos come from test items only, so no test pixel is in the training set.
- `covers` (real): 50 objects, a clean reference scan plus 4 phone photos each; the first `--train-objects`
  (seeded shuffle) go to OUT/train, the rest to OUT/test, as symlinks (nothing is copied).

- `clothing` (real, class-level): the clothing set's labelled photos (without "Not sure", "Skip", "Other") as
  OUT/train/<label>/ and OUT/test/<label>/ symlinks; `--split labels` puts 4 whole labels (seeded) in test,
  `--split images` 20% of every label's photos.

Labels are the first-level subfolders, as `simsearch train` and `simsearch eval` read them.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from instance import phone_photo  # noqa: E402


def synthetic(clothing: Path, out: Path, train_items: int, test_items: int, views: int, seed: int) -> None:
    """Write OUT/{train,test}/<item>/NN.jpg: each item's own photo resized (00) and `views - 1` phone photos."""
    twins = {Path(r[k]).name for r in csv.DictReader(open(clothing / "duplicates.csv")) for k in ("a", "b")}
    images = sorted(p for p in (clothing / "images").glob("*.jpg") if p.name not in twins)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(images), train_items + test_items, replace=False)
    parts = {"train": [images[i] for i in pick[:train_items]], "test": [images[i] for i in pick[train_items:]]}
    for part, items in parts.items():
        for n, p in enumerate(items):
            d = out / part / p.stem[:12]
            d.mkdir(parents=True, exist_ok=True)
            with Image.open(p) as im:
                scan = im.convert("RGB")
            s = 640 / max(scan.size)
            small = scan.resize((round(scan.size[0] * s), round(scan.size[1] * s)), Image.BILINEAR)
            small.save(d / "00.jpg", quality=90)
            for v in range(1, views):
                b = items[int(rng.integers(len(items)))]
                if b == p:
                    b = items[(items.index(p) + 1) % len(items)]
                with Image.open(b) as bg:
                    phone_photo(scan, bg, rng).save(d / f"{v:02d}.jpg", quality=int(rng.integers(60, 81)))
            if n % 50 == 0:
                print(f"{part}: {n}/{len(items)}", flush=True)


def covers(root: Path, out: Path, train_objects: int, seed: int) -> None:
    """Symlink OUT/{train,test}/<object>/<device>.jpg from the covers set, split by object."""
    names = sorted(p.name for p in (root / "Reference").glob("*.jpg"))
    order = np.random.default_rng(seed).permutation(len(names))
    for rank, i in enumerate(order):
        part = "train" if rank < train_objects else "test"
        d = out / part / Path(names[i]).stem
        d.mkdir(parents=True, exist_ok=True)
        for dev in sorted(x for x in root.iterdir() if x.is_dir()):
            src = dev / names[i]
            if src.is_file():
                (d / f"{dev.name}.jpg").symlink_to(src.absolute())


def clothing(root: Path, out: Path, split_by: str, seed: int) -> None:
    """Symlink the clothing set's labelled photos into OUT/{train,test}/<label>/, split by labels or by images."""
    rows = [(root / "images" / f"{r['image']}.jpg", r["label"]) for r in csv.DictReader(open(root / "images.csv"))
            if r["label"] not in {"Not sure", "Skip", "Other"}]  # fmt: skip
    rows = [(p, lab) for p, lab in rows if p.is_file()]
    rng = np.random.default_rng(seed)
    labels = sorted({lab for _, lab in rows})
    test_labels = set(rng.choice(labels, 4, replace=False).tolist()) if split_by == "labels" else set()
    for p, lab in rows:
        test = lab in test_labels if split_by == "labels" else rng.random() < 0.2
        d = out / ("test" if test else "train") / lab.replace("/", "-")
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p.absolute())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["synthetic", "covers", "clothing"])
    ap.add_argument("--split", choices=["labels", "images"], default="labels")
    ap.add_argument("source", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train-items", type=int, default=400)
    ap.add_argument("--test-items", type=int, default=150)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--train-objects", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.out.exists():
        raise SystemExit(f"{a.out} exists")
    if a.kind == "synthetic":
        synthetic(a.source, a.out, a.train_items, a.test_items, a.views, a.seed)
    elif a.kind == "covers":
        covers(a.source, a.out, a.train_objects, a.seed)
    else:
        clothing(a.source, a.out, a.split, a.seed)


if __name__ == "__main__":
    main()
