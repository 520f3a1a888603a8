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


def TryReadProtoWithClass(cls, s):
    """A ``cls`` message parsed from ``s``: protobuf text format first, then binary."""
    from google.protobuf import text_format
    obj = cls()
    try:
        text_format.Parse(s if isinstance(s, str) else s.decode("utf-8"), obj)
        return obj
    except (text_format.ParseError, UnicodeDecodeError):
        obj = cls()
        try:
            obj.ParseFromString(s.encode("utf-8") if isinstance(s, str) else bytes(s))
        except Exception as exc:  # protobuf's DecodeError
            raise ValueError(f"cannot read a {cls.__name__} from the given data: it is "
                             f"neither text format nor binary ({exc})") from None
        return obj


class DebugMode:
    """``DebugMode.run(main)``: an unhandled exception drops into pdb's post-mortem."""

    @classmethod
    def run(cls, func):
        """Call ``func()``; on an exception other than KeyboardInterrupt, debug it and exit 1."""
        import pdb
        import sys
        try:
            return func()
        except KeyboardInterrupt:
            raise
        except Exception:
            print('Entering interactive debugger. Type "bt" to print the full stacktrace. '
                  'Type "help" to see command listing.')
            print(sys.exc_info()[1])
            pdb.post_mortem()
            sys.exit(1)


def BuildUniqueMutexIter(init_net, net, iter=None, iter_mutex=None, iter_val=0):
    """An int64 CPU counter (``iter``, default ``optimizer_iteration``) that AtomicIter advances
    under a mutex in ``net`` each run; created once per init net."""
    from caffe2torch.python import core
    iter = iter if iter is not None else "optimizer_iteration"
    iter_mutex = iter_mutex if iter_mutex is not None else "iteration_mutex"
    if init_net.BlobIsDefined(iter):
        return init_net.GetBlobRef(iter)
    with core.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
        counter = init_net.ConstantFill([], iter, shape=[1], value=iter_val,
                                        dtype=core.DataType.INT64)
        mutex = init_net.CreateMutex([], [iter_mutex])
        net.AtomicIter([mutex, counter], [counter])
    return counter
