"""Serving indexed files safely: only files inside the index's roots, unchanged since indexing, and only as images.

A stored path is resolved (symlinks followed) and must lie inside one of the index's roots (`IndexStore.roots`).
The file is then opened from the root down, one component at a time, with O_NOFOLLOW (a directory or the file
swapped for a symlink after the check is refused, not followed) and O_NONBLOCK, and the opened descriptor is
fstat()ed: a regular file whose size and mtime still match the index row. Everything after that (decoding the
thumbnail, validating and streaming the original) reads from that same descriptor.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from ..index.store import Row, root_of
from ..sources import is_url
from .errors import ConflictError, NotFoundError

NO_ROOTS = (
    "this index does not record which folders it covers (made by an older simsearch, or by `import` without "
    "--root), so it serves no files: run `simsearch index FOLDER --index {index}` once (unchanged files are not "
    "re-read; it records FOLDER) or import with --root DIR"
)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_indexed(row: Row, roots: list[str], index: str) -> tuple[BinaryIO, os.stat_result]:
    """The opened file of an index row and its fstat, or NotFoundError (404) / ConflictError (409)."""
    if not roots:
        raise NotFoundError(NO_ROOTS.format(index=index))
    if is_url(row.path):
        return _fetch_object(row, roots)
    if not os.path.lexists(row.path):
        raise NotFoundError(f"the file of image {row.id} is no longer on disk")
    real = os.path.realpath(row.path)
    root = root_of(real, roots)
    if root is None:
        raise NotFoundError(f"the file of image {row.id} resolves outside the folders this index covers; not served")
    try:
        f = _open_beneath(root, real)
    except FileNotFoundError:
        raise NotFoundError(f"the file of image {row.id} is no longer on disk") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise ConflictError(f"the file of image {row.id} was replaced by a link while being opened") from None
        raise NotFoundError(f"the file of image {row.id} cannot be read ({e.strerror or e})") from None
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"the file of image {row.id} is not a regular file")
        check_fingerprint(row, st)
    except BaseException:
        f.close()
        raise
    return f, st


def _fetch_object(row: Row, roots: list[str]) -> tuple[BinaryIO, os.stat_result]:
    """An object of an indexed bucket prefix, fetched through the index into an unnamed temporary file whose size
    and mtime are the object's, so it is checked and decoded like a local file."""
    if not any(row.path.startswith(r.rstrip("/") + "/") for r in roots if is_url(r)):
        raise NotFoundError(f"the object of image {row.id} is outside the prefixes this index covers; not served")
    from ..sources.remote import read_object

    try:
        data, _, mtime_ns = read_object(row.path)
    except FileNotFoundError:
        raise NotFoundError(f"the object of image {row.id} is no longer in the bucket") from None
    except Exception as e:  # the store's client: network, credentials
        raise NotFoundError(f"the object of image {row.id} cannot be read ({' '.join(str(e).split())})") from None
    f = tempfile.TemporaryFile()
    try:
        f.write(data)
        f.flush()
        os.utime(f.fileno(), ns=(mtime_ns, mtime_ns))
        f.seek(0)
        st = os.fstat(f.fileno())
        check_fingerprint(row, st)
    except BaseException:
        f.close()
        raise
    return f, st  # type: ignore[return-value]


def check_fingerprint(row: Row, st: os.stat_result) -> None:
    """ConflictError unless the file still has the size and mtime the index recorded.

    Rows of imported vectors record none (size and mtime 0: an indexed file is never empty); theirs are only
    checked to be inside the roots and to decode as images.
    """
    if row.size == 0 and row.mtime_ns == 0:
        return
    if st.st_size != row.size or st.st_mtime_ns != row.mtime_ns:
        raise ConflictError(
            f"the file of image {row.id} changed since it was indexed; run `simsearch index` on its folder to update"
        )


def _open_beneath(root: str, real: str) -> BinaryIO:
    """Open `real` (inside `root`) walking down from the root with O_NOFOLLOW at every step."""
    if real == root:  # a single file indexed on its own
        fd = os.open(real, _FILE_FLAGS)
        return os.fdopen(fd, "rb")
    parts = os.path.relpath(real, root).split(os.sep)
    dfd = os.open(root, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)  # never open a FIFO or device, even briefly
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.ELOOP if stat.S_ISLNK(st.st_mode) else errno.EINVAL,
                          "a link" if stat.S_ISLNK(st.st_mode) else "not a regular file")  # fmt: skip
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dfd)
    finally:
        os.close(dfd)
    return os.fdopen(fd, "rb")


def stream(f: BinaryIO, size: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """The first `size` bytes of an open file, by pread from its descriptor; closes it when done or abandoned."""
    fd = f.fileno()
    offset = 0
    try:
        while offset < size:
            data = os.pread(fd, min(chunk, size - offset), offset)
            if not data:
                break
            offset += len(data)
            yield data
    finally:
        f.close()
