"""caffe2torch.db.serialize: TensorProto <-> numpy/torch, Save's chunked BlobProto records."""
import numpy as np
import pytest
import torch

from caffe2torch.db import serialize
from caffe2torch.db.serialize import Caffe2TensorToNumpyArray, NumpyArrayToCaffe2Tensor
from caffe2torch.proto import caffe2_pb2

TP = caffe2_pb2.TensorProto

CASES = [  # numpy dtype, DataType, field holding the values
    (np.float32, TP.FLOAT, "float_data"),
    (np.float64, TP.DOUBLE, "double_data"),
    (np.int32, TP.INT32, "int32_data"),
    (np.int64, TP.INT64, "int64_data"),
    (np.bool_, TP.BOOL, "int32_data"),
    (np.uint8, TP.UINT8, "int32_data"),
    (np.int8, TP.INT8, "int32_data"),
    (np.uint16, TP.UINT16, "int32_data"),
    (np.int16, TP.INT16, "int32_data"),
    (np.float16, TP.FLOAT16, "int32_data"),
]


def _sample(dtype, shape=(2, 3)):
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else None
    if dtype == np.bool_:
        return np.array([True, False, True, True, False, False]).reshape(shape)
    if info is not None:
        return np.array([0, -1.5, 2.25, info.max, info.tiny, -0.0], dtype=dtype).reshape(shape)
    i = np.iinfo(dtype)
    return np.array([0, 1, i.min, i.max, 7, i.max - 1], dtype=dtype).reshape(shape)


@pytest.mark.parametrize("dtype, data_type, field", CASES)
def test_every_numeric_type_round_trips_through_its_field(dtype, data_type, field):
    arr = _sample(dtype)
    proto = TP.FromString(NumpyArrayToCaffe2Tensor(arr, "x").SerializeToString())
    assert proto.data_type == data_type and list(proto.dims) == [2, 3] and proto.name == "x"
    assert len(getattr(proto, field)) == 6
    back = Caffe2TensorToNumpyArray(proto)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_float16_is_stored_as_its_uint16_bits():
    proto = NumpyArrayToCaffe2Tensor(np.array([1.0, -2.0], dtype=np.float16))
    assert list(proto.int32_data) == [0x3C00, 0xC000]


def test_torch_tensors_are_accepted():
    proto = NumpyArrayToCaffe2Tensor(torch.arange(6, dtype=torch.int64).reshape(3, 2))
    assert proto.data_type == TP.INT64 and list(proto.int64_data) == list(range(6))
    with pytest.raises(ValueError, match="bfloat16"):
        NumpyArrayToCaffe2Tensor(torch.zeros(2, dtype=torch.bfloat16))


def test_byte_string_and_raw_data_are_read():
    byte = TP(dims=[2, 2], data_type=TP.BYTE, byte_data=bytes([1, 2, 250, 255]))
    np.testing.assert_array_equal(Caffe2TensorToNumpyArray(byte),
                                  np.array([[1, 2], [250, 255]], dtype=np.uint8))
    strings = TP(dims=[2], data_type=TP.STRING, string_data=[b"a", b"\xffz"])
    out = Caffe2TensorToNumpyArray(strings)
    assert out.dtype == object and list(out) == [b"a", b"\xffz"]
    raw = TP(dims=[3], data_type=TP.INT16, raw_data=np.array([1, -2, 300], "<i2").tobytes())
    np.testing.assert_array_equal(Caffe2TensorToNumpyArray(raw), np.array([1, -2, 300], np.int16))
    rawf = TP(dims=[2], data_type=TP.FLOAT, raw_data=np.array([1.5, -2], "<f4").tobytes())
    np.testing.assert_array_equal(Caffe2TensorToNumpyArray(rawf), np.array([1.5, -2], np.float32))


