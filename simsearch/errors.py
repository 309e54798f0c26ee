"""Exceptions that carry a one-line message and the CLI exit code that goes with them."""

from __future__ import annotations

import os


class SimsearchError(Exception):
    """An expected failure: the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 1


class BadInputError(SimsearchError):
    """Bad usage or input: a missing folder, an unreadable query image, an unknown backbone."""

    exit_code = 1


class WeightsUnavailableError(SimsearchError):
    """Pretrained weights could not be found or downloaded."""

    exit_code = 1


class IndexStoreError(SimsearchError):
    """The index is missing, damaged or does not match the request."""

    exit_code = 2


class IndexNotFoundError(IndexStoreError):
    pass


class IndexMismatchError(IndexStoreError):
    pass


class IndexCorruptError(IndexStoreError):
    pass


class IndexLockedError(SimsearchError):
    """Another process is writing to the index."""

    exit_code = 1


class ImageLoadError(Exception):
    """An image could not be read or decoded; ``str(err)`` is one line: ``"<path>: <reason>"`` or reason."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None) -> None:
        self.reason = " ".join(str(reason).split())
        self.path = os.fspath(path) if path is not None else None
        super().__init__(self.reason, self.path)

    @property
    def message(self) -> str:
        return self.reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path is not None else self.reason
