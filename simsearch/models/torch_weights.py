"""Read PyTorch state-dict files (.pth) into numpy arrays without importing torch.

PyTorch checkpoints are pickles, and unpickling runs arbitrary code. The unpickler here only resolves the handful of
globals a plain state dict needs (an OrderedDict, the tensor rebuild helpers and the typed storage classes), so a
hostile file fails with `WeightsFileError` instead of executing anything. Both the legacy stream format
(torch < 1.6, or `_use_new_zipfile_serialization=False`) and the zip format are supported.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import WeightsUnavailableError

__all__ = ["WeightsFileError", "load_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 after reading
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class WeightsFileError(WeightsUnavailableError, ValueError):
    """A weights file is missing, truncated, not a PyTorch/Keras weights file, or does not fit the model.

    A ValueError for library callers and a SimsearchError so the CLI prints it on one line.
    """


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclass
class _Storage:
    """A placeholder for a torch storage: its bytes are filled in after the main pickle is read.

    A legacy storage view points at a root storage (`root`, `root_offset`) instead of owning bytes.
    """

    key: str
    stype: _StorageType
    numel: int
    data: np.ndarray | None = None
    root: _Storage | None = None
    root_offset: int = 0

    def array(self) -> np.ndarray | None:
        if self.root is None:
            return self.data
        base = self.root.array()
        if base is None or self.root_offset + self.numel > base.size:
            return None
        return base[self.root_offset : self.root_offset + self.numel]


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise WeightsFileError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    try:
        size_t = tuple(int(s) for s in size)
        stride_t = tuple(int(s) for s in stride)
        offset_i = int(offset)
    except (TypeError, ValueError) as exc:
        raise WeightsFileError(f"bad tensor geometry: {exc}") from None
    if len(size_t) != len(stride_t) or offset_i < 0 or any(s < 0 for s in size_t + stride_t):
        raise WeightsFileError(f"bad tensor geometry: size={size_t} stride={stride_t} offset={offset_i}")
    return _TensorRef(storage, offset_i, size_t, stride_t)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; storages arrive as persistent ids and become `_Storage` stubs."""

    def __init__(self, file: BinaryIO, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise WeightsFileError(
                f"{self.source}: refuses to load global {module}.{name} (not a plain state dict)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        # Legacy: ('storage', type, key, location, numel, view_metadata); zip: ('storage', type, key, location, numel)
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise WeightsFileError(f"{self.source}: unsupported persistent id {str(pid)[:80]!r}")
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(stype, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise WeightsFileError(f"{self.source}: malformed storage reference {str(pid)[:80]!r}")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, stype, numel)
        if len(pid) == 6 and pid[5] is not None:
            view_key, view_offset, view_size = pid[5]
            return _Storage(str(view_key), stype, int(view_size), root=storage, root_offset=int(view_offset))
        return storage


def _materialise(ref: _TensorRef, source: str, name: str) -> np.ndarray:
    storage = ref.storage
    data = storage.array()
    if data is None:
        raise WeightsFileError(f"{source}: storage {storage.key} of {name!r} has no data")
    dtype = np.dtype(np.float32) if storage.stype.name == "BFloat16Storage" else data.dtype
    if 0 in ref.size:
        return np.zeros(ref.size, dtype=dtype)
    last = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride, strict=True))
    if last >= data.size:
        raise WeightsFileError(f"{source}: tensor {name!r} reaches past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :],
        shape=ref.size,
        strides=tuple(st * data.itemsize for st in ref.stride),
        writeable=False,
    )
    arr = np.array(view, order="C", copy=True)
    if storage.stype.name == "BFloat16Storage":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _to_numpy_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise WeightsFileError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise WeightsFileError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = _materialise(value, source, str(key))
    return out


def _read_exact(f: BinaryIO, n: int, source: str, total: int) -> bytes:
    if n < 0 or f.tell() + n > total:
        raise WeightsFileError(f"{source}: truncated (wanted {n} bytes at offset {f.tell()} of {total})")
    data = f.read(n)
    if len(data) != n:
        raise WeightsFileError(f"{source}: truncated (wanted {n} bytes, got {len(data)})")
    return data


def _load_legacy(f: BinaryIO, source: str, total: int) -> dict[str, np.ndarray]:
    if f.read(2) != b"\x80\x02":
        raise WeightsFileError(f"{source}: not a PyTorch weights file")
    f.seek(0)
    if _RestrictedUnpickler(f, source).load() != _LEGACY_MAGIC:
        raise WeightsFileError(f"{source}: not a PyTorch weights file (bad magic number)")
    if _RestrictedUnpickler(f, source).load() != _LEGACY_PROTOCOL:
        raise WeightsFileError(f"{source}: unsupported PyTorch legacy protocol version")
    sys_info = _RestrictedUnpickler(f, source).load()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise WeightsFileError(f"{source}: big-endian PyTorch files are not supported")
    main = _RestrictedUnpickler(f, source)
    result = main.load()
    keys = _RestrictedUnpickler(f, source).load()
    if not isinstance(keys, list):
        raise WeightsFileError(f"{source}: malformed storage key list")
    for key in keys:
        storage = main.storages.get(str(key))
        if storage is None:
            raise WeightsFileError(f"{source}: storage {key} is not referenced by the state dict")
        (numel,) = struct.unpack("<q", _read_exact(f, 8, source, total))
        if numel != storage.numel:
            raise WeightsFileError(f"{source}: storage {key} size mismatch ({numel} != {storage.numel})")
        raw = _read_exact(f, numel * storage.stype.dtype.itemsize, source, total)
        storage.data = np.frombuffer(raw, dtype=storage.stype.dtype)
    return _to_numpy_dict(result, source)


def _load_zip(path: Path, source: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl_names = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl_names) != 1:
            raise WeightsFileError(f"{source}: zip archive without a single data.pkl (not a PyTorch file)")
        prefix = pkl_names[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
            raise WeightsFileError(f"{source}: big-endian PyTorch files are not supported")
        unpickler = _RestrictedUnpickler(io.BytesIO(zf.read(pkl_names[0])), source)
        result = unpickler.load()
        for key, storage in unpickler.storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise WeightsFileError(f"{source}: storage {key} missing from the archive")
            raw = zf.read(member)
            want = storage.numel * storage.stype.dtype.itemsize
            if len(raw) < want:
                raise WeightsFileError(f"{source}: storage {key} truncated ({len(raw)} of {want} bytes)")
            storage.data = np.frombuffer(raw[:want], dtype=storage.stype.dtype)
    return _to_numpy_dict(result, source)


def load_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the tensors of a PyTorch state-dict file as numpy arrays, keyed by parameter name.

    Raises WeightsFileError (and nothing else) for missing, truncated, hostile or non-PyTorch files.
    """
    path = Path(path)
    source = path.name
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, source)
        with open(path, "rb") as f:
            return _load_legacy(f, source, os.fstat(f.fileno()).st_size)
    except WeightsFileError:
        raise
    except FileNotFoundError:
        raise WeightsFileError(f"{path}: weights file not found") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        struct.error,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        MemoryError,
        RecursionError,
        OverflowError,
        UnicodeDecodeError,
    ) as exc:
        raise WeightsFileError(f"{source}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
