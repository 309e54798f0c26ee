"""The server's errors, each with its HTTP status (mapped in `app`)."""

from __future__ import annotations

from ..errors import SimsearchError


class NotFoundError(SimsearchError):
    """An id or file the request named does not exist, or is not served (HTTP 404)."""


class ConflictError(SimsearchError):
    """The request no longer matches the index (HTTP 409): a group changed since it was listed, or a file since it
    was indexed."""


class TooLargeError(SimsearchError):
    """An upload over the byte or pixel limit (HTTP 413)."""


class ForbiddenError(SimsearchError):
    """A change refused by configuration, e.g. a read-only server (HTTP 403)."""
