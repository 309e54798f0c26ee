"""Images in object storage (S3 and S3-compatible stores, GCS, Azure, any fsspec URL), listed and read with fsspec.

Endpoint and credentials come from the standard environment and config files of each store (for S3:
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `~/.aws/...`), never from simsearch options. An
object is identified by its URL; a change is seen in its size, its modification time or its ETag (the ETag is folded
into the recorded modification time, so an overwrite that keeps size and second-granular time is still seen).
Listing walks the prefix folder by folder, so a large bucket streams.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from ..errors import BadInputError


@dataclass
class RemoteObject:
    url: str
    size: int
    mtime_ns: int  # modification time in ns, plus a few ns from the ETag (see the module docstring)


def require_fsspec(url: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise BadInputError(f"{url}: object storage needs fsspec (pip install 'simsearch[s3]')") from None
    return fsspec


@lru_cache(maxsize=8)
def _filesystem(protocol: str) -> Any:
    fsspec = require_fsspec(protocol + "://")
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        raise BadInputError(f"{protocol}:// needs its fsspec driver (for s3: pip install s3fs): {e}") from None


def split(url: str) -> tuple[Any, str, str]:
    """(filesystem, protocol, path without the protocol) of an object-storage URL."""
    protocol, _, path = url.partition("://")
    if not path.strip("/"):
        raise BadInputError(f"{url}: give a bucket (and a prefix), e.g. s3://photos/2024")
    return _filesystem(protocol.lower()), protocol.lower(), path.rstrip("/")


def _mtime_ns(info: dict[str, Any]) -> int:
    t = (info.get("LastModified") or info.get("mtime") or info.get("last_modified") or info.get("updated")
         or info.get("created"))  # fmt: skip
    if isinstance(t, datetime):
        ns = int(t.timestamp()) * 1_000_000_000
    elif isinstance(t, (int, float)):
        ns = int(t * 1_000_000_000)
    elif isinstance(t, str):
        ns = int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()) * 1_000_000_000
    else:
        ns = 0
    etag = str(info.get("ETag") or info.get("etag") or "")
    return ns + (int(hashlib.sha1(etag.encode()).hexdigest()[:6], 16) % 999_999_999 if etag else 0)


def list_objects(url: str, suffixes: set[str] | frozenset[str] | None = None) -> Iterator[RemoteObject]:
    """Every object under `url` (a prefix) whose name ends in one of `suffixes`, folder by folder."""
    fs, protocol, root = split(url)
    fs.invalidate_cache()  # a sync must see the store as it is now, not a listing cached earlier in this process
    try:
        if not fs.exists(root):
            raise FileNotFoundError(root)
        # URLs are built on the root as the user wrote it: a driver may name objects in its own form (memory://
        # adds a leading slash), and sync matches indexed URLs against the root
        walked = fs._strip_protocol(root).rstrip("/")
        for folder, _, files in fs.walk(root, detail=True):
            for name in sorted(files):
                info = files[name]
                if suffixes is not None and os.path.splitext(name)[1].lower() not in suffixes:
                    continue
                full = info.get("name") or f"{folder.rstrip('/')}/{name}"
                if full.startswith(walked + "/"):
                    key = f"{root}/{full[len(walked) + 1 :]}"
                else:  # the root itself is an object, or a driver names it another way: its own name
                    key = root if full == walked else full.lstrip("/")
                yield RemoteObject(f"{protocol}://{key}", int(info.get("size") or 0), _mtime_ns(info))
    except FileNotFoundError:
        raise BadInputError(f"{url}: no such bucket or prefix") from None
    except PermissionError as e:
        raise BadInputError(f"{url}: access denied ({e})") from None


def read_object(url: str) -> tuple[bytes, int, int]:
    """An object's bytes, size and modification time (see `_mtime_ns`), in one request for the data."""
    fs, _, path = split(url)
    info = fs.info(path)
    data = fs.cat_file(path)
    return data, len(data), _mtime_ns(info)


def stat_object(url: str) -> tuple[int, int]:
    """(size, modification time) of one object, or FileNotFoundError."""
    fs, _, path = split(url)
    info = fs.info(path)
    return int(info.get("size") or 0), _mtime_ns(info)
