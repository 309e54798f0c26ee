"""Instance retrieval ("the same object under another viewpoint"): global descriptor options, measured.

    python benchmarks/instance.py ../shared/data/clothing --views ../shared/data/views [--n-objects 300]
        [--sizes 224,320] [--fits resize,crop] [--extra crop:384,crop:448] [--multi-scale 224,320]
        [--cache /tmp/desc-cache] [--dedup-edits 300]

Sets:
- synthetic phone-vs-scan (seeded): `--n-objects` clothing photos are the "scans"; each gets 2-3 "phone photos"
  (partial view 60-85% of each side, rotation up to +-20 degrees, perspective warp with corner jitter 10-25%,
  a soft glare blob, pasted on another clothing photo as clutter so the object covers 50-80% of the frame, resized,
  JPEG q60-80). Database: every photo of images/ (scans included, so the distractors are the same domain);
  queries: the phone photos; relevant: the query's own scan (its byte-identical twin is never picked as a scan).
- views (real, CC BY): every photo queries the other 58; relevant: the photos of the same scene (folder + name
  before `_NN.jpg`).
- dedup (from benchmarks/dedup_quality.py): images/ plus its generated edits, same-origin pairs are positives
  (plus one re-encoded pair the ground truth missed, UNLABELLED_DUPLICATES); pair recall at precision 1.000 and
  0.99 (the largest share of positive pairs found above one threshold at that precision), and pair precision /
  recall at the default dedup threshold. Also class precision@10 on the labelled photos (same-label neighbours).

Metrics: AP per query over the full ranking (mean = mAP), P@1, R@10 (share of the relevant items in the top 10).
Latency: median ms per query (load + embed + search, plus the second search for query expansion), one query at a
time on a CPU shared with other work: indicative only. Bytes: the float32 vector stored per image.

Every pooling is computed from one run of the model per (fit, input size): the model's last feature map is pooled
here with avg, max, GeM (p=3) and R-MAC (`simsearch.models.backbones.rmac_regions`). The default and the best
option are then run through the public API (SimIndex.create + add_vectors + search): the library's own query
embedding must give the same top-1 (printed as a check), and that is where the re-ranking rows run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup_quality import edit_set, precision_at_10  # noqa: E402

from simsearch import SimIndex  # noqa: E402
from simsearch.dedup.finder import DEFAULT_THRESHOLD  # noqa: E402
from simsearch.models.backbones import (
    DEFAULT_BACKBONE,
    DEFAULT_POOLING,
    GEM_P,
    Backbone,
    resolve_backbone,
    rmac_regions,
)  # noqa: E402
from simsearch.models.embedder import Embedder, l2_normalise  # noqa: E402

POOLS = ("avg", "max", "gem", "rmac")
# Found by this benchmark (cosine 0.999 with every pooling): the same photo re-encoded (mean pixel difference 0.5/255),
# not in duplicates.csv. Without it, "recall at precision 1" would be 0.001 for every option.
UNLABELLED_DUPLICATES = [("637a56e4-7fa6-4f75-8859-0f8902461554.jpg", "6075b4a5-5b1a-4ce0-aea0-9dbfbca7c35c.jpg")]
FEATURES = 1280
CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- descriptors
def pool_maps(maps: np.ndarray) -> dict[str, np.ndarray]:
    """(n, h, w, c) non-negative feature maps -> {pooling: (n, c) L2-normalised}."""
    out = {
        "avg": maps.mean(axis=(1, 2)),
        "max": maps.max(axis=(1, 2)),
        "gem": np.power(np.power(np.maximum(maps, 1e-6), GEM_P).mean(axis=(1, 2)), 1.0 / GEM_P),
    }
    r = np.zeros((len(maps), maps.shape[-1]), np.float32)
    for y, x, sh, sw in rmac_regions(maps.shape[1], maps.shape[2]):
        r += l2_normalise(maps[:, y : y + sh, x : x + sw].max(axis=(1, 2)))
    out["rmac"] = r
    return {k: l2_normalise(v) for k, v in out.items()}


class MapEmbedder:
    """Lite0 up to its last feature map (one TFLite model per input size and fit), pooled in numpy."""

    def __init__(self, size: int, fit: str) -> None:
        from simsearch.models._keras import keras
        from simsearch.models.efficientnet_lite import build_efficientnet_lite

        spec = resolve_backbone(DEFAULT_BACKBONE, input_size=size)
        self.cells = math.ceil(size / 32)
        dim = self.cells * self.cells * FEATURES
        base = build_efficientnet_lite(0, input_size=size, include_top=False, weights=spec.weights_file)
        k = keras()
        model = k.Model(base.input, k.layers.Reshape((dim,))(base.output))
        bb = Backbone(replace(spec, pooling="featuremap", dim=dim), model, spec.preprocess_fn(), dim)
        self.emb = Embedder(bb, fit=fit)
        self.size, self.fit = size, fit

    def _pool(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return pool_maps(flat.reshape(len(flat), self.cells, self.cells, FEATURES))

    def embed_paths(self, paths: list[Path]) -> dict[str, np.ndarray]:
        out = {p: np.zeros((len(paths), FEATURES), np.float32) for p in POOLS}
        pos = {str(p): i for i, p in enumerate(paths)}
        for batch in self.emb.embed_files([str(p) for p in paths]):
            bad = [r for r in batch if r.vector is None]
            if bad:
                raise SystemExit(f"cannot embed {bad[0].path}: {bad[0].error}")
            pooled = self._pool(np.stack([r.vector for r in batch]))
            rows = [pos[r.path] for r in batch]
            for p in POOLS:
                out[p][rows] = pooled[p]
        return out

    def embed_one(self, path: Path) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self._pool(self.emb.embed_one(str(path))[None]).items()}


class Cache:
    """Pooled vectors per (image set, fit, size), as .npz files keyed by the set's paths and sizes."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.embedders: dict[tuple[int, str], MapEmbedder] = {}

    def embedder(self, size: int, fit: str) -> MapEmbedder:
        if (size, fit) not in self.embedders:
            self.embedders[(size, fit)] = MapEmbedder(size, fit)
        return self.embedders[(size, fit)]

    def vectors(self, name: str, paths: list[Path], size: int, fit: str) -> dict[str, np.ndarray]:
        key = hashlib.sha256(
            repr([CACHE_VERSION, size, fit] + [(str(p), p.stat().st_size) for p in paths]).encode()
        ).hexdigest()[:16]
        f = self.root / f"{name}-{fit}-{size}-{key}.npz" if self.root else None
        if f is not None and f.is_file():
            with np.load(f) as z:
                return {p: z[p] for p in POOLS}
        t = time.perf_counter()
        out = self.embedder(size, fit).embed_paths(paths)
        print(f"embedded {name} ({len(paths)} images, fit={fit}, size={size}) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr, flush=True)  # fmt: skip
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            np.savez(f.with_suffix(".tmp.npz"), **out)
            f.with_suffix(".tmp.npz").rename(f)
        return out


# ---------------------------------------------------------------------------------------------- the image sets
def _perspective_coeffs(src: list[tuple[float, float]], dst: list[tuple[float, float]]) -> list[float]:
    """PIL PERSPECTIVE data: the homography taking output points `dst` to input points `src`."""
    a, b = [], []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        a += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        b += [u, v]
    return np.linalg.solve(np.array(a, float), np.array(b, float)).tolist()


def phone_photo(scan: Image.Image, background: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A "phone photo" of `scan`: partial view, rotation, perspective, on clutter, glare, resized (not encoded)."""
    im = scan.convert("RGB")
    w, h = im.size
    fx, fy = rng.uniform(0.60, 0.85, 2)  # partial view: 60-85% of each side
    cw, ch = int(w * fx), int(h * fy)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    obj = im.crop((x0, y0, x0 + cw, y0 + ch)).convert("RGBA")
    obj = obj.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, expand=True)
    ow, oh = obj.size
    corners = [(0.0, 0.0), (ow, 0.0), (ow, oh), (0.0, oh)]
    dst = []
    for x, y in corners:  # each corner moves by 10-25% of the object's size in a random direction
        m, t = rng.uniform(0.10, 0.25), rng.uniform(0, 2 * np.pi)
        dst.append((x + m * ow * np.cos(t), y + m * oh * np.sin(t)))
    mx, my = min(p[0] for p in dst), min(p[1] for p in dst)
    dst = [(x - mx, y - my) for x, y in dst]
    size = (math.ceil(max(p[0] for p in dst)), math.ceil(max(p[1] for p in dst)))
    obj = obj.transform(size, Image.PERSPECTIVE, _perspective_coeffs(corners, dst), Image.BICUBIC)
    obj = obj.crop(obj.getbbox() or (0, 0, *size))
    bg = background.convert("RGB")
    bw, bh = bg.size
    s = 640 / max(bw, bh)
    canvas = bg.resize((round(bw * s), round(bh * s)), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    cw, ch = canvas.size
    area = rng.uniform(0.50, 0.80)  # the object's bounding box covers 50-80% of the frame (less if it cannot fit)
    scale = min(math.sqrt(area * cw * ch / (obj.size[0] * obj.size[1])), cw / obj.size[0], ch / obj.size[1])
    obj = obj.resize((max(1, int(obj.size[0] * scale)), max(1, int(obj.size[1] * scale))), Image.BICUBIC)
    px, py = int(rng.integers(0, cw - obj.size[0] + 1)), int(rng.integers(0, ch - obj.size[1] + 1))
    canvas.paste(obj, (px, py), obj)
    arr = np.asarray(canvas, np.float32)
    gx = px + rng.uniform(0.2, 0.8) * obj.size[0]  # glare: a soft bright blob over the object
    gy = py + rng.uniform(0.2, 0.8) * obj.size[1]
    sigma = rng.uniform(0.06, 0.15) * min(cw, ch)
    yy, xx = np.mgrid[0:ch, 0:cw]
    g = rng.uniform(0.5, 0.9) * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * sigma**2))
    arr = arr + (255 - arr) * g[..., None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    f = rng.uniform(0.6, 1.1)
    return out.resize((round(cw * f), round(ch * f)), Image.BILINEAR)


def phone_set(clothing: Path, images: list[Path], n_objects: int, out: Path, seed: int) -> tuple[list[Path], list[int]]:
    """Write 2-3 phone photos of each of `n_objects` seeded scans to `out`; returns (photos, index of the scan)."""
    import csv

    twins = {Path(r[k]).name for r in csv.DictReader(open(clothing / "duplicates.csv")) if r["kind"] == "exact"
             for k in ("a", "b")}  # fmt: skip
    candidates = [i for i, p in enumerate(images) if p.name not in twins]
    rng = np.random.default_rng(seed)
    scans = sorted(rng.choice(candidates, size=min(n_objects, len(candidates)), replace=False).tolist())
    out.mkdir(parents=True, exist_ok=True)
    photos, owner = [], []
    for i in scans:
        for j in range(int(rng.integers(2, 4))):
            b = int(rng.choice(len(images) - 1))
            b += b >= i  # any photo but the scan itself
            q = int(rng.integers(60, 81))
            p = out / f"{images[i].stem}_phone{j}.jpg"
            with Image.open(images[i]) as scan, Image.open(images[b]) as bg:
                phone_photo(scan, bg, rng).save(p, quality=q)
            photos.append(p)
            owner.append(i)
    return photos, owner


def views_set(views: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(views.rglob("*.jpg"))
    return paths, [f"{p.parent.name}/{p.stem.rsplit('_', 1)[0]}" for p in paths]


# ---------------------------------------------------------------------------------------------- metrics
def ranking_metrics(scores: np.ndarray, relevant: list[np.ndarray], exclude: list[int] | None = None) -> dict:
    """mAP, P@1 and R@10 of full rankings: scores (queries, database), relevant database ids per query."""
    aps, p1, r10 = [], [], []
    for q, rel in enumerate(relevant):
        s = scores[q].copy()
        if exclude is not None and exclude[q] >= 0:
            s[exclude[q]] = -np.inf
        ranks = np.sort((s[None, :] >= s[rel][:, None]).sum(axis=1))  # 1-based rank of each relevant item, ties last
        aps.append(float(np.mean(np.arange(1, len(rel) + 1) / ranks)))
        p1.append(float(ranks[0] == 1))
        r10.append(float((ranks <= 10).mean()))
    return {"mAP": float(np.mean(aps)), "P@1": float(np.mean(p1)), "R@10": float(np.mean(r10))}


def top_k(queries: np.ndarray, db: np.ndarray, k: int, exclude: list[int] | None = None) -> np.ndarray:
    s = queries @ db.T
    if exclude is not None:
        for q, e in enumerate(exclude):
            if e >= 0:
                s[q, e] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def expand_queries(queries: np.ndarray, db: np.ndarray, k: int, exclude: list[int] | None = None) -> np.ndarray:
    """Average query expansion: the mean of each query and its k nearest database vectors, renormalised."""
    if k == 0:
        return queries
    nn = top_k(queries, db, k, exclude)
    return l2_normalise(queries + db[nn].sum(axis=1))


def augment_database(db: np.ndarray, k: int) -> np.ndarray:
    """Database-side augmentation: each vector becomes the mean of itself and its k nearest others."""
    nn = top_k(db, db, k, list(range(len(db))))
    return l2_normalise(db + db[nn].sum(axis=1))


def pr_at(vecs: np.ndarray, origin: np.ndarray, threshold: float) -> tuple[float, float]:
    """(precision, recall) of same-origin pairs among all pairs scoring at least `threshold`."""
    from simsearch.dedup.graph import similar_pairs

    i, j, _ = similar_pairs(vecs, threshold)
    same = origin[i] == origin[j]
    _, counts = np.unique(origin, return_counts=True)
    return float(same.sum() / max(len(same), 1)), float(same.sum() / (counts * (counts - 1) // 2).sum())


def pair_recall_at_precision(vecs: np.ndarray, origin: np.ndarray, targets=(1.0, 0.99)) -> dict[float, tuple]:
    """{precision: (pair recall, threshold)}: the most same-origin pairs found above one threshold at that precision.

    Candidate pairs are each vector's 16 nearest neighbours (groups are at most 7 files, so every positive pair
    that could score high is a candidate); recall is over every same-origin pair.
    """
    import faiss

    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    s, nn = index.search(vecs, 16)
    i = np.repeat(np.arange(len(vecs)), nn.shape[1])
    j = nn.ravel()
    keep = (j > i) & (j >= 0)  # each pair once (both directions may be listed: unique below)
    pairs = np.unique(np.stack([i[keep], j[keep]], 1), axis=0)
    scores = np.sum(vecs[pairs[:, 0]] * vecs[pairs[:, 1]], axis=1)
    order = np.argsort(-scores, kind="stable")
    same = origin[pairs[order, 0]] == origin[pairs[order, 1]]
    _, counts = np.unique(origin, return_counts=True)
    positives = int((counts * (counts - 1) // 2).sum())
    tp = np.cumsum(same)
    precision = tp / np.arange(1, len(same) + 1)
    out = {}
    for t in targets:
        ok = np.flatnonzero(precision >= t - 1e-12)
        best = ok[np.argmax(tp[ok])] if len(ok) else None
        out[t] = (0.0, 1.0) if best is None else (float(tp[best] / positives), float(scores[order][best]))
    return out


# ---------------------------------------------------------------------------------------------- re-ranking
def rerank_rows(index: SimIndex, queries: list[Path], relevant: list[set[str]], skip_self: bool) -> list[dict]:
    """RE-RANKING ROWS: `index.search(query, k=N, rerank=N)` for N in (20, 50), when SimIndex.search takes rerank.

    `index` holds one global descriptor (the default or the best option); `relevant[i]` is the set of indexed paths
    relevant to `queries[i]`. Metrics are computed over the returned top N (a relevant item outside it counts as
    missed), so they are comparable with the global rows only as far as the global ranking of N items reaches.
    """
    if "rerank" not in inspect.signature(SimIndex.search).parameters:
        print("note: SimIndex.search takes no rerank= yet; the re-ranking rows are skipped", file=sys.stderr)
        return []
    rows = []
    for n in (20, 50):
        aps, p1, r10, secs = [], [], [], 0.0
        for q, rel in zip(queries, relevant, strict=True):
            t = time.perf_counter()
            matches = index.search(str(q), k=n + skip_self, rerank=n)
            secs += time.perf_counter() - t
            hits = [m.path in rel for m in matches if not (skip_self and m.path == str(q))][:n]
            ranks = np.flatnonzero(hits) + 1
            aps.append(float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / len(rel)))
            p1.append(float(bool(hits) and hits[0]))
            r10.append(float(np.sum(hits[:10]) / len(rel)))
        rows.append({"option": f"rerank={n}", "mAP": float(np.mean(aps)), "P@1": float(np.mean(p1)),
                     "R@10": float(np.mean(r10)), "ms": 1000 * secs / len(queries)})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- the benchmark
BASELINE = ("resize", 224, "avg")  # the library's default before this benchmark (now pooling rmac)


def option_name(fit: str, size: int | str, pool: str, extra: str = "") -> str:
    return f"{pool} {fit} {size}" + (f" {extra}" if extra else "")


def label(row: dict) -> str:
    size = "+".join(map(str, row.get("scales", []))) if row["size"] == "ms" else row["size"]
    out = f"{row['pool']} {row['fit']} {size}"
    if row.get("dba"):
        out += f" +DBA{row['dba']}"
    if row.get("qe"):
        out += f" +QE{row['qe']}"
    return out


def print_row(row: dict) -> None:
    parts = [f"{label(row):<28}"]
    for name in ("phone", "views"):
        if name in row:
            m = row[name]
            parts.append(f"{name} mAP {m['mAP']:.3f} P@1 {m['P@1']:.3f} R@10 {m['R@10']:.3f}")
    if "dedup_recall_p1" in row:
        parts.append(f"dedup R@P1 {row['dedup_recall_p1']:.3f} (t>={row['dedup_threshold']:.3f}) "
                     f"R@P.99 {row['dedup_recall_p099']:.3f}")  # fmt: skip
    print(" | ".join(parts), flush=True)


def table(rows: list[dict], extra: list[dict]) -> str:
    """The markdown table of every row (re-ranking rows last)."""
    head = ("| descriptor | phone mAP | phone P@1 | phone R@10 | views mAP | views P@1 | dedup R @ P=1 "
            "| dedup R @ P=0.99 | dedup P / R @ 0.90 | class P@10 | ms/query | bytes/image |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows + extra:
        ph, vw = r["phone"], r.get("views", {})
        dd = " | | | "
        if "dedup_recall_p1" in r:
            p, rc = r["dedup_pr_at_default"]
            dd = (
                f"{r['dedup_recall_p1']:.3f} | {r['dedup_recall_p099']:.3f} | {p:.3f} / {rc:.3f} | {r['class_p10']:.3f}"
            )
        vm = f"{vw['mAP']:.3f} | {vw['P@1']:.3f}" if vw else " | "
        ms = f"{r['ms']:.0f}" if "ms" in r else ""
        lines.append(f"| {r.get('option') or label(r)} | {ph['mAP']:.3f} | {ph['P@1']:.3f} | {ph['R@10']:.3f} | {vm} "
                     f"| {dd} | {ms} | {r.get('bytes', '')} |")  # fmt: skip
    return "\n".join(lines)


def latency(rows: list[dict], cache: Cache, queries: list[Path], descriptor, multi: list[int]) -> None:
    """Median ms per query of every row: load + embed (at every size it needs) + search (twice with QE)."""
    import faiss

    for row in rows:
        fit, size, pool = row["fit"], row["size"], row["pool"]
        scales = multi if size == "ms" else [size]
        for s in scales:  # build and warm the models before timing
            cache.embedder(s, fit).embed_one(queries[0])
        db = descriptor("db", fit, size, pool)
        if row["dba"]:
            db = augment_database(db, row["dba"])
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
        times = []
        for q in queries:
            t = time.perf_counter()
            v = l2_normalise(sum(cache.embedder(s, fit).embed_one(q)[pool] for s in scales)[None])
            _, nn = index.search(v, max(10, row["qe"]))
            if row["qe"]:
                v = l2_normalise(v + db[nn[0, : row["qe"]]].sum(axis=0, keepdims=True))
                index.search(v, 10)
            times.append(time.perf_counter() - t)
        row["ms"] = 1000 * float(np.median(times))


def rerank_section(images, vec, phones, owner, views, scenes, n_check: int, options: list[tuple]) -> list[dict]:
    """Each (fit, size, pool) of `options` through the public API: SimIndex.create + add_vectors of this file's
    vectors, then SimIndex.search on `n_check` phone photos (top-1 must equal this file's ranking: a check that the
    library embeds queries as this file does), then the re-ranking rows on top of that global descriptor."""
    out = []
    shared = None  # one local-features cache for every option: each photo's features are extracted once
    for fit, size, pool in options:
        with tempfile.TemporaryDirectory(prefix="simsearch-instance-index-") as tmp:
            name = label({"fit": fit, "size": size, "pool": pool})
            index = SimIndex.create(Path(tmp, "phone"), fit=fit, pooling=pool, input_size=size)
            if "rerank" in inspect.signature(SimIndex.search).parameters:
                from simsearch.spatial.rerank import FeatureSource

                shared = shared or FeatureSource(Path(tmp), cache_size=len(images) + len(phones) + len(views) + 1)
                index._features = shared
            index.add_vectors([str(p) for p in images], vec["db", fit, size][pool])
            mine = top_k(vec["phone", fit, size][pool][:n_check], vec["db", fit, size][pool], 1)[:, 0]
            index.search(str(phones[0]), k=10)  # build the model before timing
            t = time.perf_counter()
            api = [index.search(str(q), k=10) for q in phones[:n_check]]
            ms = 1000 * (time.perf_counter() - t) / n_check
            same = sum(m[0].path == str(images[i]) for m, i in zip(api, mine, strict=True))
            print(f"public API check, {name}: SimIndex.search top-1 equals this file's on {same}/{n_check} phone "
                  f"queries ({ms:.0f} ms/query)")  # fmt: skip
            rows = [{"option": f"{name} + {r.pop('option')}", "ms": r.pop("ms"), "bytes": FEATURES * 4, "phone": r}
                    for r in rerank_rows(index, phones, [{str(images[i])} for i in owner], False)]  # fmt: skip
            if views and rows:
                vindex = SimIndex.create(Path(tmp, "views"), fit=fit, pooling=pool, input_size=size)
                vindex._features = shared
                vindex.add_vectors([str(p) for p in views], vec["views", fit, size][pool])
                rel = [
                    {str(p) for p, s in zip(views, scenes, strict=True) if s == sc and p != q}
                    for q, sc in zip(views, scenes, strict=True)
                ]
                for row, r in zip(rows, rerank_rows(vindex, views, rel, True), strict=True):
                    r.pop("option"), r.pop("ms")
                    row["views"] = r
            out += rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clothing", type=Path)
    ap.add_argument("--views", type=Path, default=None)
    ap.add_argument("--n-objects", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="224,320")
    ap.add_argument("--fits", default="resize,crop")
    ap.add_argument("--extra", default="", help="More fit:size pairs measured alone, e.g. crop:384,crop:448.")
    ap.add_argument("--multi-scale", default="224,320", help="Sizes averaged by the multi-scale rows ('' for none).")
    ap.add_argument("--dedup-edits", type=int, default=300, help="Photos that get dedup_quality's edits (0: skip).")
    ap.add_argument("--latency-queries", type=int, default=20)
    ap.add_argument("--cache", type=Path, default=None, help="Keep generated images and vectors here (reused).")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = ap.parse_args()
    images = sorted((args.clothing / "images").glob("*.jpg"))
    if not images:
        print(f"no images in {args.clothing / 'images'}", file=sys.stderr)
        return 1
    labels_by_id = {r["image"]: r["label"] for r in csv.DictReader(open(args.clothing / "images.csv"))}
    sizes = [int(s) for s in args.sizes.split(",")]
    multi = [int(s) for s in args.multi_scale.split(",") if s]
    sizes += [s for s in multi if s not in sizes]
    fits = args.fits.split(",")
    with tempfile.TemporaryDirectory(prefix="simsearch-instance-") as tmp:
        work = args.cache or Path(tmp)
        cache = Cache(args.cache)
        phones, owner = phone_set(args.clothing, images, args.n_objects, work / f"phone-{args.seed}", args.seed)
        print(f"phone-vs-scan: {len(phones)} phone photos of {len(set(owner))} scans; database {len(images)} photos")
        sets = {"phone": (images, phones)}
        if args.views is not None and args.views.is_dir():
            vpaths, scenes = views_set(args.views)
            sets["views"] = (vpaths, vpaths)
            print(f"views: {len(vpaths)} photos of {len(set(scenes))} scenes")
        dedup = None
        if args.dedup_edits:
            (work / "edits").mkdir(parents=True, exist_ok=True)
            edits, origin = edit_set(args.clothing, images, args.dedup_edits, work / "edits")
            origin = origin[: len(images) + len(edits)].copy()
            pos = {p.name: k for k, p in enumerate(images)}
            for a, b in UNLABELLED_DUPLICATES:
                origin[origin == origin[pos[b]]] = origin[pos[a]]
            dedup = (edits, origin)
        labels = np.array([labels_by_id.get(p.stem, "?") for p in images])
        labelled = ~np.isin(labels, ["Not sure", "Skip", "Other", "?"])
        vec: dict[tuple[str, str, int], dict[str, np.ndarray]] = {}
        extra = [(e.split(":")[0], int(e.split(":")[1])) for e in args.extra.split(",") if e]
        combos = list(dict.fromkeys([BASELINE[:2]] + [(f, s) for f in fits for s in sizes] + extra))
        for fit, size in combos:
            vec["db", fit, size] = cache.vectors("clothing", images, size, fit)
            vec["phone", fit, size] = cache.vectors("phone", phones, size, fit)
            if "views" in sets:
                vec["views", fit, size] = cache.vectors("views", sets["views"][0], size, fit)
            if dedup:
                vec["edits", fit, size] = cache.vectors("edits", dedup[0], size, fit)

        def descriptor(kind: str, fit: str, size: int | str, pool: str) -> np.ndarray:
            if size == "ms":  # multi-scale: mean of the L2-normalised vectors at every size, renormalised
                return l2_normalise(sum(vec[kind, fit, s][pool] for s in multi))
            return vec[kind, fit, size][pool]

        rel_phone = [np.array([i]) for i in owner]
        rel_views, excl_views = [], []
        if "views" in sets:
            sc = np.array(scenes)
            rel_views = [np.flatnonzero((sc == s) & (np.arange(len(sc)) != i)) for i, s in enumerate(sc)]
            excl_views = list(range(len(sc)))

        def evaluate(fit: str, size: int | str, pool: str, qe: int = 0, dba: int = 0) -> dict:
            row: dict = {"fit": fit, "size": size, "pool": pool, "qe": qe, "dba": dba}
            if size == "ms":
                row["scales"] = multi
            db, q = descriptor("db", fit, size, pool), descriptor("phone", fit, size, pool)
            if dba:
                db = augment_database(db, dba)
            q = expand_queries(q, db, qe)
            row["phone"] = ranking_metrics(q @ db.T, rel_phone)
            if rel_views:
                v = descriptor("views", fit, size, pool)
                vdb = augment_database(v, dba) if dba else v
                vq = expand_queries(v, vdb, qe, excl_views)
                row["views"] = ranking_metrics(vq @ vdb.T, rel_views, excl_views)
            if dedup and not qe and not dba:
                both = np.concatenate([descriptor("db", fit, size, pool), descriptor("edits", fit, size, pool)])
                pr = pair_recall_at_precision(both, dedup[1])
                row["dedup_recall_p1"], row["dedup_threshold"] = pr[1.0]
                row["dedup_recall_p099"] = pr[0.99][0]
                row["dedup_pr_at_default"] = pr_at(both, dedup[1], DEFAULT_THRESHOLD)
                row["class_p10"] = precision_at_10(descriptor("db", fit, size, pool)[labelled], labels[labelled])
            row["bytes"] = FEATURES * 4
            return row

        rows = []
        grid = [BASELINE] + [
            (f, s, p) for f in fits for s in [*sizes, "ms"] if s != "ms" or len(multi) > 1 for p in POOLS
        ]
        grid = list(dict.fromkeys(grid + [(f, s, p) for f, s in extra for p in POOLS]))
        for f, s, p in grid:
            rows.append(evaluate(f, s, p))
            print_row(rows[-1])
        best = max(rows, key=lambda r: r["phone"]["mAP"])
        bases = list(dict.fromkeys([BASELINE, (best["fit"], best["size"], best["pool"])]))
        for f, s, p in bases:
            for qe, dba in ((1, 0), (2, 0), (3, 0), (0, 1), (0, 2), (1, 1), (2, 1)):
                rows.append(evaluate(f, s, p, qe, dba))
                print_row(rows[-1])
        latency(rows, cache, phones[: args.latency_queries], descriptor, multi)
        reranked = rerank_section(images, vec, phones, owner, sets.get("views", ([], []))[0],
                                  scenes if "views" in sets else [], args.latency_queries,
                                  list(dict.fromkeys([("resize", 224, DEFAULT_POOLING), bases[-1]])))  # fmt: skip
        print("\n" + table(rows, reranked))
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "rerank": reranked}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
