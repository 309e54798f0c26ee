"""Index types at scale: build time, disk, memory, CLI and in-process query latency, recall@10 vs exact search.

    python benchmarks/ann.py --n 1000000 --dim 1280                    # flat, ivf, ivfpq at 1M; hnsw at --hnsw-n
    python benchmarks/ann.py --n 10000 --types flat --old /path/to/older/checkout   # vs format 1, side by side

Vectors have the cluster structure of a real collection: each is a real EfficientNet-Lite0 embedding of a
clothing photo (../shared/data/clothing) plus noise of a random strength (cosine 0.55-0.98 to its photo), so
neighbourhoods are dense where the photos are similar, as in a photo library. Queries are 500 fresh vectors of the
same kind. Every index is built through the public API (`SimIndex.add_vectors`) in a child process, so its build
time and peak RSS are its own; each CLI query is `simsearch query --json` in a fresh process (its wall time and
peak RSS), on an image of the clothing set whose vector is planted in the index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from child_rss import CLI, PEAK, run

ROOT = Path(__file__).resolve().parents[1]
CLOTHING = ROOT.parent / "shared" / "data" / "clothing" / "images"


def base_embeddings(cache: Path) -> tuple[np.ndarray, list[str]]:
    """Real Lite0 embeddings of the clothing photos (cached next to the benchmark's work folder)."""
    f = cache / "clothing-lite0.npz"
    if f.is_file():
        z = np.load(f)
        return z["v"], list(z["p"])
    from simsearch import Embedder
    from simsearch.images import find_images

    paths = [str(p) for p in find_images(CLOTHING)]
    emb = Embedder()
    vecs, ok = [], []
    for batch in emb.embed_files(paths):
        for r in batch:
            if r.vector is not None:
                vecs.append(r.vector)
                ok.append(r.path)
    v = np.stack(vecs).astype(np.float32)
    np.savez(f, v=v, p=np.array(ok))
    return v, ok


def synth(base: np.ndarray, n: int, seed: int, out: Path | None = None) -> np.ndarray:
    """n unit vectors around random base vectors; written to `out` (.npy, memory-mapped) when given."""
    rng = np.random.default_rng(seed)
    d = base.shape[1]
    arr = (np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, d)) if out is not None
           else np.empty((n, d), np.float32))  # fmt: skip
    for a in range(0, n, 50_000):
        m = min(50_000, n - a)
        strength = rng.uniform(0.2, 1.5, (m, 1)) / np.sqrt(d)
        x = base[rng.integers(0, len(base), m)] + rng.standard_normal((m, d)).astype(np.float32) * strength
        arr[a : a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    if out is not None:
        arr.flush()
    return arr


BUILD = (
    PEAK
    + """
import json, sys, time, numpy as np
sys.path.insert(0, sys.argv[5])
from simsearch.api import SimIndex
from simsearch.index.store import IndexStore
from simsearch import Embedder
path, kind, vec_file, plant = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
emb = Embedder()
sig = {**emb.signature(), "seed": 0}
vecs = np.load(vec_file, mmap_mode="r")
paths = [f"/bench/{i:08d}.jpg" for i in range(len(vecs))]
paths[0] = plant  # a real file, for the CLI query
t = time.perf_counter()
idx = SimIndex(IndexStore.create(path, sig, index_type=kind))
idx.add_vectors(paths, vecs)
print(json.dumps({"seconds": time.perf_counter() - t, "search": idx.store.manifest["search"]}))
"""
)

OLD_BUILD = (
    PEAK
    + """
import json, sys, time, numpy as np
sys.path.insert(0, sys.argv[5])
from simsearch.index.store import IndexStore
from simsearch import Embedder
path, kind, vec_file, plant = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
emb = Embedder()
vecs = np.load(vec_file, mmap_mode="r")
t = time.perf_counter()
store = IndexStore.create(path, {**emb.signature(), "seed": 0})
store.acquire_lock()
for a in range(0, len(vecs), 50000):
    with store.transaction() as txn:
        for i in range(a, min(len(vecs), a + 50000)):
            txn.insert(plant if i == 0 else f"/bench/{i:08d}.jpg", 0, 0, f"s{i}", None, None, np.array(vecs[i]))
store.save()
print(json.dumps({"seconds": time.perf_counter() - t, "search": {"kind": "format 1 (IDMap2,Flat)"}}))
"""
)

LATENCY = """
import json, sys, time, numpy as np
sys.path.insert(0, sys.argv[3])
from simsearch.api import SimIndex
idx = SimIndex.open(sys.argv[1])
q = np.load(sys.argv[2])
idx.search_vectors(q[:5], k=10)  # warm the structure and the pages it touches
lat, found = [], []
for v in q:
    t = time.perf_counter()
    found.append([m.path for m in idx.search_vectors(v[None], k=10)[0]])
    lat.append((time.perf_counter() - t) * 1000)
print(json.dumps({"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "found": found}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280, help="must be the backbone's (1280 for Lite0)")
    ap.add_argument("--types", default="flat,ivf,ivfpq,hnsw")
    ap.add_argument("--hnsw-n", type=int, default=200_000, help="HNSW is built at this size (its build is slow)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir, removed at the end)")
    ap.add_argument("--old", type=Path, default=None, help="an older checkout to compare (format 1 store)")
    args = ap.parse_args()
    if not CLOTHING.is_dir():
        raise SystemExit(f"needs {CLOTHING}")
    work = args.work or Path(tempfile.mkdtemp(prefix="simsearch-ann-"))
    work.mkdir(parents=True, exist_ok=True)
    base, base_paths = base_embeddings(work)
    if base.shape[1] != args.dim:
        raise SystemExit(f"the backbone gives {base.shape[1]} dims, not {args.dim}")
    rows = []
    sizes = sorted({args.n} | ({min(args.hnsw_n, args.n)} if "hnsw" in args.types else set()))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for n in sizes:
        vec_file = work / f"vectors-{n}.npy"
        if not vec_file.is_file():
            synth(base, n, seed=1, out=vec_file)
        plant_vec = np.load(vec_file, mmap_mode="r")[0]
        # the planted file: the clothing photo nearest to vector 0 stands for it on the CLI
        plant = base_paths[int(np.argmax(base @ plant_vec))]
        q = synth(base, args.queries, seed=2)
        np.save(work / "queries.npy", q)
        import faiss

        vecs = np.load(vec_file, mmap_mode="r")
        truth = np.empty((len(q), 10), np.int64)
        for a in range(0, len(q), 100):
            _, truth[a : a + 100] = faiss.knn(q[a : a + 100], vecs, 10, metric=faiss.METRIC_INNER_PRODUCT)
        if n == args.n:
            kinds = [t for t in args.types.split(",") if t != "hnsw" or args.hnsw_n >= args.n]
        else:
            kinds = ["hnsw"]
        runs = [(k, ROOT, BUILD) for k in kinds]
        if args.old is not None and n == args.n:
            runs.insert(0, ("old", args.old, OLD_BUILD))
        for kind, code_root, build in runs:
            path = work / f"idx-{kind}-{n}"
            shutil.rmtree(path, ignore_errors=True)
            cenv = {**env, "PYTHONPATH": str(code_root)}
            out, wall, rss = run([sys.executable, "-c", build, str(path), "auto" if kind == "old" else kind,
                                  str(vec_file), plant, str(code_root)], env=cenv)  # fmt: skip
            built = json.loads(out.strip().splitlines()[-1])
            disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            lat_out, _, _ = run([sys.executable, "-c", LATENCY, str(path), str(work / "queries.npy"), str(code_root)],
                                env=cenv)  # fmt: skip
            lat = json.loads(lat_out.strip().splitlines()[-1])
            found = [[int(p.rsplit("/", 1)[1].split(".")[0]) if p.startswith("/bench/") else 0 for p in f]
                     for f in lat["found"]]  # fmt: skip
            recall = float(np.mean([len(set(f) & set(t.tolist())) / 10 for f, t in zip(found, truth, strict=True)]))
            cli_wall, cli_rss = [], []
            for _ in range(3):
                o, w, r = run([sys.executable, "-c", CLI, "query", plant, "--index", str(path), "-k", "10", "--json"],
                              env=cenv)  # fmt: skip
                cli_wall.append(w)
                cli_rss.append(r)
            row = {"type": kind, "n": n, "search": built["search"].get("factory") or built["search"].get("kind"),
                   "param": built["search"].get("value"), "build_s": round(built["seconds"], 1),
                   "build_rss_mib": round(rss), "disk_mib": round(disk / 2**20), "bytes_per_image": round(disk / n),
                   "cli_query_s": round(min(cli_wall), 2), "cli_rss_mib": round(min(cli_rss)),
                   "p50_ms": round(lat["p50"], 2), "p99_ms": round(lat["p99"], 2),
                   "recall_at_10": round(recall, 4)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if kind != "flat" or n < 100_000:
                shutil.rmtree(path, ignore_errors=True)
    print()
    print(f"{'type':<7}{'n':>9}  {'structure':<18}{'param':>6}{'build s':>9}{'build RSS':>10}{'disk MiB':>9}"
          f"{'B/img':>7}{'CLI s':>7}{'CLI RSS':>8}{'p50 ms':>8}{'p99 ms':>8}{'R@10':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['type']:<7}{r['n']:>9}  {str(r['search'])[:17]:<18}{str(r['param'] or '-'):>6}{r['build_s']:>9}"
              f"{r['build_rss_mib']:>10}{r['disk_mib']:>9}{r['bytes_per_image']:>7}{r['cli_query_s']:>7}"
              f"{r['cli_rss_mib']:>8}{r['p50_ms']:>8}{r['p99_ms']:>8}{r['recall_at_10']:>7}")  # fmt: skip
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
