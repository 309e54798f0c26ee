"""A trained model directory (MODEL_DIR): the Keras embedding model plus a manifest that makes it self-describing.

Layout: `model.keras` (preprocessed pixels -> L2-normalised embedding), `simsearch-model.json` (base backbone,
weights digest, preprocessing, input size, fit, dim, training files digest, split, metrics), and what training
leaves for people: `history.json`, `training.png`, `split.json`. Reading the manifest needs no TensorFlow, so a
cached TFLite conversion of a trained model starts as fast as a built-in backbone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import BadInputError
from .backbones import file_digest

MODEL_FORMAT = "simsearch-model"
MODEL_FORMAT_VERSION = 1
MANIFEST_FILE = "simsearch-model.json"
MODEL_FILE = "model.keras"


def is_model_dir(path: str | Path) -> bool:
    """True when `path` is a directory holding a simsearch model manifest."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / MANIFEST_FILE).is_file()


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a MODEL_DIR, checked: format, version, model file present and (with `verify`) its sha256."""
    d = Path(path).expanduser().absolute()
    mpath = d / MANIFEST_FILE
    if not mpath.is_file():
        raise BadInputError(f"{d} is not a simsearch model directory (no {MANIFEST_FILE})")
    try:
        m = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BadInputError(f"model directory {d} is damaged: cannot read {MANIFEST_FILE} ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MODEL_FORMAT:
        raise BadInputError(f"{d} is not a simsearch model directory ({MANIFEST_FILE} has another format)")
    if m.get("version") != MODEL_FORMAT_VERSION:
        raise BadInputError(
            f"model directory {d} has format version {m.get('version')}; this simsearch reads version "
            f"{MODEL_FORMAT_VERSION}: train it again with this version"
        )
    for key in ("input_size", "dim", "preprocess", "model_sha256", "base"):
        if key not in m:
            raise BadInputError(f"model directory {d} is damaged: its manifest has no {key!r}")
    model = d / m.get("model_file", MODEL_FILE)
    if not model.is_file():
        raise BadInputError(f"model directory {d} is damaged: {model.name} is missing")
    if verify and file_digest(model) != m["model_sha256"]:
        raise BadInputError(f"model directory {d} is damaged: {model.name} does not match its manifest checksum")
    m["path"] = str(d)
    m["model_path"] = str(model)
    return m


def write_model_dir(out: Path, model: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """Save `model` and its manifest into `out` (a fresh directory); returns the manifest as written."""
    out.mkdir(parents=True, exist_ok=True)
    mfile = out / MODEL_FILE
    model.save(mfile)
    full = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, **manifest, "model_file": MODEL_FILE,
            "model_sha256": file_digest(mfile)}  # fmt: skip
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True))
    os.replace(tmp, out / MANIFEST_FILE)
    return full


def load_model(manifest: dict[str, Any]) -> Any:
    """The Keras model of a checked manifest (custom simsearch layers registered first)."""
    from ._keras import keras
    from .backbones import register_custom_layers

    register_custom_layers()
    try:
        return keras().saving.load_model(manifest["model_path"], compile=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot load the model of {manifest['path']}: {first}") from None
