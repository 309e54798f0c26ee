"""A process-wide budget for decoded pixels: how many bytes of decoded images may be in memory at once.

Decoding is where memory goes: a 7000x7000 PNG of 150 KB on disk becomes 196 MB in Pillow (4 bytes a pixel) and
about as much again while it is converted or resized. Every decode in `simsearch.images` takes its estimated cost
from this budget first and gives it back when the decoded image is no longer needed, so a burst of huge uploads
queues (first come, first served) instead of exhausting memory. An image whose cost exceeds the whole budget waits
until nothing else is decoding, then runs alone. A thread that already holds a share never waits again (no deadlock
when one decode nests in another).

The server sets a waiting limit (`configure(wait_s=...)`): past it the request fails with `DecodeBusyError` (HTTP
503) rather than hanging. Indexing keeps the default (wait as long as it takes).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import SimsearchError

DEFAULT_BUDGET = 512 * 1024 * 1024
"""Default bytes of decoded pixels in flight per process (``SIMSEARCH_DECODE_BUDGET`` overrides, in bytes)."""


class DecodeBusyError(SimsearchError):
    """Waited longer than the budget's limit for other decodes to finish (HTTP 503)."""


class DecodeBudget:
    """A weighted FIFO semaphore over bytes: `hold(cost)` blocks until `cost` fits next to what is in flight."""

    def __init__(self, capacity: int = DEFAULT_BUDGET, wait_s: float | None = None) -> None:
        if capacity <= 0:
            raise ValueError(f"decode budget must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.wait_s = wait_s
        self.in_flight = 0
        self.peak = 0  # highest in-flight total seen (for tests and benchmarks)
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._local = threading.local()

    @contextmanager
    def hold(self, cost: int) -> Iterator[int]:
        """Reserve `cost` bytes (capped at the capacity) for the block; yields the amount reserved."""
        cost = max(0, min(int(cost), self.capacity))
        nested = getattr(self._local, "depth", 0) > 0
        self._acquire(cost, wait=not nested)
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield cost
        finally:
            self._local.depth -= 1
            with self._cond:
                self.in_flight -= cost
                self._cond.notify_all()

    def _acquire(self, cost: int, wait: bool) -> None:
        with self._cond:
            if not wait:  # already inside a hold on this thread: waiting could deadlock
                self._take(cost)
                return
            ticket = object()
            self._queue.append(ticket)
            deadline = None if self.wait_s is None else time.monotonic() + self.wait_s
            try:
                while self._queue[0] is not ticket or self.in_flight + cost > self.capacity:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise DecodeBusyError(
                            f"the server is busy decoding other large images (waited {self.wait_s:g} s); try again"
                        )
                    self._cond.wait(left)
                self._take(cost)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def _take(self, cost: int) -> None:
        self.in_flight += cost
        self.peak = max(self.peak, self.in_flight)


def _initial_capacity() -> int:
    raw = os.environ.get("SIMSEARCH_DECODE_BUDGET", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_BUDGET


BUDGET = DecodeBudget(_initial_capacity())
"""The process's budget, used by every decode in `simsearch.images`."""


def configure(capacity: int | None = None, wait_s: float | None = None) -> DecodeBudget:
    """Change the process budget's capacity and/or waiting limit (the server does this once at start), and have
    large allocations given back to the system when freed (`return_large_allocations`)."""
    return_large_allocations()
    with BUDGET._cond:
        if capacity is not None:
            if capacity <= 0:
                raise ValueError(f"decode budget must be positive, got {capacity}")
            BUDGET.capacity = int(capacity)
        BUDGET.wait_s = wait_s
        BUDGET._cond.notify_all()
    return BUDGET


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 4 * 1024 * 1024


def return_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve allocations of `threshold` bytes or more with mmap, so freeing them returns the memory.

    By default glibc raises this threshold to the size of the last freed block (up to 32 MB), after which Pillow's
    16 MB pixel blocks come from per-thread arenas that keep freed memory: 16 request threads that each once decoded
    a 7000x7000 PNG held 3 GB although the budget let one decode run at a time. A fixed threshold turns that
    dynamic raise off. Returns False where there is no glibc `mallopt` (the budget still bounds what is in flight).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def decode_cost(width: int, height: int, mode: str) -> int:
    """Estimated peak bytes while decoding an image of this size and mode, then converting it to RGB once.

    Pillow keeps RGB, RGBA, CMYK, YCbCr, I and F at 4 bytes a pixel, L, P and 1 at one, I;16 at two; conversion,
    orientation and resizing make one more RGB-sized buffer (two when alpha may be composited over white).
    """
    px = int(width) * int(height)
    if mode in ("L", "P", "1"):
        bpp = 1
    elif mode.startswith("I;16"):
        bpp = 2
    else:
        bpp = 4
    extra = 8 if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") else 4  # P: transparency, if any, composites
    return px * (bpp + extra)
