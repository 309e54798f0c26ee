"""Measure what the defaults are chosen from: fit (resize vs centre crop) and the near-duplicate threshold.

    python benchmarks/dedup_quality.py ../shared/data/clothing [--edits 300] [--fits resize,crop]

On the clothing set (images/ plus rotated/) and our own generated edits of a sample of photos (JPEG quality 30,
50% resize, 90% centre crop, +30% brightness, a small text overlay) it prints, per fit:
- class-level retrieval: precision@10 of same-label neighbours (images.csv labels);
- pair-level precision/recall of near-duplicate detection at a grid of thresholds (positives: every pair of files
  of the same origin: an original, its edits, its exact copy or rotated copy; everything else is a negative);
- recall of the 25 rotated copies, without and with rotation-invariant matching.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from simsearch.dedup.graph import similar_pairs
from simsearch.models.embedder import Embedder

EDITS = ("q30", "half", "crop90", "bright", "text")
THRESHOLDS = (0.80, 0.82, 0.84, 0.86, 0.88, 0.90, 0.92, 0.94, 0.96)


def make_edits(src: Path, out: Path) -> list[Path]:
    with Image.open(src) as im:
        im = im.convert("RGB")
    w, h = im.size
    paths = []
    p = out / f"{src.stem}.q30.jpg"
    im.save(p, quality=30)
    paths.append(p)
    p = out / f"{src.stem}.half.jpg"
    im.resize((w // 2, h // 2), Image.BICUBIC).save(p, quality=90)
    paths.append(p)
    p = out / f"{src.stem}.crop90.jpg"
    dx, dy = int(w * 0.05), int(h * 0.05)
    im.crop((dx, dy, w - dx, h - dy)).save(p, quality=90)
    paths.append(p)
    p = out / f"{src.stem}.bright.jpg"
    ImageEnhance.Brightness(im).enhance(1.3).save(p, quality=90)
    paths.append(p)
    p = out / f"{src.stem}.text.jpg"
    t = im.copy()
    ImageDraw.Draw(t).text((10, h - 40), "© simsearch 2026", fill=(255, 255, 255), font=ImageFont.load_default(22))
    t.save(p, quality=90)
    paths.append(p)
    return paths


def rotated_copies(clothing: Path, images: list[Path]) -> list[Path]:
    """The rotated/ copies whose original is among `images`."""
    have = set(images)
    return [r for r in sorted((clothing / "rotated").glob("*.jpg")) if (clothing / "images" / r.name) in have]


def edit_set(clothing: Path, images: list[Path], n_edits: int, out: Path) -> tuple[list[Path], np.ndarray]:
    """Generated edits of a seeded sample of `images` (written to `out`) and the origin of every file.

    Returns (edits, origin) where origin covers images + edits + rotated copies (see `rotated_copies`), in that
    order: the index in `images` of the photo each file comes from (byte-identical files share one origin).
    """
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(len(images), size=min(n_edits, len(images)), replace=False).tolist())
    edits, edit_origin = [], []
    for k in sample:
        for p in make_edits(images[k], out):
            edits.append(p)
            edit_origin.append(k)
    pos = {p.name: i for i, p in enumerate(images)}
    rotated = rotated_copies(clothing, images)
    origin = np.array(list(range(len(images))) + edit_origin + [pos[r.name] for r in rotated])
    exact = [r for r in csv.DictReader(open(clothing / "duplicates.csv")) if r["kind"] == "exact"]
    for r in exact:  # byte-identical files inside images/ share an origin
        a, b = Path(r["a"]).name, Path(r["b"]).name
        if a in pos and b in pos:
            origin[origin == pos[b]] = pos[a]
    return edits, origin


def embed_paths(emb: Embedder, paths: list[Path]) -> np.ndarray:
    out = np.zeros((len(paths), emb.dim), np.float32)
    pos = {str(p): i for i, p in enumerate(paths)}
    for batch in emb.embed_files([str(p) for p in paths]):
        for rec in batch:
            if rec.vector is None:
                raise SystemExit(f"cannot embed {rec.path}: {rec.error}")
            out[pos[rec.path]] = rec.vector
    return out


def precision_at_10(vecs: np.ndarray, labels: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    _, nn = index.search(vecs, 11)
    nn = nn[:, 1:]
    return float((labels[nn] == labels[:, None]).mean())


def pr_table(vecs: np.ndarray, origin: np.ndarray) -> list[dict]:
    i, j, s = similar_pairs(vecs, min(THRESHOLDS))
    same = origin[i] == origin[j]
    _, counts = np.unique(origin, return_counts=True)
    positives = int((counts * (counts - 1) // 2).sum())
    rows = []
    for t in THRESHOLDS:
        hit = s >= t
        tp, fp = int((hit & same).sum()), int((hit & ~same).sum())
        rows.append({"threshold": t, "tp": tp, "fp": fp, "positives": positives,
                     "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / positives, 4)})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clothing", type=Path)
    ap.add_argument("--edits", type=int, default=300, help="How many photos get generated edits.")
    ap.add_argument("--fits", default="resize,crop")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N photos of images/.")
    args = ap.parse_args()
    images = sorted((args.clothing / "images").glob("*.jpg"))[: args.limit]
    if not images:
        print(f"no images in {args.clothing / 'images'}", file=sys.stderr)
        return 1
    labels_by_id = {r["image"]: r["label"] for r in csv.DictReader(open(args.clothing / "images.csv"))}
    rotated = rotated_copies(args.clothing, images)
    results = {}
    with tempfile.TemporaryDirectory(prefix="simsearch-edits-") as tmp:
        edits, origin = edit_set(args.clothing, images, args.edits, Path(tmp))
        edit_origin = origin[len(images) : len(images) + len(edits)].tolist()
        pos = {p.name: i for i, p in enumerate(images)}
        for fit in args.fits.split(","):
            emb = Embedder(args.backbone, fit=fit)
            t = time.perf_counter()
            vecs = embed_paths(emb, images + edits + rotated)
            secs = time.perf_counter() - t
            n = len(images)
            labels = np.array([labels_by_id.get(p.stem, "?") for p in images])
            ok = ~np.isin(labels, ["Not sure", "Skip", "Other", "?"])
            p10 = precision_at_10(vecs[:n][ok], labels[ok])
            table = pr_table(vecs[: n + len(edits)], origin[: n + len(edits)])
            rot_scores = np.sum(vecs[n + len(edits) :] * vecs[[pos[r.name] for r in rotated]], axis=1)
            edit_scores = {
                e: np.round(
                    np.percentile(
                        np.sum(vecs[n : n + len(edits)][i::5] * vecs[np.array(edit_origin[i::5])], axis=1), [5, 50]
                    ),
                    3,
                )
                for i, e in enumerate(EDITS)
            }
            results[fit] = {"precision_at_10": round(p10, 4), "pr": table, "seconds": round(secs, 1),
                            "img_per_s": round(len(vecs) / secs, 1), "engine": emb.engine_name,
                            "rotated_scores_median": round(float(np.median(rot_scores)), 3),
                            "edit_score_p5_p50": {k: v.tolist() for k, v in edit_scores.items()}}  # fmt: skip
            print(f"\n== fit={fit}: {len(vecs)} images embedded in {secs:.1f} s ({len(vecs) / secs:.1f} img/s, "
                  f"{emb.engine_name})")  # fmt: skip
            print(f"class retrieval precision@10 (labelled photos): {p10:.4f}")
            print("edit -> original cosine, 5th percentile / median: "
                  + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in edit_scores.items()))  # fmt: skip
            print(f"rotated copies: median cosine to original {np.median(rot_scores):.3f}")
            print(
                f"{'threshold':>9} {'precision':>9} {'recall':>7} {'TP':>6} {'FP':>6} "
                f"(positives {table[0]['positives']})"
            )
            for r in table:
                print(f"{r['threshold']:>9.2f} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['tp']:>6} {r['fp']:>6}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
