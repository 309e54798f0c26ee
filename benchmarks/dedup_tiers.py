"""Copies vs other shots (issue 26): how well each evidence separates the two tiers, and what it costs.

    python benchmarks/dedup_tiers.py ../shared/data [--photos 800] [--copied 100] [--bursts 40]
        [--work /tmp/tiers-bench] [--before SRC]

The library (built once under --work): `--photos` clothing photos, of which `--copied` get copies (JPEG q40, half
size, 90% centre crop, +30% brightness, a caption, PNG, WebP) and `--bursts` others become bursts of three shots
(each re-rendered from a slightly shifted viewpoint: a perspective warp of up to 4% of the side, a pasted element
that moves, an exposure change of up to 12%; no EXIF); views/triple and views/stitch (several shots of each scene);
covers (a scan and four phone photos of each of 50 covers; the phone photos get EXIF: the phone as camera and their
own capture time, as a phone writes them). Positives: copy pairs (a photo and its copies, and two copies of one
photo); other-shot pairs: the shots of one burst, scene or cover. Rows, each a `find_duplicates` run on one index:
- before: every related pair a copy (what dedup did before: `--before SRC` runs that code, e.g. a `git archive`
  of the last commit before the tiers, in a child process);
- EXIF only / pixels only / pixels + EXIF (ablations): cosine from the default threshold relates pairs, the named
  evidence alone picks the tier (EXIF only: a copy unless capture times or cameras differ);
- pixels + EXIF + local features (the default): pairs the pixels cannot place are matched by SIFT; once in this
  process (comparable with the ablations, which patch it), once as dedup runs it (one worker process per core).
Per row: copy recall, other-shot pairs called copies, other-shot pairs reported similar (in one similar group, or
their copies' kept files are), bursts reported similar, pairs compared, cost per compared pair and dedup's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

COPY_KINDS = ("q40", "half", "crop90", "bright", "text", "png", "webp")
PHONES = ("Canon", "Droid", "E63", "Palm")


def make_copies(src: Path, out: Path) -> list[tuple[Path, str]]:
    im = Image.open(src).convert("RGB")
    w, h = im.size
    dx, dy = int(w * 0.05), int(h * 0.05)
    cap = im.copy()
    ImageDraw.Draw(cap).text((10, h - 40), "© simsearch 2026", fill=(255, 255, 255), font=ImageFont.load_default(22))
    edits = {"q40": (im, "jpg", {"quality": 40}), "half": (im.resize((w // 2, h // 2), Image.BICUBIC), "jpg", {}),
             "crop90": (im.crop((dx, dy, w - dx, h - dy)), "jpg", {"quality": 90}),
             "bright": (ImageEnhance.Brightness(im).enhance(1.3), "jpg", {"quality": 90}),
             "text": (cap, "jpg", {"quality": 90}), "png": (im, "png", {}),
             "webp": (im, "webp", {"quality": 80})}  # fmt: skip
    out_paths = []
    for kind, (e, ext, kw) in edits.items():
        p = out / f"{src.stem}.{kind}.{ext}"
        e.save(p, **kw)
        out_paths.append((p, kind))
    return out_paths


def make_burst(src: Path, donor: Path, out: Path, rng: np.random.Generator, n: int = 3) -> list[Path]:
    import cv2

    a = np.asarray(Image.open(src).convert("RGB"))
    h, w = a.shape[:2]
    piece = np.asarray(Image.open(donor).convert("RGB").resize((max(8, w // 4), max(8, h // 4))))
    ph, pw = piece.shape[:2]
    x0, y0 = rng.uniform(0.1, 0.6) * w, rng.uniform(0.1, 0.6) * h
    angle = rng.uniform(0, 2 * np.pi)
    paths = []
    for k in range(n):
        jitter = rng.uniform(0.02, 0.04) if k else 0.0
        corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
        moved = corners + rng.uniform(-jitter, jitter, (4, 2)).astype(np.float32) * np.float32([w, h])
        f = cv2.warpPerspective(a, cv2.getPerspectiveTransform(corners, moved), (w, h), borderMode=cv2.BORDER_REFLECT)
        step = k * rng.uniform(0.06, 0.12)
        x = int(np.clip(x0 + np.cos(angle) * step * w, 0, w - pw))
        y = int(np.clip(y0 + np.sin(angle) * step * h, 0, h - ph))
        f = f.copy()
        f[y : y + ph, x : x + pw] = piece
        gain = 1 + (rng.uniform(-0.12, 0.12) if k else 0.0)
        p = out / f"{src.stem}.burst{k}.jpg"
        Image.fromarray(np.clip(f.astype(np.float32) * gain, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def build(data: Path, work: Path, n_photos: int, n_copied: int, n_bursts: int) -> tuple[Path, dict]:
    """The library folder and its manifest {relpath: [origin, kind]} (kind: orig, a copy kind, burst, shot)."""
    folder = work / f"lib-p{n_photos}-c{n_copied}-b{n_bursts}"
    mf = folder.with_suffix(".json")
    if mf.exists() and folder.exists():
        return folder, json.loads(mf.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    for d in ("photos", "copies", "bursts", "views", "covers"):
        (folder / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = sorted((data / "clothing" / "images").glob("*.jpg"))
    pick = rng.choice(len(images), size=n_photos + n_bursts, replace=False)
    man: dict[str, list[str]] = {}
    for k, x in enumerate(pick[:n_photos]):
        src = images[x]
        shutil.copy2(src, folder / "photos" / src.name)
        man[f"photos/{src.name}"] = [src.stem, "orig"]
        if k < n_copied:
            for p, kind in make_copies(src, folder / "copies"):
                man[f"copies/{p.name}"] = [src.stem, kind]
    for x, d in zip(pick[n_photos:], pick[:n_bursts], strict=True):
        for p in make_burst(images[x], images[d], folder / "bursts", rng):
            man[f"bursts/{p.name}"] = [f"burst:{images[x].stem}", "burst"]
    for sub in ("triple", "stitch"):
        for p in sorted((data / "views" / sub).glob("*.jpg")):
            shutil.copy2(p, folder / "views" / p.name)
            man[f"views/{p.name}"] = [f"scene:{p.stem.rsplit('_', 1)[0]}", "shot"]
    for c in range(1, 51):
        name = f"{c:03d}.jpg"
        if (data / "covers" / "Reference" / name).exists():
            shutil.copy2(data / "covers" / "Reference" / name, folder / "covers" / f"{c:03d}-scan.jpg")
            man[f"covers/{c:03d}-scan.jpg"] = [f"cover:{c}", "shot"]
        for m, phone in enumerate(PHONES):
            src = data / "covers" / phone / name
            if not src.exists():
                continue
            exif = Image.Exif()
            exif[271], exif[272] = phone, f"{phone} phone"
            exif.get_ifd(0x8769)[36867] = f"2011:0{1 + m}:{10 + c % 18:02d} 12:{c % 60:02d}:{m * 7:02d}"
            dst = folder / "covers" / f"{c:03d}-{phone}.jpg"
            Image.open(src).convert("RGB").save(dst, quality=92, exif=exif)
            man[f"covers/{dst.name}"] = [f"cover:{c}", "shot"]
    mf.write_text(json.dumps(man))
    return folder, man


def truth_pairs(man: dict) -> tuple[set, set, set]:
    """(copy pairs, other-shot pairs, burst pairs) as frozensets of relpaths."""
    by: dict[str, list[str]] = {}
    for rel, (origin, _kind) in man.items():
        by.setdefault(origin, []).append(rel)
    copies, others, bursts = set(), set(), set()
    for files in by.values():
        for a, b in combinations(sorted(files), 2):
            pair = frozenset((a, b))
            if man[a][1] in ("burst", "shot"):
                others.add(pair)
                if man[a][1] == "burst":
                    bursts.add(pair)
            else:
                copies.add(pair)
    return copies, others, bursts


def score(groups: list[dict], folder: Path, man: dict) -> dict:
    """Pairs called copies (same exact/near group, groups sharing a file merged) and pairs reported similar."""
    rel = {str((folder / r).resolve()): r for r in man}
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for g in groups:
        if g["kind"] == "similar":
            continue
        files = [rel[os.path.realpath(f)] for f in g["files"]]
        for f in files[1:]:
            ra, rb = find(files[0]), find(f)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    head = {r: find(r) for r in man}
    scene: dict[str, int] = {}
    for k, g in enumerate(x for x in groups if x["kind"] == "similar"):
        for f in g["files"]:
            scene[head[rel[os.path.realpath(f)]]] = k
    copies, others, bursts = truth_pairs(man)

    def called_copy(p: frozenset) -> bool:
        a, b = tuple(p)
        return head[a] == head[b]

    def called_similar(p: frozenset) -> bool:
        a, b = (head[x] for x in p)
        return a != b and a in scene and scene.get(b) == scene[a]

    rec = [called_copy(p) for p in copies]
    by_source: dict[str, list[tuple[bool, bool]]] = {}
    for p in others:
        source = man[next(iter(p))][0].split(":")[0]
        by_source.setdefault(source, []).append((called_copy(p), called_similar(p)))
    per_kind: dict[str, list[bool]] = {}  # original <-> copy pairs by kind ("copy-copy": two copies)
    for p, hit in zip(copies, rec, strict=True):
        kind = "+".join(sorted(k for k in {man[x][1] for x in p} if k != "orig")) or "orig"
        per_kind.setdefault(kind if "+" not in kind else "copy-copy", []).append(hit)
    missed = sorted(sorted(p) for p, hit in zip(copies, rec, strict=True) if not hit)
    wrong = sorted(sorted(p) for p in others if called_copy(p))
    return {"copy_pairs": len(copies), "copy_recall": float(np.mean(rec)) if rec else 0.0,
            "other_pairs": len(others), "others_called_copies": float(np.mean([called_copy(p) for p in others])),
            "others_similar": float(np.mean([called_similar(p) for p in others])),
            "bursts_similar": float(np.mean([called_similar(p) for p in bursts])) if bursts else 0.0,
            "bursts_called_copies": float(np.mean([called_copy(p) for p in bursts])) if bursts else 0.0,
            "copy_recall_per_kind": {k: round(float(np.mean(v)), 4) for k, v in sorted(per_kind.items())},
            "copies_missed": missed[:200], "others_called_copies_pairs": wrong[:20],
            "others_by_source": {k: {"pairs": len(v), "called_copies": round(float(np.mean([c for c, _ in v])), 4),
                                     "similar": round(float(np.mean([x for _, x in v])), 4)}
                                 for k, v in sorted(by_source.items())}}  # fmt: skip


BEFORE_CHILD = """
import json, sys, time
from simsearch.dedup.finder import find_duplicates
from simsearch.index.store import IndexStore
t = time.perf_counter()
with IndexStore.open(sys.argv[1]) as store:
    rep = find_duplicates(store)
