"""TensorProto <-> numpy/torch, and Caffe2's BlobProto records as Save writes them.

Typed data goes where Caffe2 puts it: float32 in ``float_data``; int32, bool, uint8, int8,
uint16, int16 and float16 (as uint16 bits) in ``int32_data``; int64 in ``int64_data``; float64
in ``double_data``; strings in ``string_data``. Readers also accept BYTE (``byte_data``, read as
uint8) and late Caffe2's little-endian ``raw_data``. A tensor is saved in chunks of
``CHUNK_SIZE`` elements under keys ``<name>#%<k>``, each chunk carrying its ``segment``.
"""
import math

import numpy as np
import torch

from caffe2torch import limits
from caffe2torch.proto import caffe2_pb2

TP = caffe2_pb2.TensorProto
CHUNK_SIZE = 1_000_000  # Caffe2's caffe2_tensor_chunk_size
CHUNK_SEPARATOR = "#%"  # Caffe2's kChunkIdSeparator

# numpy dtype -> (DataType, TensorProto field holding it)
_NUMPY_TO_CAFFE2 = {
    np.dtype(np.float32): (TP.FLOAT, "float_data"),
    np.dtype(np.float64): (TP.DOUBLE, "double_data"),
    np.dtype(np.int32): (TP.INT32, "int32_data"),
    np.dtype(np.int64): (TP.INT64, "int64_data"),
    np.dtype(np.bool_): (TP.BOOL, "int32_data"),
    np.dtype(np.uint8): (TP.UINT8, "int32_data"),
    np.dtype(np.int8): (TP.INT8, "int32_data"),
    np.dtype(np.uint16): (TP.UINT16, "int32_data"),
    np.dtype(np.int16): (TP.INT16, "int32_data"),
    np.dtype(np.float16): (TP.FLOAT16, "int32_data"),
    np.dtype(object): (TP.STRING, "string_data"),
}

# DataType -> (numpy dtype of the values, TensorProto field holding them)
_CAFFE2_TO_NUMPY = {
    TP.FLOAT: (np.dtype(np.float32), "float_data"),
    TP.DOUBLE: (np.dtype(np.float64), "double_data"),
    TP.INT32: (np.dtype(np.int32), "int32_data"),
    TP.INT64: (np.dtype(np.int64), "int64_data"),
    TP.BOOL: (np.dtype(np.bool_), "int32_data"),
    TP.UINT8: (np.dtype(np.uint8), "int32_data"),
    TP.INT8: (np.dtype(np.int8), "int32_data"),
    TP.UINT16: (np.dtype(np.uint16), "int32_data"),
    TP.INT16: (np.dtype(np.int16), "int32_data"),
    TP.FLOAT16: (np.dtype(np.float16), "int32_data"),
    TP.BYTE: (np.dtype(np.uint8), "byte_data"),
    TP.STRING: (np.dtype(object), "string_data"),
}


def numpy_dtype(data_type):
    """The numpy dtype Caffe2 reads a TensorProto ``data_type`` back as."""
    try:
        return _CAFFE2_TO_NUMPY[data_type][0]
    except KeyError:
        raise ValueError(f"TensorProto data_type {_type_name(data_type)} is not supported: "
                         f"use one of {', '.join(TP.DataType.Name(t) for t in _CAFFE2_TO_NUMPY)}"
                         ) from None


def tensor_data(proto):
    """The values a TensorProto holds, as a flat numpy array (a chunk's values if segmented)."""
    dtype, field = _CAFFE2_TO_NUMPY.get(proto.data_type, (None, None))
    if dtype is None:
        numpy_dtype(proto.data_type)  # raises the error naming the type
    if proto.data_format != 0:
        raise ValueError(f"TensorProto {proto.name!r}: data_format {proto.data_format} "
                         "(e.g. BFLOAT16) is not supported; only FMT_PROTOBUF (0)")
    if proto.HasField("raw_data"):
        if dtype == object:
            raise ValueError(f"TensorProto {proto.name!r}: STRING data cannot be in raw_data")
        return np.frombuffer(proto.raw_data, dtype=dtype.newbyteorder("<")).astype(dtype)
    if field == "byte_data":
        return np.frombuffer(proto.byte_data, dtype=np.uint8).copy()
    if field == "string_data":
        out = np.empty(len(proto.string_data), dtype=object)
        out[:] = list(proto.string_data)
        return out
    if proto.data_type == TP.FLOAT16:
        return np.array(proto.int32_data, dtype=np.int32).astype(np.uint16).view(np.float16)
    if field == "int32_data":
        return np.array(proto.int32_data, dtype=np.int32).astype(dtype, copy=False)
    return np.array(getattr(proto, field), dtype=dtype)


