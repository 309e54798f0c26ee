"""simsearch: image similarity search and duplicate finding with Keras backbones and FAISS.

The public API is importable without TensorFlow; models are built only when something is embedded.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SimIndex": "api",
    "Match": "api",
    "default_index_path": "api",
    "embed": "models.embedder",
    "Embedder": "models.embedder",
    "EmbedResult": "models.embedder",
    "load_backbone": "models.backbones",
    "list_backbones": "models.backbones",
    "DEFAULT_BACKBONE": "models.backbones",
    "find_duplicates": "dedup.finder",
    "DedupReport": "dedup.finder",
    "SimsearchError": "errors",
    "load_image": "images",
    "find_images": "images",
    "train": "training.trainer",
    "TrainResult": "training.trainer",
    "evaluate": "training.evaluation",
    "resolve_backbone": "models.backbones",
    "BackboneSpec": "models.backbones",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__, and no submodule import can replace it
        return value
    raise AttributeError(f"module 'simsearch' has no attribute {name!r}")