def test_packed_and_unpacked_dims_both_parse():
    unpacked = b"\x08\x02\x08\x03" + b"\x10\x02" + b"\x22\x06\x00\x01\x02\x03\x04\x05"
    packed = b"\x0a\x02\x02\x03" + b"\x10\x02" + b"\x22\x06\x00\x01\x02\x03\x04\x05"
    for wire in (unpacked, packed):
        out = Caffe2TensorToNumpyArray(TP.FromString(wire))
        np.testing.assert_array_equal(out, np.arange(6, dtype=np.int32).reshape(2, 3))
    # We write dims unpacked, like the real Caffe2 files.
    assert NumpyArrayToCaffe2Tensor(np.zeros((2, 3), np.int32)).SerializeToString()[:4] == \
        b"\x08\x02\x08\x03"


def test_bad_tensor_protos_raise_clear_errors():
    with pytest.raises(ValueError, match="holds 3 values but its dims \\[2, 2\\] need 4"):
        Caffe2TensorToNumpyArray(TP(dims=[2, 2], float_data=[1, 2, 3], name="w"))
    with pytest.raises(ValueError, match="UNDEFINED is not supported"):
        Caffe2TensorToNumpyArray(TP(dims=[1], data_type=TP.UNDEFINED))
    with pytest.raises(ValueError, match="uint32"):
        NumpyArrayToCaffe2Tensor(np.zeros(2, np.uint32))


def test_save_record_bytes_match_hand_computed_layout():
    [(key, value)] = serialize.serialize_blob("w", np.array([1.0, 2.0], np.float32))
    tensor = (b"\x08\x02" + b"\x10\x01" + b"\x1a\x08" + b"\x00\x00\x80\x3f\x00\x00\x00\x40"
              + b"\x3a\x01w" + b"\x5a\x04\x08\x00\x10\x02")
    assert key == "w#%0"
    assert value == b"\x0a\x01w" + b"\x12\x06Tensor" + b"\x1a" + bytes([len(tensor)]) + tensor


def test_string_blob_record():
    [(key, value)] = serialize.serialize_blob("!!META_NET_DEF", b"\x00abc")
    blob = caffe2_pb2.BlobProto.FromString(value)
    assert key == "!!META_NET_DEF"
    assert (blob.name, blob.type, blob.content) == ("!!META_NET_DEF", "std::string", b"\x00abc")
    assert serialize.deserialize_records([(key, value)]) == {"!!META_NET_DEF": b"\x00abc"}


@pytest.mark.parametrize("size, chunk, segments", [
    (10, 4, [(0, 4), (4, 8), (8, 10)]),
    (8, 4, [(0, 4), (4, 8)]),
    (3, 4, [(0, 3)]),
    (0, 4, [(0, 0)]),  # an empty tensor still gives one chunk
])
def test_chunked_tensor_keys_segments_and_reassembly(monkeypatch, size, chunk, segments):
    monkeypatch.setattr(serialize, "CHUNK_SIZE", chunk)
    arr = np.arange(size, dtype=np.float32).reshape(-1, 1) if size else np.zeros((0, 5), np.float32)
    records = serialize.serialize_blob("conv1_w", arr)
    assert [k for k, _ in records] == [f"conv1_w#%{k}" for k in range(len(segments))]
    blobs = [caffe2_pb2.BlobProto.FromString(v) for _, v in records]
    assert [(b.tensor.segment.begin, b.tensor.segment.end) for b in blobs] == segments
    assert all(list(b.tensor.dims) == list(arr.shape) and b.type == "Tensor" for b in blobs)
    assert all(not b.tensor.HasField("device_detail") for b in blobs)  # 2018 style
    # chunks can arrive in any order: they are placed by segment
    back = serialize.deserialize_records(reversed(records))["conv1_w"]
    assert back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_missing_chunk_is_an_error(monkeypatch):
    monkeypatch.setattr(serialize, "CHUNK_SIZE", 2)
    records = serialize.serialize_blob("b", np.arange(5, dtype=np.int64))
    with pytest.raises(ValueError, match="'b'.*3 of 5"):
        serialize.deserialize_records(records[:1] + records[2:])


def test_non_tensor_blob_cannot_be_saved():
    with pytest.raises(ValueError, match="blob 'r' holds a dict"):
        serialize.serialize_blob("r", {})
