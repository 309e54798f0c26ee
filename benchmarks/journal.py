"""What the write-ahead journal costs per file action: 10,000 files trashed with and without it, in one run.

Rows, each on a fresh library of N files indexed with 1280-d vectors (the default backbone's size):
- bare moves: makedirs + os.replace per file, then the same index update (the least any mover can do);
- before the journal: the previous `apply_plan` (undo manifest rewritten at most once a second), from git;
- journal: today's `apply_plan` (whole plan recorded and fsynced first, files marked done in batches);
and the undo of the journaled action. Median of --repeat runs, variants interleaved so drift hits them alike.

    python benchmarks/journal.py [--files 10000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simsearch.dedup.actions import apply_plan, plan_files, undo  # noqa: E402
from simsearch.index.store import IndexStore  # noqa: E402

SIG = {"backbone": "external", "weights": "external", "weights_digest": "external-bench", "input_size": 0,
       "pooling": "external", "dim": 1280, "fit": "external", "precision": "external"}  # fmt: skip
BEFORE = "1af22d2"  # the last commit without the journal


def make_library(root: Path, n: int) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(0)
    index = root / "idx"
    files = []
    for i in range(n):
        p = root / "photos" / f"y{i % 10}" / f"m{i % 12}" / f"img-{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.bytes(2048))
        files.append(str(p))
    store = IndexStore.create(index, SIG)
    store.acquire_lock()
    vecs = rng.standard_normal((n, 1280)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with store.transaction() as txn:
        for p, v in zip(files, vecs, strict=True):
            st = os.stat(p)
            txn.insert(p, st.st_size, st.st_mtime_ns, "0" * 64, 8, 8, v)
    store.save()
    store.close()
    os.sync()
    return index, files


def old_actions():
    """The previous actions module, loaded from git as a sibling of today's (same relative imports)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:simsearch/dedup/actions.py"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    spec = importlib.util.spec_from_loader("simsearch.dedup._actions_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "simsearch.dedup"
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, "actions_before.py", "exec"), mod.__dict__)
    return mod


def bare(index: Path, files: list[str]) -> None:
    with IndexStore.open(index) as store:
        plan = plan_files(files, "delete", None, store)
        store.acquire_lock()
        for src, dst in plan.moves:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        with store.transaction() as txn:
            txn.delete_paths(files)
        store.save()


def timed(variant: str, n: int, before) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        index, files = make_library(Path(d), n)
        t0 = time.perf_counter()
        undo_s = None
        if variant == "bare moves":
            bare(index, files)
        else:
            with IndexStore.open(index) as store:
                mod = before if variant == "before the journal" else None
                plan = (mod.plan_files if mod else plan_files)(files, "delete", None, store)
                manifest = (mod.apply_plan if mod else apply_plan)(plan, store)
        took = time.perf_counter() - t0
        assert not any(os.path.exists(f) for f in files[:: max(1, n // 100)])
        if variant == "journal":
            t1 = time.perf_counter()
            res = undo(manifest)
            undo_s = time.perf_counter() - t1
            assert res["restored"] == n and all(os.path.exists(f) for f in files)
        shutil.rmtree(d, ignore_errors=True)
    return took, undo_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    before = old_actions()
    variants = ["bare moves", "before the journal", "journal"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    undos: list[float] = []
    for _ in range(args.repeat):
        for v in variants:
            took, u = timed(v, args.files, before)
            times[v].append(took)
            if u is not None:
                undos.append(u)
    base = statistics.median(times["bare moves"])
    print(f"{args.files} files trashed, median of {args.repeat} (index update included)")
    print(f"{'variant':<22}{'seconds':>9}{'moves/s':>10}{'vs bare':>9}")
    for v in variants:
        s = statistics.median(times[v])
        print(f"{v:<22}{s:>9.2f}{args.files / s:>10.0f}{s / base:>8.2f}x")
    u = statistics.median(undos)
    print(f"{'undo (journal)':<22}{u:>9.2f}{args.files / u:>10.0f}")


if __name__ == "__main__":
    main()
