"""Dedup at scale through the index store: planted-group vectors added with `SimIndex.add_vectors`, then
`find_duplicates` in a fresh process (pairs read straight from the memory-mapped vector file, no copy).

    python benchmarks/dedup_store.py --n 1000000 --dim 1280 --index-type ivf

Each phase runs in its own process and reports its own wall time and peak RSS (VmHWM); the dedup phase checks
that every planted group lands in one found group and counts found groups that are not inside a planted one.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def peak_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return -1


def build(n: int, dim: int, path: Path, kind: str, groups: int) -> dict:
    from dedup_scale import make_vectors, plant_groups

    from simsearch.api import SimIndex
    from simsearch.index.store import IndexStore

    sig = {"backbone": "synthetic", "weights": "external", "weights_digest": "synthetic", "input_size": 0,
           "pooling": "external", "dim": dim, "fit": "external", "precision": "external"}  # fmt: skip
    v = make_vectors(n, dim, 0)
    planted = plant_groups(v, groups, 0, 0.92, 0.99)
    (path.parent / "planted.pkl").write_bytes(pickle.dumps([g.tolist() for g in planted]))
    t = time.perf_counter()
    SimIndex(IndexStore.create(path, sig, index_type=kind)).add_vectors([f"/v/{i}" for i in range(n)], v)
    return {"phase": "build", "seconds": round(time.perf_counter() - t, 1), "peak_rss_mib": peak_mib()}


def dedup(path: Path, threshold: float) -> dict:
    from simsearch.dedup.finder import find_duplicates
    from simsearch.index.store import IndexStore

    planted = [set(g) for g in pickle.loads((path.parent / "planted.pkl").read_bytes())]
    t = time.perf_counter()
    rep = find_duplicates(IndexStore.open(path), threshold)
    seconds = time.perf_counter() - t
    where = {int(f.rsplit("/", 1)[1]): k for k, g in enumerate(rep.groups) for f in g.files}
    found = sum(1 for g in planted if len({where.get(x, -1 - x) for x in g}) == 1)
    spurious = sum(1 for g in rep.groups if not any({int(f.rsplit("/", 1)[1]) for f in g.files} <= p for p in planted))
    return {"phase": "dedup", "seconds": round(seconds, 1), "groups": len(rep.groups), "planted_found": found,
            "planted": len(planted), "spurious": spurious, "peak_rss_mib": peak_mib()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--index-type", default="ivf")
    ap.add_argument("--groups", type=int, default=1000)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--phase", choices=["all", "build", "dedup"], default="all")
    ap.add_argument("--path", type=Path)
    args = ap.parse_args()
    if args.phase == "build":
        print(json.dumps(build(args.n, args.dim, args.path, args.index_type, args.groups)))
        return
    if args.phase == "dedup":
        print(json.dumps(dedup(args.path, args.threshold)))
        return
    work = Path(tempfile.mkdtemp(prefix="simsearch-dedup-store-"))
    try:
        base = [sys.executable, __file__, "--n", str(args.n), "--dim", str(args.dim), "--index-type",
                args.index_type, "--groups", str(args.groups), "--threshold", str(args.threshold),
                "--path", str(work / "idx")]  # fmt: skip
        for phase in ("build", "dedup"):
            out = subprocess.run([*base, "--phase", phase], capture_output=True, text=True, check=True).stdout
            row = {"n": args.n, "dim": args.dim, "type": args.index_type, **json.loads(out.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
