"""Transfer learning on unseen objects: train on some objects, score on objects never trained on (nor validated on).

    python benchmarks/multiview.py synthetic ../shared/data/clothing /tmp/mv       # OUT/train, OUT/test
    python benchmarks/transfer_objects.py /tmp/mv [--also ../shared/data/views] \\
        --variant "head:--mode head --no-refit" --variant "head+refit:--mode head" ...

Each variant runs `simsearch train OUT/train --json OPTIONS` in a child process (wall time, peak RSS; `simsearch
train` splits OUT/train by label for its own model selection), then `simsearch eval OUT/test -b BASE -b MODEL_DIR
--json` in another: the test objects were seen by neither selection nor refit, so the test mAP is an honest
figure for "the next items the user adds". `--also FOLDER` scores the same models on another labelled folder (e.g.
the real views set). The feature cache is shared by the variants (`--cold` gives every training a cold one, for
timing), so times are indicative: the CPU is shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

from child_rss import CLI, run


def simsearch(args: list[str], env: dict[str, str]) -> tuple[dict, float, float]:
    """`simsearch ARGS` in a child: (JSON answer, wall s, peak RSS MiB)."""
    out, wall, rss = run([sys.executable, "-c", CLI, *args], env)
    return json.loads(out.strip().splitlines()[-1]), wall, rss


def fixed_head(train: Path, sets: list[Path], epochs: int, backbone: str, loss: str = "ms") -> dict:
    """The reference: a plain linear head on every training label for a fixed number of epochs, no selection.

    Uses the library's own head and loss (`trainer._HeadFit`) on the cached frozen features, scored on each set.
    """
    import time

    import numpy as np

    from simsearch.models.embedder import Embedder
    from simsearch.training.features import extract_features
    from simsearch.training.labels import load_labelled
    from simsearch.training.metrics import retrieval_metrics
    from simsearch.training.trainer import DEFAULTS, _HeadFit

    t = time.perf_counter()
    emb = Embedder(backbone)
    data = load_labelled(train)
    f, ok, _ = extract_features(emb, data.paths)
    _, y = np.unique(np.array(data.labels)[ok], return_inverse=True)
    cfg = DEFAULTS["head"]
    fit = _HeadFit(f, y, 256, 0.1, 0, loss, cfg["lr"], 1e-4, 0.0)
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        fit.epoch(cfg["batch_size"], rng)
    row: dict = {"variant": f"fixed-{epochs}-head", "options": f"all labels, {epochs} epochs, {loss}",
                 "train_s": round(time.perf_counter() - t, 1), "train_images": len(ok)}  # fmt: skip
    for s in sets:
        d = load_labelled(s)
        v, ok2, _ = extract_features(emb, d.paths)
        m = retrieval_metrics(fit.embed(v), np.array(d.labels)[ok2], target_precision=None)
        row[str(s)] = [round(m.map, 6), round(m.p_at_1, 6)]
    return row


def tta(folder: Path, backbone: str, work: Path) -> dict[str, list[float]]:
    """Test-time options on one labelled folder: plain, flip averaging, flip + a 80% centre crop (two scales).

    Outside the model, from the original files: what first measured `simsearch train --tta`, which now builds the
    views into the trained model instead (made from its input, and with the crop's mirror too; `models.tta`).

    Each image's variants are written once to `work` and embedded by the library; the averaged vector is
    L2-normalised before scoring.
    """
    import numpy as np
    from PIL import Image, ImageOps

    from simsearch.models.embedder import Embedder
    from simsearch.training.labels import load_labelled
    from simsearch.training.metrics import retrieval_metrics

    data = load_labelled(folder)
    kinds = {"flip": ImageOps.mirror, "crop": lambda im: ImageOps.crop(im, (im.size[0] // 10, im.size[1] // 10))}
    paths = {"plain": data.paths}
    for kind, fn in kinds.items():
        paths[kind] = []
        for i, src in enumerate(data.paths):
            dst = work / kind / f"{i:05d}.jpg"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                with Image.open(src) as im:
                    fn(im.convert("RGB")).save(dst, quality=95)
            paths[kind].append(str(dst))
    emb = Embedder(backbone)
    vec = {k: emb.embed(v).vectors for k, v in paths.items()}
    lab = np.array(data.labels)

    def score(v: np.ndarray) -> list[float]:
        m = retrieval_metrics(v / np.linalg.norm(v, axis=1, keepdims=True), lab, target_precision=None)
        return [round(m.map, 6), round(m.p_at_1, 6)]

    return {"plain": score(vec["plain"]), "flip": score(vec["plain"] + vec["flip"]),
            "flip+crop": score(vec["plain"] + vec["flip"] + vec["crop"])}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="folder with train/ and test/, one subfolder per object in each")
    ap.add_argument("--variant", action="append", default=[], help="NAME:simsearch train options")
    ap.add_argument("--also", type=Path, action="append", default=[], help="another labelled folder to score on")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--cache", type=Path, help="feature/TFLite cache to share (default: a new temporary one)")
    ap.add_argument("--out", type=Path, help="keep the MODEL_DIRs here")
    ap.add_argument("--json-out", type=Path, help="append each row as a JSON line to this file")
    ap.add_argument(
        "--tta",
        action="store_true",
        help="also flip / crop averaging outside the model, from the original files (for the base backbone and "
        "--tta none models; `simsearch train --tta` builds the views into the model)",
    )
    ap.add_argument("--fixed-head", type=int, default=0, help="also the reference linear head, this many epochs")
    a = ap.parse_args()
    cache = a.cache or Path(tempfile.mkdtemp(prefix="simsearch-objects-cache-"))
    env = {**os.environ, "SIMSEARCH_CACHE": str(cache)}
    models = a.out or Path(tempfile.mkdtemp(prefix="simsearch-objects-"))
    sets = [a.root / "test", *a.also]
    base_rows = {}
    for s in sets:
        res, _, _ = simsearch(["eval", str(s), "-b", a.backbone, "--json"], env)
        base_rows[s] = res["results"][0]
    rows = [{"variant": "off-the-shelf", **{str(s): [base_rows[s]["map"], base_rows[s]["p_at_1"]] for s in sets}}]
    if a.tta:
        os.environ["SIMSEARCH_CACHE"] = str(cache)
        rows[0]["tta"] = tta(a.root / "test", a.backbone, models / "tta")
    print(json.dumps(rows[0]), flush=True)
    if a.fixed_head:
        os.environ["SIMSEARCH_CACHE"] = str(cache)
        rows.append(fixed_head(a.root / "train", sets, a.fixed_head, a.backbone))
        print(json.dumps(rows[-1]), flush=True)
    for v in a.variant:
        name, _, opts = v.partition(":")
        out = models / name
        tr, wall, rss = simsearch(["train", str(a.root / "train"), "--out", str(out), "--overwrite", "-b",
                                   a.backbone, "--json", *shlex.split(opts)], env)  # fmt: skip
        row = {"variant": name, "options": opts, "train_s": round(wall, 1), "rss_mib": round(rss),
               "val_map": tr["metrics"]["val_map"], "chosen": tr.get("chosen"), "timings": tr.get("timings"),
               "train_images": tr["split"]["train_images"] + tr["split"]["val_images"]}  # fmt: skip
        for s in sets:
            ev, _, _ = simsearch(["eval", str(s), "-b", str(out), "--json"], env)
            row[str(s)] = [ev["results"][0]["map"], ev["results"][0]["p_at_1"]]
        if a.tta:
            os.environ["SIMSEARCH_CACHE"] = str(cache)
            row["tta"] = tta(a.root / "test", str(out), models / "tta")
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json_out:
            with open(a.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print()
    head = "".join(f"{Path(s).name + ' mAP':>14}{'P@1':>7}" for s in sets)
    print(f"{'variant':<24}{'train s':>8}{'val mAP':>8}{head}")
    for r in rows:
        figs = "".join(f"{r[str(s)][0]:>14.4f}{r[str(s)][1]:>7.3f}" for s in sets)
        print(f"{r['variant']:<24}{r.get('train_s', '-'):>8}{r.get('val_map', '-'):>8}{figs}")


if __name__ == "__main__":
    main()