print(json.dumps({"seconds": time.perf_counter() - t, "report": rep.to_json()}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="../shared/data")
    ap.add_argument("--photos", type=int, default=800)
    ap.add_argument("--copied", type=int, default=100)
    ap.add_argument("--bursts", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/tiers-bench"))
    ap.add_argument("--before", type=Path, help="Source tree of the code before the tiers (run in a child).")
    args = ap.parse_args()
    from simsearch.api import SimIndex
    from simsearch.dedup.finder import auto_threshold, find_duplicates
    from simsearch.index.store import IndexStore

    args.work.mkdir(parents=True, exist_ok=True)
    folder, man = build(args.data, args.work, args.photos, args.copied, args.bursts)
    idx_dir = folder.with_name(folder.name + ".index")
    if not idx_dir.exists():
        t = time.perf_counter()
        with SimIndex.open_or_create(idx_dir) as idx:
            idx.add_folder(folder)
        print(f"indexed {len(man)} files in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    rows = []
    if args.before:
        env = {**os.environ, "PYTHONPATH": str(args.before)}
        out = subprocess.run([sys.executable, "-c", BEFORE_CHILD, str(idx_dir.resolve())], env=env,
                             capture_output=True, text=True, check=True, cwd=args.work)  # fmt: skip
        res = json.loads(out.stdout)
        rows.append({"evidence": "before: cosine + SIFT check, all copies", "seconds": res["seconds"],
                     "pairs": (res["report"].get("verified") or {}).get("checked", 0),
                     **score(res["report"]["groups"], folder, man)})  # fmt: skip
    from simsearch.dedup import tiers as tiers_mod
    from simsearch.dedup import verify as verify_mod

    real_pixels, real_exif = tiers_mod._pixels, tiers_mod.exif_verdict

    def exif_only(*_a: object) -> tiers_mod.Evidence:  # ablation: the pixels always say "copy"
        return tiers_mod.Evidence("copy", "not looked at", 64, 0.0, 0.0, 0.0, 1.0)

    with IndexStore.open(idx_dir) as store:
        t0 = auto_threshold(store)
        one = 10**9  # PARALLEL_MIN_PAIRS that keeps the work in this process (the ablations patch this process)
        runs = (("EXIF only (cosine relates), 1 process", {"threshold": t0, "verify": False}, exif_only, real_exif,
                 one),
                ("pixels only (cosine relates), 1 process", {"threshold": t0, "verify": False}, real_pixels,
                 lambda a, b: None, one),
                ("pixels + EXIF (cosine relates), 1 process", {"threshold": t0, "verify": False}, real_pixels,
                 real_exif, one),
                ("pixels + EXIF + local features, 1 process", {}, real_pixels, real_exif, one),
                ("pixels + EXIF + local features (default)", {}, real_pixels, real_exif,
                 verify_mod.PARALLEL_MIN_PAIRS))  # fmt: skip
        for name, kw, pixels, exif, split_from in runs:
            tiers_mod._pixels, tiers_mod.exif_verdict = pixels, exif
            saved, verify_mod.PARALLEL_MIN_PAIRS = verify_mod.PARALLEL_MIN_PAIRS, split_from
            t = time.perf_counter()
            try:
                rep = find_duplicates(store, **kw)
            finally:
                tiers_mod._pixels, tiers_mod.exif_verdict = real_pixels, real_exif
                verify_mod.PARALLEL_MIN_PAIRS = saved
            sec = time.perf_counter() - t
            tiers = rep.tiers or {}
            compared = tiers.get("pairs", 0) - tiers.get("implied", 0)
            rows.append({"evidence": name, "seconds": sec, "pairs": compared, "local": tiers.get("local_features", 0),
                         **score(rep.to_json()["groups"], folder, man)})  # fmt: skip
    print(f"\n== {folder}: {len(man)} files; CPU {os.cpu_count()} cores (timings on a shared machine are noisy)")
    head = (f"{'evidence':<44} {'copy rec':>8} {'others->copy':>12} {'others sim':>10} {'bursts sim':>10} "
            f"{'pairs':>6} {'ms/pair':>8} {'dedup s':>8}")  # fmt: skip
    print(head)
    for r in rows:
        per = 1000 * r["seconds"] / max(r["pairs"], 1)
        print(f"{r['evidence']:<44} {r['copy_recall']:>8.4f} {100 * r['others_called_copies']:>11.2f}% "
              f"{100 * r['others_similar']:>9.1f}% {100 * r['bursts_similar']:>9.1f}% {r['pairs']:>6} {per:>8.2f} "
              f"{r['seconds']:>8.2f}")  # fmt: skip
    r0 = rows[-1]
    print(f"positives: {r0['copy_pairs']} copy pairs, {r0['other_pairs']} other-shot pairs")
    for r in rows:
        print(f"{r['evidence']}: copy recall per kind {r['copy_recall_per_kind']}")
        print(f"    other shots by source (pairs, called copies, reported similar): {r['others_by_source']}")
    print(json.dumps({"folder": str(folder), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
