"""One progress display for index, dedup and train, on rich, written to stderr only when it is a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Display:
    """A rich progress bar per phase (rate, ETA, and any fields the caller passes, e.g. loss and mAP)."""

    def __init__(self, progress: Any) -> None:
        self._p = progress
        self._tasks: dict[str, Any] = {}

    def update(self, phase: str, done: int, total: int, info: dict[str, Any] | None = None, unit: str = "") -> None:
        if self._p is None:
            return
        text = _describe(phase, info or {})
        if phase not in self._tasks:
            self._tasks[phase] = self._p.add_task(text, total=max(total, 1), unit=unit)
        self._p.update(self._tasks[phase], completed=done, total=max(total, 1), description=text)

    def stage(self, text: str) -> None:
        """A step without a count (e.g. "grouping pairs"): shown as a spinner line."""
        if self._p is None:
            return
        for t in self._tasks.values():
            self._p.update(t, visible=False)
        self._tasks[text] = self._p.add_task(text, total=None, unit="")

    # the callables the library takes
    def images(self, done: int, total: int) -> None:
        self.update("indexing", done, total, unit="img")

    def train(self, phase: str, done: int, total: int, info: dict[str, Any]) -> None:
        self.update(phase, done, total, info, unit="ep" if phase == "epoch" else "img")


def _describe(phase: str, info: dict[str, Any]) -> str:
    if phase == "epoch":
        parts = [f"{info.get('phase', 'train')} epoch"]
        if "loss" in info:
            parts.append(f"loss {info['loss']:.4f}")
        if info.get("val_map") is not None:
            parts.append(f"val mAP {info['val_map']:.4f}")
        return "  ".join(parts)
    return {
        "features": "backbone features",
        "views": "augmented views",
        "views-val": "validation views",
        "tta": "held-out test-time views",
    }.get(phase, phase)


@contextmanager
def display(enabled: bool = True) -> Iterator[Display]:
    """A live display on stderr when it is a terminal (and `enabled`); otherwise a silent one."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield Display(None)
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[unit]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as p:
        yield Display(p)
