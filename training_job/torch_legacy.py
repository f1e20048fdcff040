"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format into numpy arrays, without torch.

The legacy format (``torch.save(..., _use_new_zipfile_serialization=False)``) is a sequence of pickles followed by
raw data:

1. the magic number ``0x1950a86a20f9469cfc6c``;
2. the protocol version ``1001``;
3. a dict of system information (``little_endian``, ``type_sizes``);
4. the saved object itself, where every storage is a *persistent id*
   ``("storage", <storage class>, <key>, <location>, <element count>, <view metadata or None>)`` and every tensor is
   a call to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``;
5. the list of storage keys, in the order their data follows;
6. for each key: an int64 element count, then the elements themselves.

Only the globals a state dict needs are allowed (tensor rebuilding, storage classes, ``OrderedDict``); anything
else is refused rather than imported, so reading a file never executes code from it.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchFileError(ValueError):
    """The file is not a legacy PyTorch file this reader understands; the message says what was found."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    size: int  # elements
    data: np.ndarray | None = None  # filled once the raw storages are read
    view_of: "_Storage | None" = None
    view_offset: int = 0

    def elements(self) -> np.ndarray:
        if self.view_of is not None:
            return self.view_of.elements()[self.view_offset:self.view_offset + self.size]
        if self.data is None:
            raise TorchFileError(f"storage {self.key} is used by a tensor but its data is not in the file")
        return self.data


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    extra: dict = field(default_factory=dict)

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.elements()
        if not self.size:
            return flat[self.offset].copy()
        extent = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if min(self.size) > 0 and extent > len(flat):
            raise TorchFileError(f"tensor of size {self.size} at offset {self.offset} overruns storage "
                                 f"{self.storage.key} ({len(flat)} elements)")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride], writeable=False)
        return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    return _TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file, encoding="utf-8")
        self.storages = storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise TorchFileError(f"the file refers to {module}.{name}, which a plain state dict never does; "
                                 "refusing to import it") from None

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchFileError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, size, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"persistent id {pid!r} does not name a storage class")
        key = str(key)
        root = self.storages.get(key)
        if root is None:
            root = self.storages[key] = _Storage(key, storage_type.dtype, int(size))
        if view_metadata is None:
            return root
        view_key, offset, view_size = view_metadata
        return _Storage(str(view_key), root.dtype, int(view_size), view_of=root, view_offset=int(offset))


def _convert(obj):
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _convert(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _convert(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v) for v in obj)
    return obj


def _plain_pickle(f: BinaryIO, what: str):
    try:
        return _LegacyUnpickler(f, {}).load()
    except (pickle.UnpicklingError, EOFError, TorchFileError) as exc:
        raise TorchFileError(f"could not read the {what}: {exc}") from None


def read_legacy_file(f: BinaryIO):
    """The object saved in an open legacy PyTorch file, with every tensor as a numpy array."""
    head = f.read(2)
    f.seek(-2, io.SEEK_CUR)
    if head == b"PK":
        raise TorchFileError("this is a zip-format PyTorch file (torch >= 1.6), not the legacy format")
    magic = _plain_pickle(f, "magic number")
    if magic != MAGIC_NUMBER:
        raise TorchFileError(f"not a legacy PyTorch file: magic number {magic!r}")
    protocol = _plain_pickle(f, "protocol version")
    if protocol != PROTOCOL_VERSION:
        raise TorchFileError(f"unsupported PyTorch protocol version {protocol!r} (expected {PROTOCOL_VERSION})")
    sys_info = _plain_pickle(f, "system information")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise TorchFileError(f"only little-endian files are supported (system information {sys_info!r})")
    storages: dict[str, _Storage] = {}
    try:
        obj = _LegacyUnpickler(f, storages).load()
    except (pickle.UnpicklingError, EOFError) as exc:
        raise TorchFileError(f"could not read the saved object: {exc}") from None
    keys = _plain_pickle(f, "storage key list")
    for key in keys:
        key = str(key)
        storage = storages.get(key)
        if storage is None:
            raise TorchFileError(f"the storage key list names {key}, which no tensor uses")
        header = f.read(8)
        if len(header) != 8:
            raise TorchFileError(f"the file ends before storage {key}")
        (count,) = struct.unpack("<q", header)
        if count != storage.size:
            raise TorchFileError(f"storage {key} holds {count} elements, the tensors expect {storage.size}")
        nbytes = count * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TorchFileError(f"the file ends inside storage {key} ({len(raw)} of {nbytes} bytes)")
        storage.data = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"))
    return _convert(obj)


def load_state_dict(path: str | Path) -> "collections.OrderedDict[str, np.ndarray]":
    """A legacy ``.pth`` state dict as an ordered mapping of parameter names to numpy arrays."""
    with open(path, "rb") as f:
        state = read_legacy_file(f)
    if not isinstance(state, dict):
        raise TorchFileError(f"{path} holds a {type(state).__name__}, not a state dict")
    return collections.OrderedDict(state)
