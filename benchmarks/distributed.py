"""Ray overhead and scaling model: local indexing vs `--ray local` with 1 and 2 workers, in one run.

    python benchmarks/distributed.py ../shared/data/clothing/images [--limit N] [--commit-n 20000]
    python benchmarks/distributed.py --merge 200000 [--dim 1280]
    python benchmarks/distributed.py ../shared/data/clothing/images --limit 1200 --nodes 2

Each configuration is the real CLI (`simsearch index FOLDER --index FRESH --json`) in a child process on a fresh
index; wall time includes process start, model load and (for Ray) starting Ray and its actors. The Ray indexes are
checked against the local one (same files, cosine per file). Then the serial parts on the driver are measured on
their own: planning (scan + stat), committing synthetic vectors through the store's transaction path (chunks of 256,
as sync does) and the final FAISS snapshot, and a scaling model for N nodes is printed and checked against the
measured runs. Prints readable lines and, last, one JSON line.

`--nodes 2` checks the scaling model on a real multi-node cluster instead: `ray.cluster_utils.Cluster` nodes of 1 CPU
each (local processes, as in tests/test_ray_cluster.py), the same folder indexed with `--ray ADDRESS` on 1 node and on
2 nodes, each index checked against a local one; the 1-node run gives the per-node rate (r) and the fixed cost (t0),
and the model predicts the 2-node run from them.

`--merge N` measures the IVF structure's build on its own (what `--ray` does with an inverted-file index type): N
clustered synthetic vectors, the structure `auto` picks for N trained on the driver, then filled serially by FAISS
on this machine's cores, against per-shard sub-indexes filled by Ray tasks (1 and 2 at a time, local Ray with 2
CPUs) and merged on the driver; the merged structure is checked against the serial one (same lists: same answers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simsearch.images import scan_images
from simsearch.index.store import IndexStore

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1_000_000


def index_run(folder: Path, index: Path, extra: list[str]) -> dict:
    """One `simsearch index` child process; its JSON report plus the wall time."""
    cmd = [sys.executable, "-m", "simsearch.cli", "index", str(folder), "--index", str(index), "--json", *extra]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip().splitlines()[-1:]}")
    out = json.loads(r.stdout)
    out["wall"] = wall
    return out


def vectors_by_path(index: Path) -> dict[str, tuple[int, np.ndarray]]:
    with IndexStore.open(index) as store:
        rows = {r.id: r.path for r in store.all_rows()}
        return {rows[int(i)]: (int(i), v) for ids, vecs in store.iter_vectors() for i, v in zip(ids, vecs, strict=True)}


def compare(a: Path, b: Path) -> tuple[bool, float, bool]:
    """(same files, lowest cosine per file, same ids) of two indexes."""
    va, vb = vectors_by_path(a), vectors_by_path(b)
    same = va.keys() == vb.keys()
    cos = min((float(va[p][1] @ vb[p][1]) for p in va if p in vb), default=0.0)
    return same, cos, same and all(va[p][0] == vb[p][0] for p in va)


def plan_cost(folder: Path) -> float:
    """Seconds per file of sync's planning on the driver: walking the folder and one stat per file."""
    t = time.perf_counter()
    found, _ = scan_images(folder)
    for p in found:
        os.stat(p)
    return (time.perf_counter() - t) / max(1, len(found))


def commit_cost(n: int, dim: int, tmp: Path) -> tuple[float, float]:
    """(seconds per vector committed in chunks of 256, seconds per vector of the final snapshot) for n vectors."""
    tmp.mkdir(exist_ok=True)
    store = IndexStore.create(tmp / "commit-bench", {"backbone": "synthetic", "dim": dim, "input_size": 0})
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    t = time.perf_counter()
    for start in range(0, n, 256):
        with store.transaction() as txn:
            for i in range(start, min(n, start + 256)):
                txn.insert(f"/photos/{i:09d}.jpg", 100_000 + i, 1_700_000_000_000_000_000 + i, f"{i:064x}", 640, 480,
                           vecs[i])  # fmt: skip
    commit = (time.perf_counter() - t) / n
    t = time.perf_counter()
    store.save()
    save = (time.perf_counter() - t) / n
    store.close()
    return commit, save


