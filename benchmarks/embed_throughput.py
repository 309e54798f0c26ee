"""Embedding throughput, side by side in one run: decode only, Keras predict, TFLite model only, `simsearch index`.

    python benchmarks/embed_throughput.py ../shared/data/clothing/images [--limit 1000] [--backbone NAME]
    python benchmarks/embed_throughput.py ../shared/data/clothing/images --make-12mp 200   # 12-megapixel JPEGs

Decode-only and model-only figures use the same images (model-only runs on pre-decoded batches). The end-to-end
figure is the real CLI (`simsearch index --json`) in a child process, whose peak RSS is reported too. Prints
readable lines and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.images import find_images, load_image
from simsearch.models.backbones import load_backbone
from simsearch.models.embedder import DEFAULT_FIT


def make_12mp(src: list[Path], out: Path, n: int) -> list[Path]:
    """Upscale real photos to 4000x3000 JPEGs (q90): the size of a phone camera's pictures."""
    paths = []
    for k, p in enumerate(src[:n]):
        dst = out / f"big-{k:05d}.jpg"
        with Image.open(p) as im:
            im.convert("RGB").resize((4000, 3000), Image.BICUBIC).save(dst, quality=90)
        paths.append(dst)
    return paths


def pad_with_mirrors(src: list[Path], out: Path, n: int) -> list[Path]:
    """Mirrored, re-encoded copies (q90) of the first photos: new bytes, so each one is decoded and embedded."""
    paths = []
    for k in range(n):
        dst = out / f"mirror-{k:06d}.jpg"
        with Image.open(src[k % len(src)]) as im:
            im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dst, quality=90)
        paths.append(dst)
    return paths


def decode_rate(paths: list[Path], size: int, workers: int, keep: int) -> tuple[float, np.ndarray]:
    """Decode+resize rate over all paths; the first `keep` arrays are returned for the model-only figures."""
    kept = []
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for k, a in enumerate(pool.map(lambda p: load_image(p, size, DEFAULT_FIT), paths)):
            if k < keep:
                kept.append(a)
    return len(paths) / (time.perf_counter() - t), np.stack(kept)


