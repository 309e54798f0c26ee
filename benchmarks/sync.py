"""Sync benchmark: full build vs no-op sync vs sync after changing 1% of the files, in one run.

    python benchmarks/sync.py ../shared/data/clothing/images [--limit N] [--backbone NAME]

The folder is copied to a temporary directory first (the 1% change rewrites files). Prints seconds per phase, the
ratios to the full build, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from simsearch.api import SimIndex
from simsearch.images import find_images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N images.")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--change", type=float, default=0.01, help="Fraction of files to change.")
    args = ap.parse_args()
    if not args.folder.is_dir():
        print(f"folder not found: {args.folder}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="simsearch-sync-") as tmp:
        work = Path(tmp) / "photos"
        work.mkdir()
        files = list(find_images(args.folder))[: args.limit]
        for f in files:
            shutil.copy2(f, work / f.name)
        index = Path(tmp) / "index"

        t = time.perf_counter()
        idx = SimIndex.create(index, backbone=args.backbone, engine=args.engine)
        model_s = time.perf_counter() - t
        full = idx.add_folder(work)
        noop = idx.add_folder(work)

        changed = sorted(work.iterdir())[:: max(1, int(round(1 / args.change)))]
        for f in changed:
            with Image.open(f) as im:
                im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(f, format="JPEG", quality=85)
        one = idx.add_folder(work)
        idx.close()

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "images": full.total,
        "model_build_s": round(model_s, 2),
        "full_s": round(full.seconds, 2),
        "full_img_per_s": round(full.embedded / full.seconds, 1),
        "noop_s": round(noop.seconds, 3),
        "noop_ratio": round(noop.seconds / full.seconds, 4),
        "changed_files": len(changed),
        "change_s": round(one.seconds, 3),
        "change_ratio": round(one.seconds / full.seconds, 4),
        "change_reembedded": one.embedded,
        "peak_rss_mib": round(rss),
        "engine": idx.embedder.engine_name,
    }
    print(f"images:               {res['images']} ({args.backbone}, engine {res['engine']})")
    print(f"full build:           {res['full_s']:.2f} s ({res['full_img_per_s']} img/s; model build {model_s:.1f} s)")
    print(f"no-op sync:           {res['noop_s']:.3f} s = {100 * res['noop_ratio']:.2f}% of full (target < 5%)")
    print(f"sync after {len(changed)} changes: {res['change_s']:.3f} s = {100 * res['change_ratio']:.2f}% of full "
          f"(target < 10%); re-embedded {one.embedded}")  # fmt: skip
    print(f"peak RSS:             {res['peak_rss_mib']} MiB")
    print(json.dumps(res))
    ok = res["noop_ratio"] < 0.05 and res["change_ratio"] < 0.10 and one.embedded == len(changed)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