def merge_cost(n: int, dim: int) -> dict:
    """Train, serial fill and Ray fill (1, 2 workers) of the IVF structure `auto` picks for n vectors."""
    import faiss
    import ray

    from simsearch.index.ann import build, plan_for, training_sample_size
    from simsearch.index.merge import fill_with_ray

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(64, n // 200), dim), dtype=np.float32)
    vecs = np.empty((n, dim), np.float32)
    for a in range(0, n, 65536):  # clustered like photo embeddings: a centre plus noise
        b = min(n, a + 65536)
        vecs[a:b] = centres[rng.integers(0, len(centres), b - a)] + 0.6 * rng.standard_normal((b - a, dim), np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    plan = plan_for("auto", max(n, 50_000), dim)
    t = time.perf_counter()
    trained = build(plan, dim, vecs[np.sort(rng.choice(n, min(n, training_sample_size(plan)), replace=False))])
    out: dict = {"n": n, "dim": dim, "factory": plan.factory, "train_s": round(time.perf_counter() - t, 2)}
    blob = faiss.serialize_index(trained)
    serial = faiss.deserialize_index(blob)
    t = time.perf_counter()
    for a in range(0, n, 65536):
        serial.add_with_ids(vecs[a : a + 65536], ids[a : a + 65536])
    out["serial_fill_s"] = round(time.perf_counter() - t, 2)
    queries = vecs[rng.choice(n, 200, replace=False)]
    faiss.extract_index_ivf(serial).nprobe = 8
    want = serial.search(queries, 10)[1]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        for w in (1, 2):
            merged = faiss.deserialize_index(blob)
            t = time.perf_counter()
            info = fill_with_ray(ray, merged, lambda part: vecs[part], ids, w)
            faiss.extract_index_ivf(merged).nprobe = 8
            same = bool(np.array_equal(np.sort(merged.search(queries, 10)[1], axis=1), np.sort(want, axis=1)))
            out[f"ray_{w}"] = {**info, "wall_s": round(time.perf_counter() - t, 2), "same_answers": same}
    finally:
        ray.shutdown()
    return out


def print_merge(res: dict) -> None:
    n = res["n"]
    print(f"IVF structure for {n:,} x {res['dim']} ({res['factory']}), 2-core machine: train on the driver "
          f"{res['train_s']:.1f} s; fill serially (FAISS, both cores) {res['serial_fill_s']:.1f} s")  # fmt: skip
    for w in (1, 2):
        r = res[f"ray_{w}"]
        print(f"  per-shard sub-indexes on Ray, {w} at a time: {r['wall_s']:.1f} s ({r['shards']} shards; merging on "
              f"the driver {r['merge_s']:.2f} s; {res['serial_fill_s'] / r['wall_s']:.2f}x the serial fill's speed; "
              f"same answers: {r['same_answers']})")  # fmt: skip
    per = res["serial_fill_s"] / n
    print(f"at {TARGET:,} images the serial fill is about {per * TARGET:.0f} s and the merge "
          f"{res['ray_2']['merge_s'] / n * TARGET:.1f} s on the driver: with k nodes' cores the fill shrinks to "
          f"~{per * TARGET:.0f}/k s plus shipping 5 KB per vector")  # fmt: skip


def warm_tiny(folder: Path, tmp: Path, model: list[str]) -> Path:
    """A folder of 8 of the images, for Ray's fixed cost (start Ray and its actors, embed 8 images), indexed once
    first so that every timed run starts alike: the converted model cached, the files in the page cache."""
    tiny = tmp / "tiny"
    tiny.mkdir()
    for f in scan_images(folder)[0][:8]:
        shutil.copy2(f, tiny / f.name)
    index_run(tiny, tmp / "warm", model)
    return tiny


def cluster_check(folder: Path, tmp: Path, model: list[str], nodes: int) -> dict:
    """Index `folder` on Ray clusters of 1 and `nodes` nodes (1 CPU each); the model's prediction for `nodes` from the
    1-node run (fixed cost and per-node rate), against the measured time."""
    from ray.cluster_utils import Cluster

    tiny = warm_tiny(folder, tmp, model)
    local = index_run(folder, tmp / "local", model)
    runs: dict[int, dict] = {}
    for n in (1, nodes):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            for _ in range(n - 1):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            extra = [*model, "--ray", cluster.address]
            fixed = index_run(tiny, tmp / f"tiny-{n}", extra)  # start the actors and embed 8 images
            run = index_run(folder, tmp / f"nodes-{n}", extra)
        finally:
            cluster.shutdown()
        same, cos, ids = compare(tmp / "local", tmp / f"nodes-{n}")
        runs[n] = {"wall_s": round(run["wall"], 2), "fixed_s": round(fixed["wall"], 2),
                   "steady_img_s": run["ray"].get("steady_img_s"), "nodes": run["ray"].get("nodes"),
                   "shards_per_node": sorted(run["ray"].get("shards_per_node", {}).values()),
                   "same_files": same, "min_cos": round(cos, 6), "same_ids": ids}  # fmt: skip
    n_img = local["embedded"]
    rate = runs[1]["steady_img_s"] or float("nan")  # e*r: what one node embeds once Ray runs (1-node run)
    predicted = {n: runs[n]["fixed_s"] + n_img / (n * rate) for n in runs}  # fixed cost measured per configuration
    err = {n: (runs[n]["wall_s"] - predicted[n]) / predicted[n] for n in runs}
    print(f"images: {n_img}; nodes of 1 CPU each on one 2-core machine (the driver shares those cores)")
    print(f"{'nodes':>6}{'wall s':>9}{'fixed s':>9}{'steady img/s':>14}{'predicted s':>13}{'error':>8}  shards per node"
          f"  same index as local")  # fmt: skip
    for n, r in runs.items():
        print(f"{n:>6}{r['wall_s']:>9.1f}{r['fixed_s']:>9.1f}{r['steady_img_s'] or float('nan'):>14.1f}"
              f"{predicted[n]:>13.1f}{100 * err[n]:>+7.1f}%  {str(r['shards_per_node']):<16} files {r['same_files']} "
              f"min cos {r['min_cos']:.6f} ids {r['same_ids']}")  # fmt: skip
    print(f"model: T(N) = fixed(N) + n / (N * e*r), e*r = {rate:.1f} img/s (the 1-node run's steady rate); "
          f"speed-up {runs[1]['wall_s'] / runs[nodes]['wall_s']:.2f}x measured, "
          f"{predicted[1] / predicted[nodes]:.2f}x predicted")  # fmt: skip
    return {"images": n_img, "local_wall_s": round(local["wall"], 2), "runs": runs,
            "predicted_wall_s": {n: round(t, 2) for n, t in predicted.items()},
            "error": {n: round(e, 3) for n, e in err.items()}}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, nargs="?")
    ap.add_argument("--merge", type=int, default=None, help="Measure the IVF fill: serial vs Ray sub-indexes.")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N images (copied to a temp folder).")
    ap.add_argument("--commit-n", type=int, default=20_000, help="Synthetic vectors for the commit measurement.")
    ap.add_argument("--backbone", default=None, help="Backbone (default: the CLI's).")
    ap.add_argument("--nodes", type=int, default=None, help="Check the model on a cluster of this many 1-CPU nodes.")
    args = ap.parse_args()
    if args.merge:
        res = merge_cost(args.merge, args.dim)
        print_merge(res)
        print(json.dumps(res))
        return 0
    if args.folder is None or not args.folder.is_dir():
        print(f"folder not found: {args.folder}", file=sys.stderr)
        return 1
    model = ["--backbone", args.backbone] if args.backbone else []
    with tempfile.TemporaryDirectory(prefix="simsearch-distributed-") as tmp_s:
        tmp = Path(tmp_s)
        folder = args.folder.resolve()
        if args.limit:
            folder = tmp / "photos"
            folder.mkdir()
            for f in scan_images(args.folder)[0][: args.limit]:
                shutil.copy2(f, folder / f.name)
        if args.nodes:
            print(json.dumps(cluster_check(folder, tmp, model, args.nodes)))
            return 0
        tiny = warm_tiny(folder, tmp, model)
        runs: dict[str, dict] = {}
        runs["local"] = index_run(folder, tmp / "local", model)
        runs["ray-1"] = index_run(folder, tmp / "ray-1", [*model, "--ray", "local", "--workers", "1"])
        runs["ray-2"] = index_run(folder, tmp / "ray-2", [*model, "--ray", "local", "--workers", "2"])
        tinies = {"local": index_run(tiny, tmp / "local-tiny", model)}
        for w in ("1", "2"):
            tinies[f"ray-{w}"] = index_run(tiny, tmp / f"ray-{w}-tiny", [*model, "--ray", "local", "--workers", w])
        checks = {k: compare(tmp / "local", tmp / k) for k in ("ray-1", "ray-2")}
        with IndexStore.open(tmp / "local") as s:
            dim = s.dim
        c_plan = plan_cost(folder)
        c_commit_q, _ = commit_cost(args.commit_n // 4, dim, tmp / "quarter")  # flat per vector => linear model
        c_commit, c_save = commit_cost(args.commit_n, dim, tmp)

    n = runs["local"]["embedded"]
    print(f"images: {n} embedded of {runs['local']['total']} ({folder if not args.limit else args.folder}); "
          f"2-core machine shared with other work")  # fmt: skip
    print("wall: the whole child process; sync: the CLI's own timing (for Ray it includes starting Ray and the "
          "actors); steady: local = sync, Ray = its steady_img_s (files over the time from the first shard begun to "
          "the last ended, on the workers), the rate a long run approaches; start: Ray's start_s")  # fmt: skip
    print(f"{'run':<8}{'wall s':>8}{'sync s':>8}{'start s':>8}{'img/s wall':>11}{'sync':>8}{'steady':>8}"
          f"{'wall vs local':>14}{'steady vs local':>16}  identical")  # fmt: skip
    res: dict = {"images": n, "runs": {}}
    local_wall, local_sync = n / runs["local"]["wall"], n / runs["local"]["seconds"]
    for k, r in runs.items():
        start_s = r.get("ray", {}).get("start_s", 0.0)
        rate_w, rate_s = r["embedded"] / r["wall"], r["embedded"] / r["seconds"]
        steady = r["ray"].get("steady_img_s", float("nan")) if "ray" in r else rate_s
        same = "-" if k == "local" else "files {} min cos {:.6f} ids {}".format(*checks[k])
        print(f"{k:<8}{r['wall']:>8.2f}{r['seconds']:>8.2f}{start_s:>8.2f}{rate_w:>11.1f}{rate_s:>8.1f}{steady:>8.1f}"
              f"{rate_w / local_wall:>13.2f}x{steady / local_sync:>15.2f}x  {same}")  # fmt: skip
        res["runs"][k] = {"wall_s": round(r["wall"], 2), "sync_s": round(r["seconds"], 2),
                          "img_s_wall": round(rate_w, 1), "img_s_sync": round(rate_s, 1),
                          "img_s_steady": round(steady, 1), "ratio_wall": round(rate_w / local_wall, 3),
                          "ratio_steady": round(steady / local_sync, 3),
                          **({"ray": r["ray"]} if "ray" in r else {})}  # fmt: skip
        if k != "local":
            res["runs"][k]["min_cos"], res["runs"][k]["same_ids"] = round(checks[k][1], 6), checks[k][2]

    # ---- the scaling model ----------------------------------------------------------------------------------
    t0 = tinies["ray-1"]["wall"] - tinies["local"]["wall"]  # Ray's fixed cost: start the cluster and the actors
    r_node = local_sync  # one node's embedding throughput (this machine, the local pipeline)
    print(f"\nmeasured parts: Ray start + actors {t0:.1f} s; node throughput {r_node:.1f} img/s; driver: plan "
          f"{c_plan * 1e6:.1f} us/file, commit {c_commit * 1e6:.1f} us/vector (dim {dim}, {args.commit_n} synthetic), "
          f"FAISS snapshot {c_save * 1e6:.2f} us/vector; commit of {args.commit_n // 4} vectors "
          f"{c_commit_q * 1e6:.1f} us/vector")  # fmt: skip
    ratio = res["runs"]["ray-1"]["ratio_steady"]
    if not ratio > 0:
        print("warning: too few shards for a steady rate; use more images")
    e = min(1.0, ratio) if ratio > 0 else 1.0  # what Ray keeps of a node's throughput once started
    print(f"model (fresh build): T(N nodes, n images) = t0 + n*plan + max(n / (N*e*r_node), n*commit) + n*snapshot, "
          f"e = {e:.2f} (ray-1 steady / local)")  # fmt: skip
    print("       workers embed in parallel (per node); the driver alone plans, commits each shard as it arrives "
          "(overlapping the embedding) and writes one snapshot at the end (serial)")  # fmt: skip
    for k in ("ray-1", "ray-2"):
        fixed = tinies[k]["wall"] - tinies["local"]["wall"]  # this configuration's start (two actors for ray-2)
        predicted = runs["local"]["wall"] + fixed  # one node: the local run's work plus Ray's fixed cost
        err = (runs[k]["wall"] - predicted) / predicted
        print(f"check {k}: predicted {predicted:.1f} s (local wall + its fixed cost {fixed:.1f} s), measured "
              f"{runs[k]['wall']:.1f} s ({100 * err:+.1f}%)")  # fmt: skip
        res["runs"][k]["predicted_wall_s"] = round(predicted, 2)
    serial = TARGET * (c_plan + c_commit + c_save)
    embed = TARGET / r_node
    frac = serial / (serial + embed)
    cap = 1.0 / c_commit
    print(f"at {TARGET:,} images: serial on the driver {serial:.0f} s (plan {TARGET * c_plan:.0f}, commit "
          f"{TARGET * c_commit:.0f}, snapshot {TARGET * c_save:.0f}) vs {embed:.0f} node-seconds of embedding: "
          f"serial fraction {100 * frac:.2f}% of the work")  # fmt: skip
    print(
        f"commit alone caps the cluster at {cap:.0f} img/s = {cap / (e * r_node):.0f} nodes like this one; "
        "the IVF structure's fill can be spread over Ray (per-shard sub-indexes merged): see --merge"
    )
    for nodes in (1, 4, 16, 64):
        t = t0 + TARGET * c_plan + max(TARGET / (nodes * e * r_node), TARGET * c_commit) + TARGET * c_save
        print(f"  {nodes:>3} nodes: {t / 3600:6.2f} h for {TARGET:,} images (speed-up {(embed + serial) / t:.1f}x)")
    res["model"] = {"t0_s": round(t0, 2), "r_node": round(r_node, 1), "plan_us": round(c_plan * 1e6, 2),
                    "commit_us": round(c_commit * 1e6, 2), "commit_us_quarter": round(c_commit_q * 1e6, 2),
                    "snapshot_us": round(c_save * 1e6, 3), "serial_fraction_1m": round(frac, 4), "e": round(e, 3),
                    "commit_cap_img_s": round(cap)}  # fmt: skip
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