def model_rate(fn, batches: list[np.ndarray], min_seconds: float = 0.0) -> float:
    """Images per second over the batches, repeated until `min_seconds` have passed (steadier than one short pass)."""
    fn(batches[0])  # warm-up (graph tracing, allocation)
    t = time.perf_counter()
    n = 0
    while True:
        for b in batches:
            fn(b)
            n += len(b)
        if time.perf_counter() - t >= min_seconds:
            return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=None, help="Use the first N images (default all).")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--weights", default="imagenet", help="imagenet, none (random: fine for speed) or a file")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--keras-limit", type=int, default=320, help="Images for the (slow) Keras predict figure.")
    ap.add_argument("--model-limit", type=int, default=1024, help="Pre-decoded images for TFLite model-only.")
    ap.add_argument(
        "--model-seconds",
        type=float,
        default=10.0,
        help="Repeat the TFLite model-only passes for at least this long (this machine's speed drifts).",
    )
    ap.add_argument("--make-12mp", type=int, default=0, metavar="N", help="Benchmark N upscaled 12 MP JPEGs.")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument(
        "--pad-to",
        type=int,
        default=0,
        metavar="N",
        help="Add mirrored copies of the photos until there are N images (e.g. 10000 for the RSS check).",
    )
    args = ap.parse_args()
    if not args.folder.is_dir():
        print(f"folder not found: {args.folder}", file=sys.stderr)
        return 1
    paths = list(find_images(args.folder))[: args.limit]
    workers = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="simsearch-bench-") as tmp:
        tmp = Path(tmp)
        if args.make_12mp:
            (tmp / "big").mkdir()
            paths = make_12mp(paths, tmp / "big", args.make_12mp)
            folder = tmp / "big"
        else:
            folder = tmp / "links"
            folder.mkdir()
            for p in paths:
                (folder / p.name).symlink_to(p.resolve())
            if args.pad_to > len(paths):
                paths = paths + pad_with_mirrors(paths, folder, args.pad_to - len(paths))

        # The CLI runs first, while this process is still small: a forked child's peak RSS counts the parent's pages.
        cmd = [sys.executable, "-m", "simsearch.cli", "index", str(folder), "--index", str(tmp / "index"),
               "--backbone", args.backbone, "--weights", str(args.weights), "--batch-size", str(args.batch_size),
               "--precision", args.precision, "--json"]  # fmt: skip
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        out = json.loads(r.stdout)
        e2e_rate = out["embedded"] / out["seconds"]
        child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        weights = None if args.weights == "none" else args.weights
        t = time.perf_counter()
        bb = load_backbone(args.backbone, weights=weights)
        build_s = time.perf_counter() - t
        size = bb.input_size
        dec_rate, pixels = decode_rate(paths, size, workers, args.model_limit)
        x = bb.preprocess(pixels)
        batches = [x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)]
        keras_batches = batches[: max(1, args.keras_limit // args.batch_size)]
        keras_rate = model_rate(lambda b: bb.model.predict(b, verbose=0), keras_batches)

        from simsearch.models.embedder import Embedder

        emb = Embedder(bb, precision=args.precision)
        lite = emb.engine_name.startswith("tflite")
        lite_rate = model_rate(emb.engine, batches, args.model_seconds) if lite else float("nan")
        # Reference: how the model ran before per-core interpreters and micro-batches (one interpreter, all threads,
        # the whole batch per invoke).
        single_rate = float("nan")
        if lite:
            from simsearch.models.tflite_exec import _Interpreter, _interpreter_class

            one = _Interpreter(_interpreter_class()[0], emb.engine.model_bytes, workers)
            single_rate = model_rate(one, batches, args.model_seconds)

    res = {
        "images": len(paths),
        "backbone": args.backbone,
        "input_size": size,
        "model_build_s": round(build_s, 2),
        "decode_img_s": round(dec_rate, 1),
        "keras_predict_img_s": round(keras_rate, 1),
        "tflite_model_img_s": round(lite_rate, 1),
        "tflite_single_interpreter_img_s": round(single_rate, 1),
        "end_to_end_img_s": round(e2e_rate, 1),
        "end_to_end_wall_s": round(wall, 1),
        "e2e_vs_tflite": round(e2e_rate / lite_rate, 3),
        "e2e_vs_keras": round(e2e_rate / keras_rate, 2),
        "peak_rss_mib_index_process": round(child_rss),
        "engine": emb.engine_name,
        "cores": os.cpu_count(),
    }
    print(f"images:                 {res['images']} ({'12 MP' if args.make_12mp else 'as found'}), {args.backbone} "
          f"{size}px, {res['cores']} cores")  # fmt: skip
    print(f"decode + resize only:   {res['decode_img_s']:8.1f} img/s ({workers} threads)")
    print(f"Keras Model.predict:    {res['keras_predict_img_s']:8.1f} img/s (model only, {len(keras_batches)} batches)")
    print(f"TFLite model only:      {res['tflite_model_img_s']:8.1f} img/s ({res['engine']}, {workers} interpreters"
          f" x 1 thread, {getattr(emb.engine, 'micro_batch', '?')} images per invoke)")  # fmt: skip
    print(f"  reference, before:    {res['tflite_single_interpreter_img_s']:8.1f} img/s (1 interpreter x {workers} "
          f"threads, {args.batch_size} images per invoke)")  # fmt: skip
    print(f"simsearch index (e2e):  {res['end_to_end_img_s']:8.1f} img/s "
          f"({res['e2e_vs_tflite']:.2f}x TFLite model-only, {res['e2e_vs_keras']:.2f}x Keras predict)")  # fmt: skip
    print(f"peak RSS of the index process: {res['peak_rss_mib_index_process']} MiB")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
