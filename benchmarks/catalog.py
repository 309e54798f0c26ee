"""Catalog lookup: phone photos find their clean catalog image among distractors; every search stage side by side.

Usage: python benchmarks/catalog.py [--data ../shared/data] [--distractors 1000] [--rerank 50] [--work DIR] [--json F]

Catalog index (one index, `--local-features`, so it keeps visual words):
- the 50 clean DVD-cover scans of data/covers/Reference (queries: the 200 phone photos in Canon/Droid/E63/Palm,
  same file name = same cover), the reproduction of the issue's acceptance test (100 scans, 1,000 distractors,
  400 phone photos, kept hidden);
- the first photo (`_01`) of each of the 18 scenes of data/views (queries: the other 41 photos of those scenes);
- `--items` clothing photos (queries: 2-3 synthetic phone photos of each, `benchmarks/instance.py`'s phone_photo:
  partial view, perspective, clutter, glare), among `--distractors` clothing photos in all.
All-vs-all index: the 200 cover phone photos and the 59 views photos among the same distractors; every photo is a
query, the other photos of its cover or scene the answers (the re-ranker's old strength must not get worse).

`--regions` also measures the alternative first stage the issue names: region descriptors of the query (the photo
and 14 crops of it through the global model, a catalog image scored by its best region).

Stages: global (FAISS top N), words (visual-words top N), fused (their RRF union: what the re-ranker sees),
reranked (geometric verification of the fused candidates) and reranked_global (the old pipeline: verification of
the global top N only). Timings are indicative (shared CPU); the index folders under --work are reused (synced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from simsearch import SimIndex  # noqa: E402
from simsearch.catalog import CatalogQuery, evaluate_catalog, format_table  # noqa: E402
from simsearch.spatial.words import WORDS_DIR  # noqa: E402

PHONES = ("Canon", "Droid", "E63", "Palm")


def link(src: Path, dst: Path) -> Path:
    """A symlink `dst` -> `src` (the index records the link's path; the data stays where it is)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        os.symlink(src.resolve(), dst)
    return dst


def build(index_dir: Path, folder: Path) -> tuple[SimIndex, float]:
    idx = SimIndex.open(index_dir) if (index_dir / "manifest.json").is_file() else SimIndex.create(index_dir)
    t0 = time.perf_counter()
    rep = idx.add_folder(folder, local_features=True)
    lf = rep.local_features or {}
    w = lf.get("words", {})
    print(f"indexed {folder.name}: {rep.total} images ({rep.embedded} embedded) in {time.perf_counter() - t0:.0f} s; "
          f"local features {lf.get('bytes_per_image')} B/img; words {w.get('words')} ({w.get('bytes_per_image')} "
          f"B/img, {w.get('segments')} segments, vocabulary trained now: {w.get('trained')})")  # fmt: skip
    return idx, time.perf_counter() - t0


def region_crops(path: Path) -> list[Image.Image]:
    """The query and regions of it: 4 corner crops and a centre crop of 65% of each side, and a 3 x 3 grid of crops
    of 45% (overlapping): 15 views, one of which should hold mostly the object."""
    from simsearch.images import open_image

    im = open_image(str(path)).convert("RGB")
    w, h = im.size
    out = [im]
    for f, steps in ((0.65, [(0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)]),
                     (0.45, [(x / 2, y / 2) for y in range(3) for x in range(3)])):  # fmt: skip
        cw, ch = int(w * f), int(h * f)
        for fx, fy in steps:
            x0, y0 = int((w - cw) * fx), int((h - ch) * fy)
            out.append(im.crop((x0, y0, x0 + cw, y0 + ch)))
    return out


def evaluate_regions(index: SimIndex, queries: list[CatalogQuery], n: int) -> dict:
    """The alternative first stage: region descriptors of the query (its 15 views through the global model), each
    searched against the catalog, a catalog image scored by its best region."""
    ranks, ms = [], []
    for q in queries:
        t0 = time.perf_counter()
        crops = region_crops(q.path)
        vecs = index.embedder.embed(crops).vectors
        hits = index.search_vectors(vecs, n)
        best: dict[str, float] = {}
        for row in hits:
            for m in row:
                best[m.path] = max(best.get(m.path, -2.0), m.score)
        order = sorted(best, key=lambda p: -best[p])[:n]
        ms.append(1000 * (time.perf_counter() - t0))
        ranks.append(next((i for i, p in enumerate(order) if p in q.relevant), None))
    k = len(ranks)
    hit = {c: sum(r is not None and r < c for r in ranks) / k for c in (1, 10, 50)}
    return {"p_at_1": hit[1], "r_at_10": hit[10], "r_at_50": hit[50], "ms": round(float(np.mean(ms)), 1)}


def scale_test(words_dir: Path, out: Path, n: int, queries: list[np.ndarray]) -> dict:
    """Query cost of the visual words at `n` images: an inverted file of n documents, each a copy of a real catalog
    image's word set (so posting lengths follow the real word distribution), written straight as one segment."""
    import sqlite3

    from simsearch.spatial.words import WordIndex

    real = WordIndex.open(words_dir.parent)
    st = real._state()
    size = real.vocab.size
    doc_words: dict[int, list[int]] = {}
    for off, post in st["segments"].values():
        for w in range(size):
            for d in post[off[w] : off[w + 1]]:
                if st["nwords"][d]:
                    doc_words.setdefault(int(d), []).append(w)
    sources = sorted(doc_words)
    real.close()
    rng = np.random.default_rng(0)
    src = rng.integers(0, len(sources), n)  # doc i copies real doc sources[src[i]]
    members = [np.flatnonzero(src == j).astype(np.uint32) for j in range(len(sources))]
    by_word: dict[int, list[int]] = {}
    for j, d in enumerate(sources):
        for w in doc_words[d]:
            by_word.setdefault(w, []).append(j)
    out.mkdir(parents=True, exist_ok=True)
    (out / WORDS_DIR).mkdir(exist_ok=True)
    t0 = time.perf_counter()
    wi = WordIndex.open(out, create=True)
    if len(wi) != n:
        wi.set_vocabulary(WordIndex.open(words_dir.parent).vocab)
        counts = np.array([sum(len(members[j]) for j in by_word.get(w, [])) for w in range(size)], np.int64)
        offsets = np.zeros(size + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        post = np.lib.format.open_memmap(out / WORDS_DIR / "seg-000001.postings.npy", mode="w+", dtype=np.uint32,
                                         shape=(int(offsets[-1]),))  # fmt: skip
        for w in range(size):
            if counts[w]:
                post[offsets[w] : offsets[w + 1]] = np.sort(np.concatenate([members[j] for j in by_word[w]]))
        post.flush()
        del post
        np.save(out / WORDS_DIR / "seg-000001.offsets.npy", offsets)
        nw = np.array([len(doc_words[sources[j]]) for j in src], np.int64)
        with wi.conn:
            wi.conn.executemany("INSERT INTO docs VALUES (?, ?, ?)",
                                ((i, f"doc{i:07d}", int(nw[i])) for i in range(n)))  # fmt: skip
            wi.conn.execute("INSERT INTO segs VALUES (1, ?)", (int(offsets[-1]),))
            wi.conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_doc', ?)", (str(n),))
            wi.conn.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (str(wi.generation + 1),))
        wi.close()
        sqlite3.connect(out / WORDS_DIR / "words.sqlite").execute("VACUUM").connection.close()
        wi = WordIndex.open(out)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    wi._state()
    load_s = time.perf_counter() - t0
    times = []
    for q in queries:
        t0 = time.perf_counter()
        wi.search(q, 50)
        times.append(1000 * (time.perf_counter() - t0))
    disk = wi.disk_bytes()
    wi.close()
    return {"images": n, "build_s": round(build_s, 1), "first_load_s": round(load_s, 2),
            "ms_per_query_median": round(float(np.median(times)), 1), "ms_per_query_p90":
            round(float(np.percentile(times, 90)), 1), **disk, "memory_bytes_per_image": 2}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--items", type=int, default=60, help="Clothing photos with synthetic phone photos as queries.")
    ap.add_argument("--rerank", type=int, default=50)
    ap.add_argument("--work", type=Path, default=Path("/tmp/simsearch-catalog-bench"))
    ap.add_argument("--skip-all-vs-all", action="store_true")
    ap.add_argument("--regions", action="store_true", help="Also measure query region descriptors (15 views).")
    ap.add_argument("--scale", type=int, default=0, help="Also time the visual words at this many images (1000000).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    covers, views, clothing = args.data / "covers", args.data / "views", args.data / "clothing"
    if not (covers / "Reference").is_dir() or not (clothing / "images").is_dir():
        print(f"covers or clothing data not found under {args.data}", file=sys.stderr)
        return 1
    work = args.work
    cat = work / "catalog"
    images = sorted((clothing / "images").glob("*.jpg"))[: args.distractors]
    for p in images:
        link(p, cat / "distractors" / p.name)
    refs = {p.stem: link(p, cat / "covers" / p.name) for p in sorted((covers / "Reference").glob("*.jpg"))}
    cover_q = [CatalogQuery(p, {os.path.abspath(refs[p.stem])}, p.stem) for ph in PHONES
               for p in sorted((covers / ph).glob("*.jpg")) if p.stem in refs]  # fmt: skip
    sets = {"covers": cover_q}
    vpaths = sorted(views.rglob("*.jpg")) if views.is_dir() else []
    scene = {p: f"{p.parent.name}_{p.stem.rsplit('_', 1)[0]}" for p in vpaths}
    first = {}
    for p in vpaths:
        first.setdefault(scene[p], link(p, cat / "views" / f"{scene[p]}.jpg"))
    sets["views"] = [CatalogQuery(p, {os.path.abspath(first[scene[p]])}, scene[p]) for p in vpaths
                     if first[scene[p]].resolve() != p.resolve()]  # fmt: skip
    if args.items:
        from instance import phone_photo

        rng = np.random.default_rng(0)
        items = sorted(rng.choice(len(images), min(args.items, len(images)), replace=False).tolist())
        qdir = work / "clothing-phone"
        qdir.mkdir(parents=True, exist_ok=True)
        qs = []
        for i in items:
            rng = np.random.default_rng([0, i])  # per item: the same photos whether or not earlier ones are cached
            for j in range(int(rng.integers(2, 4))):
                b = int(rng.choice(len(images) - 1))
                b += b >= i
                p = qdir / f"{images[i].stem}_phone{j}.jpg"
                if not p.is_file():
                    with Image.open(images[i]) as scan, Image.open(images[b]) as bg:
                        phone_photo(scan, bg, rng).save(p, quality=int(rng.integers(60, 81)))
                qs.append(CatalogQuery(p, {os.path.abspath(cat / "distractors" / images[i].name)}, images[i].stem))
        sets["clothing"] = qs
    idx, _ = build(work / "index-catalog", cat)
    n_cat = len(idx)
    results = {}
    with idx:
        for name, queries in sets.items():
            res = evaluate_catalog(idx, queries, args.rerank, baseline=True)
            results[name] = res
            print()
            print(format_table(res, f"== {name}: {len(queries)} queries, catalog of {n_cat} images, rerank "
                                    f"{args.rerank}"))  # fmt: skip
            if args.regions:
                reg = evaluate_regions(idx, queries, args.rerank)
                res["regions"] = reg
                print(f"regions (15 views of the query, max over views): P@1 {reg['p_at_1']:.3f}, R@10 "
                      f"{reg['r_at_10']:.3f}, R@50 {reg['r_at_50']:.3f}, {reg['ms']} ms per query")  # fmt: skip
        info = idx.info()
    if not args.skip_all_vs_all:
        ava = work / "all-vs-all"
        for p in images:
            link(p, ava / "distractors" / p.name)
        photos = {}
        for ph in PHONES:
            for p in sorted((covers / ph).glob("*.jpg")):
                photos[link(p, ava / "phones" / f"{ph}_{p.name}")] = f"cover{p.stem}"
        for p in vpaths:
            photos[link(p, ava / "views" / f"{scene[p]}_{p.name}")] = scene[p]
        idx2, _ = build(work / "index-all-vs-all", ava)
        by_label: dict[str, set[str]] = {}
        for p, lab in photos.items():
            by_label.setdefault(lab, set()).add(os.path.abspath(p))
        qs = [CatalogQuery(p, by_label[lab] - {os.path.abspath(p)}, lab) for p, lab in photos.items()
              if len(by_label[lab]) > 1]  # fmt: skip
        with idx2:
            res = evaluate_catalog(idx2, qs, args.rerank, baseline=True)
        results["all_vs_all"] = res
        print()
        print(format_table(res, f"== all-vs-all: {len(qs)} photos (covers' phone photos and views) among "
                                f"{len(images)} distractors, rerank {args.rerank}"))  # fmt: skip
    if args.scale:
        with SimIndex.open(work / "index-catalog") as idx:
            qwords = [idx._word_index().vocab.assign(idx.query_features(q.path).unit_descriptors())
                      for q in sets["covers"][:50]]  # fmt: skip
        sc = scale_test(work / "index-catalog" / WORDS_DIR, work / f"scale-{args.scale}", args.scale, qwords)
        results["scale"] = sc
        print(f"\nvisual words at {sc['images']:,} images: {sc['ms_per_query_median']} ms per query (median; "
              f"p90 {sc['ms_per_query_p90']}), first load {sc['first_load_s']} s, {sc['bytes_per_image']} bytes per "
              f"image on disk + {sc['vocab_bytes']} vocabulary, {sc['memory_bytes_per_image']} bytes per image "
              f"resident (+8 per query while scoring)")  # fmt: skip
    vw = info.get("visual_words") or {}
    lf = info.get("local_features") or {}
    print(f"\ncatalog index: {n_cat} images; local features {lf.get('bytes_per_image')} B/img; visual words "
          f"{vw.get('words')} words, {vw.get('bytes_per_image')} B/img on disk")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"results": results, "visual_words": vw, "local_features": lf}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
