"""Labelled image sets: one subfolder per label (or a path,label CSV), checked, and split for validation.

The default split holds out whole labels, so validation measures what users need from an adapted model: finding
other images of items it never saw in training. `split="images"` holds out images of every label instead, for
class-level use.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from ..images import find_images

SPLITS = ("labels", "images")


@dataclass
class LabelledSet:
    """Image paths (absolute) with one label each; `warnings` says what was dropped and why."""

    paths: list[str]
    labels: list[str]
    root: str
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))

    def label_ids(self) -> np.ndarray:
        """Labels as int ids (alphabetical order of names)."""
        index = {name: i for i, name in enumerate(self.label_names)}
        return np.array([index[x] for x in self.labels], dtype=np.int64)

    def subset(self, keep: np.ndarray | list[int]) -> LabelledSet:
        keep = [int(i) for i in keep]
        return LabelledSet([self.paths[i] for i in keep], [self.labels[i] for i in keep], self.root)

    def digest(self) -> str:
        """sha256 of the sorted (relative path, label) list: identifies the training data in a manifest."""
        h = hashlib.sha256()
        for p, lab in sorted(zip(self.paths, self.labels, strict=True)):
            h.update(f"{os.path.relpath(p, self.root)}\t{lab}\n".encode())
        return h.hexdigest()


def load_labelled(folder: str | Path, labels_csv: str | Path | None = None, min_per_label: int = 2) -> LabelledSet:
    """Read a labelled set: the first-level subfolder of each image is its label, or `labels_csv` (path,label).

    CSV paths are relative to the CSV's folder (or absolute); a header row is allowed. Labels with fewer than
    `min_per_label` images are dropped with a warning; fewer than two labels left is an error.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise BadInputError(f"folder not found: {folder}")
    root = root.absolute()
    if labels_csv is not None:
        paths, labels = _from_csv(Path(labels_csv).expanduser(), root)
    else:
        paths, labels = [], []
        for p in find_images(root):
            rel = Path(p).relative_to(root)
            if len(rel.parts) < 2:
                continue  # images directly in the root have no label
            paths.append(str(p))
            labels.append(rel.parts[0])
        if not paths:
            raise BadInputError(
                f"no labelled images in {root}: put each label's images in a subfolder (FOLDER/LABEL/...), "
                "or pass --labels CSV"
            )
    out = LabelledSet(paths, labels, str(root))
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    small = sorted(lab for lab, n in counts.items() if n < min_per_label)
    if small:
        keep = [i for i, lab in enumerate(labels) if counts[lab] >= min_per_label]
        dropped = out
        out = out.subset(keep)
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        out.warnings.append(
            f"skipped {len(small)} label(s) with fewer than {min_per_label} images ({shown}): "
            f"{len(dropped) - len(out)} images"
        )
    if len(set(out.labels)) < 2:
        raise BadInputError(
            f"need at least 2 labels with {min_per_label} or more images each; found {len(set(out.labels))} in {root}"
        )
    return out


def _from_csv(csv_path: Path, root: Path) -> tuple[list[str], list[str]]:
    if not csv_path.is_file():
        raise BadInputError(f"labels file not found: {csv_path}")
    base = csv_path.parent.absolute()
    paths, labels, missing = [], [], 0
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for n, row in enumerate(csv.reader(f)):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise BadInputError(f"{csv_path} line {n + 1}: expected path,label")
            rel, lab = row[0].strip(), row[1].strip()
            if n == 0 and rel.lower() in ("path", "file", "filename", "image"):
                continue
            p = Path(rel).expanduser()
            if not p.is_absolute():
                p = (base / p) if (base / p).exists() else (root / p)
            if not p.is_file():
                missing += 1
                continue
            paths.append(str(p.absolute()))
            labels.append(lab)
    if missing:
        print(f"simsearch: warning: {missing} file(s) listed in {csv_path.name} not found, skipped", file=sys.stderr)
    if not paths:
        raise BadInputError(f"no existing image files listed in {csv_path}")
    return paths, labels


@dataclass
class Split:
    """Indices into a LabelledSet for training and validation, and how they were chosen."""

    train: np.ndarray
    val: np.ndarray
    kind: str
    fraction: float
    seed: int

    def to_json(self, data: LabelledSet) -> dict[str, object]:
        val_labels = sorted({data.labels[i] for i in self.val})
        return {"kind": self.kind, "val_fraction": self.fraction, "seed": self.seed, "train_images": len(self.train),
                "val_images": len(self.val), "val_labels": len(val_labels)}  # fmt: skip


def split(data: LabelledSet, kind: str = "labels", fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out `fraction` of the labels (kind="labels") or of each label's images (kind="images").

    Validation always has at least 2 labels with 2 images each, so its retrieval mAP is defined.
    """
    if kind not in SPLITS:
        raise BadInputError(f"unknown split {kind!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 < fraction < 1.0:
        raise BadInputError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.array(data.labels)
    names = np.array(data.label_names)
    if kind == "labels":
        if len(names) < 4:
            raise BadInputError(
                f"holding out whole labels needs at least 4 labels (2 to train, 2 to validate); found {len(names)}. "
                "Use --split images"
            )
        n_val = min(len(names) - 2, max(2, int(round(fraction * len(names)))))
        val_names = set(rng.permutation(names)[:n_val])
        is_val = np.array([lab in val_names for lab in labels])
    else:
        is_val = np.zeros(len(labels), bool)
        for name in names:
            idx = rng.permutation(np.flatnonzero(labels == name))
            n_val = int(round(fraction * len(idx)))
            if len(idx) >= 4:
                n_val = min(len(idx) - 2, max(2, n_val))
            elif n_val == 1:
                n_val = 0  # a single held-out image has no relevant partner
            is_val[idx[:n_val]] = True
        if len(set(labels[is_val])) < 2:
            raise BadInputError("too few images per label to hold some out for validation; use more images")
    return Split(np.flatnonzero(~is_val), np.flatnonzero(is_val), kind, fraction, seed)
