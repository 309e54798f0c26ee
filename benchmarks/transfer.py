"""Transfer learning benchmark: off-the-shelf backbone vs a trained head vs fine-tuning, on held-out images.

    python benchmarks/transfer.py ../shared/data/clothing                 # labels from images.csv, both splits
    python benchmarks/transfer.py FOLDER --split labels --modes head       # any labelled folder (subfolders)
    python benchmarks/transfer.py ../shared/data/clothing --limit 2000 --split images   # ~1,600 training images

Each training runs `simsearch train ... --json` in a child process (its own wall time and peak RSS, VmHWM) with a
cold feature cache and the converted TFLite model already cached, as a user's second run would. The off-the-shelf row
is the base backbone scored on exactly the same held-out images (`val_map_before` of the same run).
For the clothing set the labels "Not sure", "Skip" and "Other" are left out: they are not classes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from child_rss import CLI, run

NOT_CLASSES = {"Not sure", "Skip", "Other"}


def clothing_csv(root: Path, out: Path, limit: int | None, seed: int) -> Path:
    """path,label CSV of the clothing set (from images.csv), optionally a stratified sample of `limit` images."""
    import numpy as np

    rows = []
    with open(root / "images.csv", newline="") as f:
        for r in csv.DictReader(f):
            p = root.absolute() / "images" / f"{r['image']}.jpg"
            if r["label"] not in NOT_CLASSES and p.is_file():
                rows.append((str(p), r["label"]))
    if limit and limit < len(rows):
        rng = np.random.default_rng(seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), limit, replace=False))]
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return out


class _Child:
    """Runs children and reads each one's own peak RSS (resource usage of that pid only)."""

    def __init__(self, tflite_cache: Path) -> None:
        self.tflite_cache = tflite_cache

    def env(self) -> dict[str, str]:
        cache = Path(tempfile.mkdtemp(prefix="simsearch-bench-cache-"))
        for f in self.tflite_cache.glob("*.tflite"):
            (cache / f.name).symlink_to(f)
        return {**os.environ, "SIMSEARCH_CACHE": str(cache)}

    def run(self, cmd: list[str]) -> tuple[dict, float, float]:
        env = self.env()
        try:
            out, wall, rss = run(cmd, env)
        finally:
            shutil.rmtree(env["SIMSEARCH_CACHE"], ignore_errors=True)
        return json.loads(out.strip().splitlines()[-1]), wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="labelled folder, or the clothing data set root (with images.csv)")
    ap.add_argument("--labels", type=Path, help="path,label CSV (default: subfolders, or clothing's images.csv)")
    ap.add_argument("--split", choices=["labels", "images", "both"], default="both")
    ap.add_argument("--modes", default="head,finetune", help="comma-separated: head, finetune")
    ap.add_argument("--limit", type=int, help="stratified sample of this many images (seeded)")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--loss", default="ms")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", default="", help="extra options for simsearch train, e.g. '--dim 128'")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="simsearch-transfer-"))
    labels = args.labels
    if labels is None and (args.folder / "images.csv").is_file():
        labels = clothing_csv(args.folder, tmp / "labels.csv", args.limit, args.seed)
    elif args.limit:
        raise SystemExit("--limit needs the clothing layout (images.csv)")
    # convert the base model once (not timed), so every run below finds it cached
    from simsearch import Embedder
    from simsearch.models.tflite_exec import default_cache_dir

    Embedder(args.backbone)
    child = _Child(default_cache_dir())
    splits = ["labels", "images"] if args.split == "both" else [args.split]
    rows = []
    for sp in splits:
        for mode in args.modes.split(","):
            out = tmp / f"model-{sp}-{mode}"
            cmd = [sys.executable, "-c", CLI, "train", str(args.folder), "--out", str(out),
                   "--backbone", args.backbone, "--mode", mode, "--split", sp, "--seed", str(args.seed),
                   "--loss", args.loss, "--json", *args.extra.split()]  # fmt: skip
            if labels is not None:
                cmd += ["--labels", str(labels)]
            if args.epochs:
                cmd += ["--epochs", str(args.epochs)]
            res, wall, rss = child.run(cmd)
            m = res["metrics"]
            base = {"split": sp, "train_images": res["split"]["train_images"],
                    "val_images": res["split"]["val_images"], "val_labels": res["split"]["val_labels"]}  # fmt: skip
            if not any(r["split"] == sp and r["mode"] == "off-the-shelf" for r in rows):
                rows.append({**base, "mode": "off-the-shelf", "map": m["val_map_before"],
                             "p_at_1": m["val_p_at_1_before"], "seconds": None, "rss_mib": None})  # fmt: skip
            rows.append({**base, "mode": mode, "map": m["val_map"], "p_at_1": m["val_p_at_1"],
                         "seconds": round(wall, 1), "rss_mib": round(rss), "best_epoch": res["best_epoch"],
                         "epochs": res["epochs"], "untrained_head_map": m.get("val_map_untrained_head"),
                         "warnings": res["warnings"]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"{'split':<8}{'mode':<15}{'train':>7}{'val':>6}{'val labels':>11}{'mAP':>8}{'rel':>8}{'P@1':>8}"
          f"{'time s':>9}{'RSS MiB':>9}")  # fmt: skip
    for r in rows:
        off = next(x for x in rows if x["split"] == r["split"] and x["mode"] == "off-the-shelf")
        rel = f"{(r['map'] / off['map'] - 1) * 100:+.1f}%" if r is not off else ""
        secs = f"{r['seconds']:.1f}" if r["seconds"] is not None else "-"
        rss = f"{r['rss_mib']}" if r["rss_mib"] is not None else "-"
        print(f"{r['split']:<8}{r['mode']:<15}{r['train_images']:>7}{r['val_images']:>6}{r['val_labels']:>11}"
              f"{r['map']:>8.4f}{rel:>8}{r['p_at_1']:>8.4f}{secs:>9}{rss:>9}")  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