def Caffe2TensorToNumpyArray(tensor_proto):
    """A numpy array of the dims and values of a (complete) TensorProto."""
    data = tensor_data(tensor_proto)
    dims = tuple(tensor_proto.dims)
    if data.size != math.prod(dims):
        raise ValueError(f"TensorProto {tensor_proto.name!r} holds {data.size} values but its "
                         f"dims {list(dims)} need {math.prod(dims)}")
    return data.reshape(dims)


def NumpyArrayToCaffe2Tensor(arr, name=None):
    """A TensorProto holding ``arr`` (numpy array or torch tensor) in Caffe2's layout."""
    arr = to_numpy(arr)
    proto = TP()
    _fill(proto, arr.shape, arr.reshape(-1), name)
    return proto


def to_numpy(value):
    """A numpy view of a torch tensor (moved to CPU) or of an array-like."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            raise ValueError("bfloat16 tensors have no Caffe2 TensorProto type: "
                             "convert to float16 or float32 first")
        return value.detach().cpu().numpy()
    return np.asarray(value)


def to_torch(arr, device=None):
    """A torch tensor of a numpy array on ``device``; string arrays stay numpy arrays."""
    if arr.dtype == object:
        return arr
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = arr.copy()  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    tensor = torch.from_numpy(arr)
    return tensor.to(device) if device is not None else tensor


def _fill(proto, dims, flat, name, segment=None):
    """Set dims, data_type, the typed data, name and segment (Caffe2's field order)."""
    try:
        data_type, field = _NUMPY_TO_CAFFE2[flat.dtype]
    except KeyError:
        raise ValueError(f"tensor {name!r} has dtype {flat.dtype}, which Caffe2 cannot store: "
                         f"use one of {', '.join(str(d) for d in _NUMPY_TO_CAFFE2)}") from None
    proto.dims.extend(int(d) for d in dims)
    proto.data_type = data_type
    if data_type == TP.FLOAT16:
        proto.int32_data.extend(flat.view(np.uint16).astype(np.int32).tolist())
    elif data_type == TP.STRING:
        proto.string_data.extend(s.encode() if isinstance(s, str) else bytes(s) for s in flat)
    elif field == "int32_data":
        proto.int32_data.extend(flat.astype(np.int32).tolist())
    else:
        getattr(proto, field).extend(flat.tolist())
    if name:
        proto.name = name
    if segment is not None:
        proto.segment.begin, proto.segment.end = segment


COUNTER_TYPE = "std::unique_ptr<Counter<int64_t>>"  # Caffe2's CounterSerializer type name


def serialize_blob(name, value, chunk_size=None):
    """Save's records for one blob: a list of (key, serialized BlobProto) pairs."""
    if getattr(value, "caffe2_blob_type", None) == COUNTER_TYPE:
        # Caffe2 writes a counter as a one-value INT64 tensor under the counter's type name.
        blob = caffe2_pb2.BlobProto(name=name, type=COUNTER_TYPE)
        blob.tensor.name = name
        blob.tensor.data_type = TP.INT64
        blob.tensor.dims.append(1)
        blob.tensor.int64_data.append(int(value.count))
        return [(name, blob.SerializeToString())]
    if isinstance(value, (bytes, str)):  # a std::string blob
        blob = caffe2_pb2.BlobProto(name=name, type="std::string")
        blob.content = value.encode() if isinstance(value, str) else value
        return [(name, blob.SerializeToString())]
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise ValueError(f"blob {name!r} holds a {type(value).__name__}, which Save cannot "
                         "serialize: only tensors and byte strings")
    arr = to_numpy(value)
    flat = arr.reshape(-1)
    chunk_size = chunk_size or CHUNK_SIZE
    records = []
    for k, begin in enumerate(range(0, max(flat.size, 1), chunk_size)):  # empty: one chunk
        end = min(begin + chunk_size, flat.size)
        blob = caffe2_pb2.BlobProto(name=name, type="Tensor")
        _fill(blob.tensor, arr.shape, flat[begin:end], name, (begin, end))
        records.append((f"{name}{CHUNK_SEPARATOR}{k}", blob.SerializeToString()))
    return records


def blob_name_from_key(key):
    """The blob name of a db key: the key cut at the first ``#%``."""
    key = key.decode() if isinstance(key, bytes) else key
    return key.split(CHUNK_SEPARATOR, 1)[0]


class TensorChunks:
    """Collects the chunks of one tensor blob (placed by ``segment``) until it is complete."""

    def __init__(self, name, proto):
        self.name = name
        self.dims = tuple(proto.dims)
        self.data_type = proto.data_type
        dtype = numpy_dtype(self.data_type)
        # dims come from the file: check them before allocating (a forged [1e6, 1e6] would
        # otherwise ask for terabytes).
        self.total = limits.check_blob_size(self.dims, dtype.itemsize, f"blob {name!r}")
        self.loaded = 0
        self.array = np.empty(self.total, dtype=dtype)

    def add(self, proto):
        """Copy one chunk's values into place."""
        if tuple(proto.dims) != self.dims or proto.data_type != self.data_type:
            raise ValueError(f"blob {self.name!r}: chunk dims {list(proto.dims)} / type "
                             f"{_type_name(proto.data_type)} differ from the first chunk's")
        begin, end = ((proto.segment.begin, proto.segment.end) if proto.HasField("segment")
                      else (0, self.total))
        data = tensor_data(proto)
        if not 0 <= begin <= end <= self.total or data.size != end - begin:
            raise ValueError(f"blob {self.name!r}: chunk segment [{begin}, {end}) with "
                             f"{data.size} values does not fit dims {list(self.dims)}")
        self.array[begin:end] = data
        self.loaded += end - begin
        if self.loaded > self.total:
            raise ValueError(f"blob {self.name!r}: chunks hold {self.loaded} values but dims "
                             f"{list(self.dims)} need {self.total}")

    @property
    def complete(self):
        """True when the chunks cover the whole tensor."""
        return self.loaded == self.total

    def value(self):
        """The assembled numpy array."""
        return self.array.reshape(self.dims)


def parse_blob(value, where="db record"):
    """A BlobProto from a record value; a clear error when it is not one."""
    blob = caffe2_pb2.BlobProto()
    try:
        blob.ParseFromString(value)
    except Exception as exc:  # protobuf's DecodeError, whose message says little
        raise ValueError(f"{where} is not a serialized Caffe2 BlobProto ({exc})") from None
    if blob.type not in ("Tensor", "std::string", COUNTER_TYPE):
        raise ValueError(f"{where}: blob type {blob.type!r} is not supported "
                         f"(only 'Tensor', 'std::string' and {COUNTER_TYPE!r})")
    return blob


def deserialize_records(records):
    """Blob name -> numpy array or bytes, from (key, BlobProto bytes) records (a whole db)."""
    chunks, blobs = {}, {}
    for key, value in records:
        name = blob_name_from_key(key)
        blob = parse_blob(value, f"record {key!r}")
        if blob.type == "std::string":
            blobs[name] = blob.content
            continue
        if name not in chunks:
            chunks[name] = TensorChunks(name, blob.tensor)
        chunks[name].add(blob.tensor)
    for name, c in chunks.items():
        if not c.complete:
            raise ValueError(f"blob {name!r}: chunks hold {c.loaded} of {c.total} values")
        blobs[name] = c.value()
    return blobs


def _type_name(data_type):
    try:
        return TP.DataType.Name(data_type)
    except ValueError:
        return str(data_type)
