"""Compare backbones (built-in names or trained MODEL_DIRs) on a labelled folder, side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..models.backbones import DEFAULT_BACKBONE
from .labels import load_labelled
from .metrics import retrieval_metrics


def evaluate(
    folder: str | Path,
    backbones: list[str] | tuple[str, ...] = (DEFAULT_BACKBONE,),
    labels: str | Path | None = None,
    target_precision: float = 0.99,
    weights: str | Path | None = "imagenet",
    heldout: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """All-vs-all retrieval metrics of each backbone on the labelled images of `folder` (see `metrics`).

    `heldout`: a MODEL_DIR whose validation files are the only ones evaluated, so that a trained model is never
    scored on images it learnt from. A model refit on all labels has learnt from them too: its rows then carry
    "heldout_trained_on": true (training's held-out figures are those of its selection run). Unreadable files are
    skipped (counted in "skipped").
    """
    if not 0.0 < target_precision <= 1.0:
        raise BadInputError(f"--target-precision must be in (0, 1], got {target_precision}")
    data = load_labelled(folder, labels)
    if heldout is not None:
        data = _heldout_subset(data, Path(heldout).expanduser())
    from ..models.embedder import DEFAULT_FIT, Embedder
    from ..models.model_dir import is_model_dir, read_manifest
    from .features import extract_features

    results = []
    for name in backbones or [DEFAULT_BACKBONE]:
        fit = read_manifest(name, verify=False).get("fit", DEFAULT_FIT) if is_model_dir(name) else DEFAULT_FIT
        emb = Embedder(str(name), weights=weights, fit=fit)
        vecs, ok, errors = extract_features(emb, data.paths, progress)
        lab = np.array(data.labels)[ok]
        counts = {x: int((lab == x).sum()) for x in set(lab.tolist())}
        keep = np.array([counts[x] >= 2 for x in lab], bool)
        if len(set(lab[keep].tolist())) < 2:
            raise BadInputError("fewer than 2 labels with 2 readable images: nothing to evaluate")
        m = retrieval_metrics(vecs[keep], lab[keep], target_precision=target_precision)
        row = {"backbone": emb.backbone.name, **m.to_json(), "skipped": len(errors)}
        if is_model_dir(name):  # models trained before test-time views existed have none
            row["tta"] = read_manifest(name, verify=False).get("tta", "none")
        if heldout is not None and is_model_dir(name):
            refit = read_manifest(name, verify=False).get("training", {}).get("refit") or {}
            row["heldout_trained_on"] = bool(refit.get("done"))
        results.append(row)
    return results


def _heldout_subset(data: Any, model_dir: Path) -> Any:
    from ..models.model_dir import read_manifest

    read_manifest(model_dir, verify=False)
    sfile = model_dir / "split.json"
    if not sfile.is_file():
        raise BadInputError(f"{model_dir} has no split.json: cannot tell its held-out images")
    val = set(json.loads(sfile.read_text()).get("val_files", []))
    keep = [i for i, p in enumerate(data.paths) if str(Path(p).relative_to(data.root)) in val]
    if not keep:
        raise BadInputError(f"none of {model_dir.name}'s held-out files are in {data.root}")
    return data.subset(keep)
