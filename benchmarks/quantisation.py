"""Speed and quality of the TFLite precisions (fp32, fp16, int8 calibrated, int8 dynamic-range) in one run.

    python benchmarks/quantisation.py ../shared/data/clothing/images [--limit 1500]

Quality is measured against fp32 vectors of the same images: cosine per image, top-10 neighbour overlap, and the
agreement of the near-duplicate pairs at the default threshold (Jaccard of the pair sets).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from simsearch.dedup.finder import DEFAULT_THRESHOLD
from simsearch.dedup.graph import similar_pairs
from simsearch.images import find_images, load_image
from simsearch.models.backbones import load_backbone
from simsearch.models.embedder import DEFAULT_FIT, Embedder, l2_normalise


def run(engine, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, float]:
    engine(x[:batch])
    t = time.perf_counter()
    out = np.concatenate([engine(x[i : i + batch]) for i in range(0, len(x), batch)])
    return l2_normalise(out), len(x) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=1500)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--calibration", type=int, default=64, help="Images for int8 calibration (not evaluated).")
    args = ap.parse_args()
    paths = list(find_images(args.folder))
    if len(paths) < args.calibration + 20:
        print("not enough images", file=sys.stderr)
        return 1
    calib, paths = paths[-args.calibration :], paths[: min(args.limit, len(paths) - args.calibration)]
    bb = load_backbone(args.backbone)
    x = bb.preprocess(np.stack([load_image(p, bb.input_size, DEFAULT_FIT) for p in paths]))
    rows = []
    ref = None
    for label, precision, rep in (("fp32", "fp32", None), ("fp16", "fp16", None),
                                  ("int8", "int8", calib), ("int8-dynamic", "int8", None)):  # fmt: skip
        emb = Embedder(bb, precision=precision, representative=rep, engine="tflite")
        vecs, rate = run(emb.engine, x)
        if emb.engine_name.endswith("-native"):  # float16 arithmetic on this CPU, not float16 weights only
            label += " native"
        if ref is None:
            ref = vecs
            index = faiss.IndexFlatIP(ref.shape[1])
            index.add(ref)
            _, ref_nn = index.search(ref, 11)
            ri, rj, _ = similar_pairs(ref, DEFAULT_THRESHOLD)
            ref_pairs = set(zip(ri.tolist(), rj.tolist(), strict=True))
        cos = np.sum(vecs * ref, axis=1)
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        _, nn = index.search(vecs, 11)
        overlap = np.mean([len(set(a[1:]) & set(b[1:])) / 10 for a, b in zip(nn, ref_nn, strict=True)])
        i, j, _ = similar_pairs(vecs, DEFAULT_THRESHOLD)
        pairs = set(zip(i.tolist(), j.tolist(), strict=True))
        jac = len(pairs & ref_pairs) / max(1, len(pairs | ref_pairs))
        rows.append({"precision": label, "img_s": round(rate, 1), "cos_mean": round(float(cos.mean()), 5),
                     "cos_min": round(float(cos.min()), 4), "top10_overlap": round(float(overlap), 4),
                     "dup_pairs": len(pairs), "dup_pairs_jaccard": round(jac, 4)})  # fmt: skip
    print(f"{len(paths)} images, {args.backbone}, model-only TFLite on pre-decoded inputs, 2 threads")
    print(f"{'precision':<13}{'img/s':>8}{'cos mean':>10}{'cos min':>9}{'top10':>8}{'pairs@T':>9}{'Jaccard':>9}")
    for r in rows:
        print(f"{r['precision']:<13}{r['img_s']:>8.1f}{r['cos_mean']:>10.5f}{r['cos_min']:>9.4f}"
              f"{r['top10_overlap']:>8.4f}{r['dup_pairs']:>9}{r['dup_pairs_jaccard']:>9.4f}")  # fmt: skip
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
