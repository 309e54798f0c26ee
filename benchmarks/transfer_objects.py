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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="folder with train/ and test/, one subfolder per object in each")
    ap.add_argument("--variant", action="append", required=True, help="NAME:simsearch train options")
    ap.add_argument("--also", type=Path, action="append", default=[], help="another labelled folder to score on")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--cache", type=Path, help="feature/TFLite cache to share (default: a new temporary one)")
    ap.add_argument("--out", type=Path, help="keep the MODEL_DIRs here")
    ap.add_argument("--json-out", type=Path, help="append each row as a JSON line to this file")
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
    print(json.dumps(rows[0]), flush=True)
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
