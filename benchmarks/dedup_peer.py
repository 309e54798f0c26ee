"""Dedup quality and speed side by side with fastdup, on the clothing photos plus generated edits.

    python benchmarks/dedup_peer.py ../shared/data/clothing [--edits 500] [--seed 0]
        [--fastdup-python /work/venvs/fastdup/bin/python] [--simsearch-args "--threshold 0.85"]
        [--index-args "--fit crop"] [--skip-fastdup] [--reuse-index] [--work /tmp/peer-data]

The folder (cached under --work, built once per --edits/--seed) holds images/ (the 5,756 photos) and edits/ (for N
sampled photos: JPEG q30, half size, 90% centre crop, +30% brightness, a text overlay; `make_edits` of
dedup_quality.py). Ground truth: files of the same origin (a photo, its edits, and the byte-identical pair of
duplicates.csv) are duplicates of each other; every other pair is not. Photos whose 32x32 grey thumbnails correlate
>= 0.99 also share an origin (besides the listed pair, one unlisted re-encoded copy: 6075b4a5 = 637a56e4);
--listed-only drops that. Other lookalikes (the same garment shot twice, similar garments on the same sheet) stay
negatives, as shared/README.md says.

Each tool runs in a fresh child process (wall time, peak RSS of the child):
- fastdup at its default, the way its "finding and removing duplicates" example uses it: `fastdup.create(work_dir,
  input_dir).run()` then `fd.connected_components()` (components of the similarity graph at ccthreshold 0.96);
  each component is a duplicate group. Its `fd.similarity()` pairs (nearest_neighbors_k=2, threshold 0.9) are
  scored too, as pairs, for reference.
- simsearch: `simsearch index FOLDER --index DIR [--index-args]`, then `simsearch dedup DIR --json
  [--simsearch-args]`; exact and near groups (the copies tier) that share a file are merged (a kept file's byte
  copies belong with its near duplicates); "similar" groups (other shots) are not copies and are reported apart.
A group of k files counts as its k(k-1)/2 pairs. The table gives pair recall, precision, recall per edit kind
(original <-> edit pairs; "edit-edit" are pairs of two edits of one photo), time and memory; JSON follows.

Then, from the simsearch index's stored vectors: precision/recall over cosine thresholds (raw pairs, and the
connected groups dedup would form), the threshold each recall target needs, and how many candidate pairs fall
between that threshold and today's default, or up to 0.94/0.96 (the band a geometric verifier would check), with the
groups a perfect verifier of that band would give.

--reuse-fastdup / --reuse-index reuse the last result on the same folder and print its timing from then; rerun
without them on a quiet machine to re-measure both tools in one go.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from child_rss import CLI, PEAK, run
from dedup_quality import EDITS, make_edits

from simsearch.dedup.graph import UnionFind

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = (*EDITS, "edit-edit", "exact", "rotated")
GRID = tuple(round(0.70 + 0.02 * k, 2) for k in range(14))  # 0.70 .. 0.96
TARGETS = (0.99, 0.995)
LOW = 0.50  # candidate pairs below this cosine are never needed for the curve
VERIFY_UP_TO = (0.94, 0.96)  # band tops above the default: verify the lookalikes that score >= default too
PIXEL_COPY = 0.99  # thumbnail correlation of photos that are copies of each other (see pixel_copies)

FASTDUP_CHILD = PEAK + (
    """
import json, os, sys
os.environ.setdefault("SENTRY_OPT_OUT", "1")
import fastdup
folder, work, out = sys.argv[1:4]
fd = fastdup.create(work_dir=work, input_dir=folder)
fd.run()
cc, _ = fd.connected_components()
groups = {}
if len(cc):
    for comp, name in zip(cc["component_id"], cc["filename"]):
        groups.setdefault(int(comp), []).append(os.path.abspath(name))
sim = fd.similarity()
pairs = []
if sim is not None and len(sim):
    pairs = [[os.path.abspath(a), os.path.abspath(b), float(d)]
             for a, b, d in zip(sim["filename_from"], sim["filename_to"], sim["distance"])]
