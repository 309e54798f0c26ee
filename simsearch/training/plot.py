"""The training curve as a PNG: loss, and training vs validation mAP per epoch, with the kept epoch marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the curve (matplotlib, no display needed); None when there is nothing to plot."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    ax1.plot(ep, [h["loss"] for h in history], color="tab:gray")
    ax1.set(title="training loss", xlabel="epoch")
    ax2.plot(ep, [_nan(h["train_map"]) for h in history], label="train mAP", color="tab:blue")
    ax2.plot(ep, [_nan(h["val_map"]) for h in history], label="validation mAP (held out)", color="tab:orange")
    best = [h for h in history if h.get("best")]
    if best:
        ax2.axvline(best[-1]["epoch"], color="tab:green", ls="--", lw=1, label=f"kept: epoch {best[-1]['epoch']}")
    switch = [h["epoch"] for a, h in zip(history, history[1:], strict=False) if h["phase"] != a["phase"]]
    for x in switch:
        for ax in (ax1, ax2):
            ax.axvline(x - 0.5, color="black", lw=0.6, alpha=0.4)
    ax2.set(title="retrieval mAP", xlabel="epoch")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _nan(v: float | None) -> float:
    """Refit epochs have no held-out figure (None in the history): a gap in the curve."""
    return float("nan") if v is None else float(v)
