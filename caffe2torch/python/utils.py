"""Argument and tensor helpers (Caffe2's ``caffe2.python.utils``)."""
import collections.abc

import numpy as np
from google.protobuf.message import Message

from caffe2torch.proto import caffe2_pb2


def MakeArgument(key, value):
    """An Argument proto named ``key`` whose field is chosen from the Python type of ``value``."""
    arg = caffe2_pb2.Argument()
    arg.name = key
    if isinstance(value, np.ndarray) and value.dtype == np.float32:
        arg.floats.extend(value.flatten().tolist())
        return arg
    if isinstance(value, np.ndarray):
        value = value.flatten().tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    iterable = isinstance(value, collections.abc.Iterable) and not isinstance(value, (str, bytes))
    if type(value) is float:
        arg.f = value
    elif type(value) is int or type(value) is bool:
        arg.i = int(value)
    elif isinstance(value, bytes):
        arg.s = value
    elif isinstance(value, str):
        arg.s = value.encode("utf-8")
    elif isinstance(value, caffe2_pb2.NetDef):
        arg.n.CopyFrom(value)
    elif isinstance(value, Message):
        arg.s = value.SerializeToString()
    elif iterable:
        value = [v.item() if isinstance(v, np.generic) else v for v in value]
        if all(type(v) is float for v in value):
            arg.floats.extend(value)
        elif all(type(v) in (int, bool) for v in value):
            arg.ints.extend(int(v) for v in value)
        elif all(isinstance(v, (str, bytes)) for v in value):
            arg.strings.extend(v.encode("utf-8") if isinstance(v, str) else v for v in value)
        elif all(isinstance(v, caffe2_pb2.NetDef) for v in value):
            arg.nets.extend(value)
        elif all(isinstance(v, Message) for v in value):
            arg.strings.extend(v.SerializeToString() for v in value)
        else:
            raise ValueError(f"argument {key!r}: cannot store a list of mixed types {value!r}; "
                             "use all floats, all ints or all strings")
    else:
        raise ValueError(f"argument {key!r}: unsupported value type {type(value).__name__}")
    return arg


def ArgumentValue(arg):
    """The Python value held by an Argument proto (strings decoded as UTF-8 where possible)."""
    if arg.HasField("f"):
        return arg.f
    if arg.HasField("i"):
        return arg.i
    if arg.HasField("s"):
        return _decode(arg.s)
    if arg.HasField("n"):
        return arg.n
    if arg.HasField("t"):
        return arg.t
    if arg.floats:
        return list(arg.floats)
    if arg.ints:
        return list(arg.ints)
    if arg.strings:
        return [_decode(s) for s in arg.strings]
    if arg.nets:
        return list(arg.nets)
    if arg.tensors:
        return list(arg.tensors)
    return []


def _decode(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def ArgsToDict(args):
    """A dict name -> Python value of a list of Argument protos."""
    return {a.name: ArgumentValue(a) for a in args}


def NumpyArrayToCaffe2Tensor(arr, name=None):
    """A TensorProto holding ``arr`` (Caffe2's helper)."""
    from caffe2torch.db.serialize import NumpyArrayToCaffe2Tensor as impl
    return impl(arr, name)


def Caffe2TensorToNumpyArray(tensor):
    """The numpy array held by a TensorProto (Caffe2's helper)."""
    from caffe2torch.db.serialize import Caffe2TensorToNumpyArray as impl
    return impl(tensor)