json.dump({"version": fastdup.__version__, "components": list(groups.values()), "pairs": pairs,
           "ccthreshold": fd.config["fastdup_kwargs"]["turi_param"]["ccthreshold"],
           "threshold": fd.config["threshold"], "k": fd.config["nearest_neighbors_k"]}, open(out, "w"))
"""
)


# ---------------------------------------------------------------- the folder and its ground truth


def build_folder(clothing: Path, n_edits: int, seed: int, work: Path, rotated: bool, limit: int | None):
    """The cached folder of originals + edits (+ rotated/ copies) and its manifest {relpath: [origin, kind]}."""
    folder = work / f"clothing-e{n_edits}-s{seed}{'-rot' if rotated else ''}{f'-n{limit}' if limit else ''}"
    manifest_file = folder.with_name(folder.name + ".manifest.json")
    if manifest_file.exists() and folder.exists():
        return folder, json.loads(manifest_file.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    images = sorted((clothing / "images").glob("*.jpg"))[:limit]
    if not images:
        raise SystemExit(f"no images in {clothing / 'images'}")
    rng = np.random.default_rng(seed)
    sample = sorted(rng.choice(len(images), size=min(n_edits, len(images)), replace=False).tolist())
    (folder / "images").mkdir(parents=True)
    (folder / "edits").mkdir()
    manifest: dict[str, list] = {}
    t = time.perf_counter()
    for p in images:
        shutil.copy2(p, folder / "images" / p.name)
        manifest[f"images/{p.name}"] = [p.stem, "orig"]
    for k in sample:
        for e, q in zip(EDITS, make_edits(images[k], folder / "edits"), strict=True):
            manifest[f"edits/{q.name}"] = [images[k].stem, e]
    for r in csv.DictReader(open(clothing / "duplicates.csv")):
        a, b = Path(r["a"]).name, Path(r["b"]).name
        if r["kind"] == "exact" and f"images/{b}" in manifest:  # b joins a's origin (with a's edits, if any)
            join_origins(manifest, f"images/{a}", f"images/{b}")
        elif r["kind"] == "rotated" and rotated and f"images/{b}" in manifest:
            (folder / "rotated").mkdir(exist_ok=True)
            shutil.copy2(clothing / r["a"], folder / "rotated" / a)
            manifest[f"rotated/{a}"] = [Path(b).stem, "rotated"]
    manifest_file.write_text(json.dumps(manifest))
    print(f"built {folder}: {len(manifest)} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return folder, manifest


def join_origins(manifest: dict, a: str, b: str) -> None:
    """Files of b's origin (b, its edits) become files of a's origin."""
    old, new = manifest[b][0], manifest[a][0]
    for v in manifest.values():
        if v[0] == old:
            v[0] = new


def pixel_copies(folder: Path, manifest: dict) -> list[list]:
    """Pairs of photos in images/ whose 32x32 grey thumbnails correlate >= PIXEL_COPY (cached next to the folder).

    An independent check of duplicates.csv, with no embedding: on the clothing set it finds the listed exact pair
    and one unlisted re-encoded copy (correlation 1.000; the next pair is 0.98, a different shot).
    """
    cache = folder.with_name(folder.name + ".pixel-copies.json")
    if cache.exists():
        return json.loads(cache.read_text())
    from PIL import Image

    names = sorted(n for n, v in manifest.items() if v[1] == "orig")
    x = np.zeros((len(names), 1024), np.float32)
    for k, n in enumerate(names):
        with Image.open(folder / n) as im:
            im.draft("L", (64, 64))
            g = np.asarray(im.convert("L").resize((32, 32), Image.BILINEAR), np.float32).ravel()
        x[k] = (g - g.mean()) / (g.std() + 1e-6) / 32.0
    out = []
    for lo in range(0, len(names), 2048):
        sim = x[lo : lo + 2048] @ x.T
        for a, b in zip(*np.nonzero(sim >= PIXEL_COPY), strict=True):
            if lo + a < b:
                out.append([names[lo + a], names[b], round(float(sim[a, b]), 4)])
    cache.write_text(json.dumps(out))
    return out


class Truth:
    """Files as positions 0..N-1 with origin ids and kinds; all positive pairs with their category."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder.resolve()
        self.names = sorted(manifest)
        self.pos = {n: i for i, n in enumerate(self.names)}
        origins = sorted({v[0] for v in manifest.values()})
        oid = {o: i for i, o in enumerate(origins)}
        self.origin = np.array([oid[manifest[n][0]] for n in self.names], np.int64)
        self.kind = [manifest[n][1] for n in self.names]
        a, b, cat = [], [], []
        members: dict[int, list[int]] = {}
        for i, o in enumerate(self.origin):
            members.setdefault(int(o), []).append(i)
        for m in members.values():
            for x in range(len(m)):
                for y in range(x + 1, len(m)):
                    a.append(m[x])
                    b.append(m[y])
                    cat.append(self.category(m[x], m[y]))
        self.pa, self.pb, self.pcat = np.array(a, np.int64), np.array(b, np.int64), np.array(cat)

    def category(self, a: int, b: int) -> str:
        ka, kb = sorted((self.kind[a], self.kind[b]), key=lambda k: k != "orig")
        if ka == "orig":
            return "exact" if kb == "orig" else kb
        return "edit-edit"

    def index_of(self, path: str) -> int:
        rel = os.path.relpath(os.path.realpath(path), self.folder)
        if rel not in self.pos:
            raise SystemExit(f"tool reported a file outside the ground truth: {path}")
        return self.pos[rel]

    def score_groups(self, groups: list[list[str]]) -> dict:
        """Groups (merged when they share a file) as all their within-group pairs."""
        n = len(self.names)
        sets = UnionFind(n)
        for g in groups:
            ids = [self.index_of(p) for p in g]
            for x in ids[1:]:
                sets.union(ids[0], x)
        label = sets.roots()
        _, sizes = np.unique(label, return_counts=True)
        found = int((sizes * (sizes - 1) // 2).sum())
        hit = label[self.pa] == label[self.pb]
        return self._summary(hit, found, int((sizes > 1).sum()))

    def score_pairs(self, pairs: list[tuple[str, str]]) -> dict:
        n = len(self.names)
        keys = set()
        for a, b in pairs:
            x, y = sorted((self.index_of(a), self.index_of(b)))
            if x != y:
                keys.add(x * n + y)
        found = np.fromiter(keys, np.int64, len(keys))
        hit = np.isin(self.pa * n + self.pb, found)
        return self._summary(hit, len(keys), None)

    def _summary(self, hit: np.ndarray, found: int, n_groups: int | None) -> dict:
        tp = int(hit.sum())
        out = {"files": len(self.names), "positives": len(self.pa), "found_pairs": found, "tp": tp, "fp": found - tp,
               "recall": round(tp / max(len(self.pa), 1), 4), "precision": round(tp / max(found, 1), 4),
               "groups": n_groups, "per_kind": {}}  # fmt: skip
        for c in CATEGORIES:
            sel = self.pcat == c
            if sel.any():
                out["per_kind"][c] = {"recall": round(float(hit[sel].mean()), 4), "positives": int(sel.sum())}
        return out


# ---------------------------------------------------------------- the tools


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_fastdup(python: str, folder: Path, work: Path, reuse: bool) -> tuple[dict, dict]:
    """fastdup's result and timing; with `reuse`, those of the last run on this folder (not re-timed)."""
    fd_work = work / f"fastdup-work-{folder.name}"
    out, timing = fd_work.with_name(fd_work.name + ".out.json"), fd_work.with_name(fd_work.name + ".timing.json")
    if reuse and out.exists() and timing.exists():
        return json.loads(out.read_text()), {**json.loads(timing.read_text()), "reused": True}
    if fd_work.exists():
        shutil.rmtree(fd_work)
    _, wall, peak = run([python, "-c", FASTDUP_CHILD, str(folder), str(fd_work), str(out)],
                        env={**os.environ, "SENTRY_OPT_OUT": "1"})  # fmt: skip
    t = {"wall_s": round(wall, 1), "peak_rss_mib": round(peak), "at": _now()}
    timing.write_text(json.dumps(t))
    return json.loads(out.read_text()), t


def run_simsearch(folder: Path, index_dir: Path, index_args: list[str], dedup_args: list[str], reuse: bool):
    path = [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    timing: dict = {}
    saved = index_dir.with_name(index_dir.name + ".timing.json")
    if reuse and index_dir.exists():
        timing["index"] = {**json.loads(saved.read_text()), "reused": True} if saved.exists() else None
    else:
        if index_dir.exists():
            shutil.rmtree(index_dir)
        _, wall, peak = run([sys.executable, "-c", CLI, "index", str(folder), "--index", str(index_dir), *index_args],
                            env=env)  # fmt: skip
        timing["index"] = {"wall_s": round(wall, 1), "peak_rss_mib": round(peak), "at": _now()}
        saved.write_text(json.dumps(timing["index"]))
    cmd = [sys.executable, "-c", CLI, "dedup", "--index", str(index_dir), "--json", *dedup_args]
    stdout, wall, peak = run(cmd, env=env)
    timing["dedup"] = {"wall_s": round(wall, 1), "peak_rss_mib": round(peak)}
    return json.loads(stdout), timing


# ---------------------------------------------------------------- the threshold analysis


def stored_vectors(index_dir: Path, truth: Truth) -> np.ndarray:
    from simsearch.index.store import IndexStore

    with IndexStore.open(index_dir) as store:
        rows = {r.id: r.path for r in store.all_rows()}
        vecs = np.zeros((len(truth.names), store.dim), np.float32)
        seen = np.zeros(len(truth.names), bool)
        for ids, v in store.iter_vectors():
            at = [truth.index_of(rows[int(i)]) for i in ids]
            vecs[at] = v
            seen[at] = True
    if not seen.all():
        raise SystemExit(f"{int((~seen).sum())} files have no vector in {index_dir}")
    return vecs


def group_scores(n: int, i: np.ndarray, j: np.ndarray, truth: Truth) -> tuple[int, int]:
    """(tp, found pairs) of the connected groups over the pairs (i, j)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, label = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    _, sizes = np.unique(label, return_counts=True)
    return int((label[truth.pa] == label[truth.pb]).sum()), int((sizes * (sizes - 1) // 2).sum())


def threshold_analysis(vecs: np.ndarray, truth: Truth, default: float) -> dict:
    from simsearch.dedup.graph import similar_pairs

    n = len(vecs)
    pos_s = np.einsum("ij,ij->i", vecs[truth.pa], vecs[truth.pb])
    i, j, s = similar_pairs(vecs, LOW)
    same = truth.origin[i] == truth.origin[j]
    neg_s = s[~same]
    npos = len(pos_s)
    is_orig = np.array([k == "orig" for k in truth.kind])
    two_photos = is_orig[i] & is_orig[j]  # a false pair of two different photos (not involving an edit)

    def band(low: float, high: float) -> dict:
        """Candidate pairs with cosine in [low, high), and the dedup groups if a perfect verifier checked them
        (pairs >= high are taken as they are, pairs below low are dropped)."""
        inb = (s >= low) & (s < high)
        keep = (s >= high) | (inb & same)
        gtp, gfound = group_scores(n, i[keep], j[keep], truth)
        # a pair whose files are already in one group needs no check: best first, skip those
        sets = UnionFind(n)
        sets.union_many(i[s >= high], j[s >= high])
        checks, described = 0, set()
        for k in np.nonzero(inb)[0][np.argsort(-s[inb], kind="stable")]:
            if not sets.connected(int(i[k]), int(j[k])):
                checks += 1
                described.update((int(i[k]), int(j[k])))
                if same[k]:
                    sets.union(int(i[k]), int(j[k]))
        return {"low": round(low, 4), "high": high, "pairs": int(inb.sum()), "true": int((inb & same).sum()),
                "false": int((inb & ~same).sum()), "false_two_photos": int((inb & ~same & two_photos).sum()),
                "checks_skipping_grouped": checks, "files_in_checks": len(described),
                "oracle_group_recall": round(gtp / npos, 4),
                "oracle_group_precision": round(gtp / max(gfound, 1), 4)}  # fmt: skip

    curve = []
    for t in GRID:
        tp, fp = int((pos_s >= t).sum()), int((neg_s >= t).sum())
        keep = s >= t
        gtp, gfound = group_scores(n, i[keep], j[keep], truth)
        per = {c: round(float((pos_s[truth.pcat == c] >= t).mean()), 4) for c in CATEGORIES if (truth.pcat == c).any()}
        curve.append({"threshold": t, "tp": tp, "fp": fp, "recall": round(tp / npos, 4),
                      "precision": round(tp / max(tp + fp, 1), 4), "group_recall": round(gtp / npos, 4),
                      "group_precision": round(gtp / max(gfound, 1), 4), "group_fp": gfound - gtp,
                      "per_kind": per})  # fmt: skip
    targets = []
    desc = np.sort(pos_s)[::-1]
    for r in TARGETS:
        need = int(np.ceil(r * npos))
        t = float(desc[need - 1])  # the highest threshold that keeps `need` positive pairs
        tp, fp = int((pos_s >= t).sum()), int((neg_s >= t).sum())
        # dedup groups connect pairs transitively: the highest threshold whose groups reach the target
        lo, hi = t, 1.0  # groups hold every pair >= t, so t itself reaches the target
        for _ in range(25):
            mid = (lo + hi) / 2
            gtp, _f = group_scores(n, i[s >= mid], j[s >= mid], truth)
            lo, hi = (mid, hi) if gtp >= need else (lo, mid)
        keep = s >= lo
        gtp, gfound = group_scores(n, i[keep], j[keep], truth)
        targets.append({"recall_target": r, "pair_threshold": round(t, 4), "precision": round(tp / max(tp + fp, 1), 4),
                        "tp": tp, "fp": fp, "group_threshold": round(lo, 4),
                        "group_precision": round(gtp / max(gfound, 1), 4), "group_fp": gfound - gtp,
                        "bands": [band(b, top) for b in (t, lo) for top in (default, *VERIFY_UP_TO)]})  # fmt: skip
    lowest = {c: round(float(pos_s[truth.pcat == c].min()), 4) for c in CATEGORIES if (truth.pcat == c).any()}
    above = (s >= default) & ~same
    top_neg = float(neg_s.max()) if len(neg_s) else 0.0
    exact_p = {c: round(float((pos_s[truth.pcat == c] > top_neg).mean()), 4) for c in lowest}
    return {"curve": curve, "targets": targets, "lowest_positive_cosine": lowest,
            "at_precision_1": {"threshold": f"> {top_neg:.4f}", "recall": round(float((pos_s > top_neg).mean()), 4),
                               "per_kind": exact_p},
            "false_pairs_at_default": {"two_photos": int((above & two_photos).sum()),
                                       "with_an_edit": int((above & ~two_photos).sum())},
            "highest_negative_cosine": round(float(neg_s.max()), 4) if len(neg_s) else None}  # fmt: skip


# ---------------------------------------------------------------- output


def print_table(rows: list[dict]) -> None:
    cats = [c for c in CATEGORIES if any(c in r["score"]["per_kind"] for r in rows)]
    head = f"{'tool':<34} {'files':>6} {'recall':>7} {'prec':>7} {'TP':>6} {'FP':>5} " + " ".join(
        f"{c:>9}" for c in cats
    )
    head += f" {'index s':>8} {'dedup s':>8} {'total s':>8} {'peak MiB':>9}"
    print(head)
    for r in rows:
        sc, t = r["score"], r["time"]
        kinds = " ".join(f"{sc['per_kind'][c]['recall']:>9.4f}" if c in sc["per_kind"] else f"{'-':>9}" for c in cats)
        idx = f"{t['index_s']:>8.1f}" if t.get("index_s") is not None else f"{'-':>8}"
        ded = f"{t['dedup_s']:>8.1f}" if t.get("dedup_s") is not None else f"{'-':>8}"
        print(f"{r['tool']:<34} {sc['files']:>6} {sc['recall']:>7.4f} {sc['precision']:>7.4f} {sc['tp']:>6} "
              f"{sc['fp']:>5} {kinds} {idx} {ded} {t['total_s']:>8.1f} {t['peak_rss_mib']:>9}")  # fmt: skip


def print_analysis(a: dict, default: float) -> None:
    cats = list(a["curve"][0]["per_kind"])
    print("\n== simsearch vectors: pairs with cosine >= t (raw pairs, then the connected groups dedup forms)")
    print(f"{'t':>5} {'recall':>7} {'prec':>7} {'TP':>6} {'FP':>6} {'grp rec':>8} {'grp prec':>8} {'grp FP':>7} "
          + " ".join(f"{c:>9}" for c in cats))  # fmt: skip
    for r in a["curve"]:
        print(f"{r['threshold']:>5.2f} {r['recall']:>7.4f} {r['precision']:>7.4f} {r['tp']:>6} {r['fp']:>6} "
              f"{r['group_recall']:>8.4f} {r['group_precision']:>8.4f} {r['group_fp']:>7} "
              + " ".join(f"{r['per_kind'][c]:>9.4f}" for c in cats))  # fmt: skip
    low = a["lowest_positive_cosine"]
    print("lowest positive cosine per kind: " + ", ".join(f"{k} {v:.3f}" for k, v in low.items()))
    p1 = a["at_precision_1"]
    print(f"at precision 1 (cosine {p1['threshold']}): pair recall {p1['recall']:.4f}; "
          + ", ".join(f"{k} {v:.4f}" for k, v in p1["per_kind"].items()))  # fmt: skip
    for t in a["targets"]:
        print(f"recall {t['recall_target']}: raw pairs need t <= {t['pair_threshold']:.4f} (precision "
              f"{t['precision']:.4f}, {t['fp']} false pairs); dedup's connected groups reach it at t "
              f"{t['group_threshold']:.4f} (precision {t['group_precision']:.4f}, "
              f"{t['group_fp']} false pairs)")  # fmt: skip
        for b in t["bands"]:
            print(f"  verify [{b['low']:.4f}, {b['high']}): {b['pairs']:>5} pairs ({b['true']} true, "
                  f"{b['false']} false, {b['false_two_photos']} of those two photos) = {b['pairs'] * 5 / 1000:.0f}-"
                  f"{b['pairs'] * 20 / 1000:.0f} s at 5-20 ms/pair, or {b['checks_skipping_grouped']} checks of "
                  f"{b['files_in_checks']} files if pairs already grouped are skipped; a perfect verifier: "
                  f"group recall {b['oracle_group_recall']:.4f}, "
                  f"precision {b['oracle_group_precision']:.4f}")  # fmt: skip
    f = a["false_pairs_at_default"]
    print(f"false pairs >= {default}: {f['two_photos']} between two different photos, {f['with_an_edit']} with an edit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clothing", type=Path)
    ap.add_argument("--edits", type=int, default=500, help="How many sampled photos get the five edits.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rotated", action="store_true", help="Also put the 25 rotated/ copies in the folder.")
    ap.add_argument("--limit", type=int, default=None, help="Use only the first N photos (a quick check).")
    ap.add_argument("--fastdup-python", default="/work/venvs/fastdup/bin/python")
    ap.add_argument("--skip-fastdup", action="store_true")
    ap.add_argument("--simsearch-args", default="", help="Extra arguments for `simsearch dedup`.")
    ap.add_argument("--index-args", default="", help="Extra arguments for `simsearch index`.")
    ap.add_argument("--reuse-index", action="store_true", help="Keep an existing index (shows its earlier timing).")
    ap.add_argument("--reuse-fastdup", action="store_true", help="Reuse fastdup's last result on this folder.")
    ap.add_argument("--listed-only", action="store_true",
                    help="Ground truth from duplicates.csv only (no pixel-identical copies it misses).")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/peer-data"), help="Cache for the folder and outputs.")
    ap.add_argument("--no-analysis", action="store_true", help="Skip the threshold analysis of the stored vectors.")
    args = ap.parse_args()
    from simsearch.dedup.finder import DEFAULT_THRESHOLD

    args.work.mkdir(parents=True, exist_ok=True)
    folder, manifest = build_folder(args.clothing, args.edits, args.seed, args.work, args.rotated, args.limit)
    copies = [] if args.listed_only else pixel_copies(folder, manifest)
    for a, b, _c in copies:
        join_origins(manifest, a, b)
    truth = Truth(folder, manifest)
    rows, extra = [], {}
    if not args.skip_fastdup:
        res, t = run_fastdup(args.fastdup_python, folder, args.work, args.reuse_fastdup)
        extra["fastdup"] = {**{k: res[k] for k in ("version", "ccthreshold", "threshold", "k")}, "timing": t}
        rows.append({"tool": f"fastdup {res['version']} components", "score": truth.score_groups(res["components"]),
                     "time": {"total_s": t["wall_s"], "peak_rss_mib": t["peak_rss_mib"]}})  # fmt: skip
        rows.append({"tool": "fastdup similarity() pairs", "score": truth.score_pairs([p[:2] for p in res["pairs"]]),
                     "time": {"total_s": t["wall_s"], "peak_rss_mib": t["peak_rss_mib"]}})  # fmt: skip
    tag = "-".join(args.index_args.replace("--", "").split()) or "default"
    index_dir = args.work / f"index-{folder.name}-{tag}"
    report, t = run_simsearch(folder, index_dir, shlex.split(args.index_args), shlex.split(args.simsearch_args),
                              args.reuse_index)  # fmt: skip
    groups = [g["files"] for g in report["groups"] if g["kind"] != "similar"]  # copies only: what actions remove
    similar = [g["files"] for g in report["groups"] if g["kind"] == "similar"]
    name = " ".join(x for x in ["simsearch", args.index_args, args.simsearch_args] if x)
    idx_s = t["index"]["wall_s"] if t["index"] else None
    peaks = [x["peak_rss_mib"] for x in (t["index"], t["dedup"]) if x]
    rows.append({"tool": name, "score": truth.score_groups(groups),
                 "time": {"index_s": idx_s, "dedup_s": t["dedup"]["wall_s"], "peak_rss_mib": max(peaks),
                          "total_s": (idx_s or 0) + t["dedup"]["wall_s"]}})  # fmt: skip
    extra["simsearch"] = {"threshold": report["threshold"], "index_dir": str(index_dir), "timing": t}
    extra["pixel_copies"] = copies
    print(f"\n== {folder} ({len(truth.names)} files, {len(truth.pa)} duplicate pairs); CPU {os.cpu_count()} cores")
    if copies:
        print("ground truth also joins pixel-identical photos: " + "; ".join(f"{a} = {b} ({c})" for a, b, c in copies))
    for what, x in (("fastdup", extra.get("fastdup", {}).get("timing")), ("simsearch index", t["index"])):
        if x and x.get("reused"):
            print(f"{what} time is from its run at {x.get('at', '?')} (reused result)")
    print_table(rows)
    if similar:  # other shots (kind "similar"): not copies, never removed by default
        sim = truth.score_groups(groups + similar)
        print(f"simsearch similar groups: {len(similar)}; with them the groups would hold {sim['tp']} true and "
              f"{sim['fp']} false pairs (copies only: {rows[-1]['score']['tp']} true, {rows[-1]['score']['fp']} "
              f"false); similar pairs are other shots or look-alikes the copy tier kept out")  # fmt: skip
        extra["similar"] = {"groups": len(similar), "with_similar": sim}
    if report.get("tiers"):
        print(f"simsearch tiers: {report['tiers']}")
    manifest = json.loads((index_dir / "manifest.json").read_text())
    print(f"simsearch model: {manifest['backbone']} {manifest['weights']}, precision {manifest['precision']} "
          f"(auto: fp16 where the CPU computes float16 natively)")  # fmt: skip
    extra["simsearch"]["precision"] = manifest["precision"]
    fd_rows = [r for r in rows if r["tool"].endswith("components")]
    if fd_rows and idx_s:
        ratio = fd_rows[0]["time"]["total_s"] / rows[-1]["time"]["total_s"]
        print(f"fastdup wall time / simsearch (index + dedup) wall time: {ratio:.2f}x")
    analysis = None
    if not args.no_analysis:
        analysis = threshold_analysis(stored_vectors(index_dir, truth), truth, DEFAULT_THRESHOLD)
        print_analysis(analysis, DEFAULT_THRESHOLD)
    print(json.dumps({"folder": str(folder), "rows": rows, "tools": extra, "analysis": analysis}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
