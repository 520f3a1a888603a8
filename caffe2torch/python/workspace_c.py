"""``workspace.C`` (and ``core.C``): the parts of Caffe2's C++ binding that user code reaches for.

Caffe2's ``C`` is its pybind11 module. Here ``workspace.C()`` still returns the current Workspace
object (caffe2torch's own use); as a namespace it offers ``Workspace`` (a workspace of one's own,
with ``create_blob``/``blobs``/``run``), ``Blob``, ``create_db``/``Mode`` with transactions and
cursors, and a few registry queries. Any other name raises an AttributeError that says the
binding is not part of caffe2torch, instead of failing somewhere later.
"""
import enum

import numpy as np

from caffe2torch import db as _db


class Mode(enum.IntEnum):
    """Caffe2's DB modes: ``C.Mode.read``, ``C.Mode.write``, ``C.Mode.new``."""

    read = 0
    write = 1
    new = 2


_MODE_NAMES = {Mode.read: "read", Mode.write: "write", Mode.new: "new"}


class Transaction:
    """Writes to a DB; what was put is committed by ``commit()``, or when deleted (as in C++)."""

    def __init__(self, txn):
        self._txn = txn

    def put(self, key, value):
        """Add one record (keys and values: bytes or str)."""
        self._txn.put(key, value)

    def commit(self):
        """Make what was put durable."""
        if self._txn is not None:
            self._txn.commit()

    def __del__(self):
        try:
            self.commit()
        except Exception:  # noqa: BLE001 (a destructor must not raise; the DB may be closed)
            pass


class Cursor:
    """Reads a DB in key order: ``seek_to_first``, ``next``, ``key``, ``value``, ``valid``."""

    def __init__(self, cursor):
        self._cursor = cursor

    def seek_to_first(self):
        """Go to the first record."""
        self._cursor.seek_to_first()

    def next(self):
        """Go to the next record."""
        self._cursor.next()

    def key(self):
        """The current key (bytes)."""
        return self._cursor.key()

    def value(self):
        """The current value (bytes)."""
        return self._cursor.value()

    def valid(self):
        """True while the cursor points at a record."""
        return self._cursor.valid()


class DB:
    """A database opened by ``create_db``."""

    def __init__(self, db):
        self._db = db

    def new_transaction(self):
        """A Transaction (mode write or new)."""
        return Transaction(self._db.new_transaction())

    def new_cursor(self):
        """A Cursor at the first record (mode read)."""
        return Cursor(self._db.cursor())

    def close(self):
        """Finish writing (a "new" DB replaces its target only now) and release the files."""
        self._db.close()

    def __del__(self):
        # ``del db`` closes it, as the C++ destructor does (the dataset tutorial relies on it).
        try:
            self._db.close()
        except Exception:  # noqa: BLE001 (a destructor must not raise)
            pass


def create_db(db_type, source, mode):
    """Open DB ``source`` of ``db_type`` ("minidb", "lmdb") in ``C.Mode.read/write/new``."""
    name = _MODE_NAMES.get(mode, mode)
    return DB(_db.open_db(db_type, source, name))


class Blob:
    """One blob of a Workspace: ``feed(array)``, ``fetch()``."""

    def __init__(self, workspace, name):
        self._ws = workspace
        self._name = name

    def feed(self, value, device_option=None):
        """Store ``value`` in this blob."""
        return self._ws.feed_blob(self._name, value, device_option)

    def fetch(self):
        """The blob's value (numpy array, bytes, or the object)."""
        return self._ws.fetch_blob(self._name)

    def is_tensor(self):
        """True when the blob holds a tensor."""
        return hasattr(self._ws.blobs_raw.get(self._name), "shape")

    def serialize(self, name=None):
        """The blob as one serialized BlobProto named ``name`` (workspace.SerializeBlob)."""
        from caffe2torch.python import workspace
        return self._ws._with(_serialize_as, self._name, name or self._name, workspace)

    def deserialize(self, serialized):
        """Store a serialized BlobProto in this blob (workspace.DeserializeBlob)."""
        from caffe2torch.python import workspace
        return self._ws._with(workspace.DeserializeBlob, self._name, serialized)

    def tensor(self):
        """The blob's tensor, to read and write in place (``data``, ``init``, ``feed``)."""
        return TensorCPU(self)


def _serialize_as(blob_name, proto_name, workspace):
    data = workspace.SerializeBlob(blob_name)
    if proto_name == blob_name:
        return data
    from caffe2torch.proto import caffe2_pb2
    proto = caffe2_pb2.BlobProto.FromString(data)
    proto.name = proto_name
    if proto.HasField("tensor"):
        proto.tensor.name = proto_name
    return proto.SerializeToString()


class TensorCPU:
    """A blob's CPU tensor as Caffe2's binding shows it: ``data`` is a numpy view of it."""

    def __init__(self, blob):
        self._blob = blob

    @property
    def data(self):
        """A numpy array sharing the tensor's memory (writes change the blob)."""
        value = self._blob._ws.blobs_raw.get(self._blob._name)
        if hasattr(value, "numpy"):
            if value.device.type != "cpu":
                raise RuntimeError("tensor().data is a CPU view: fetch a GPU blob instead")
            return value.numpy()
        return value

    def init(self, dims, data_type):
        """Make the blob a zero tensor of ``dims`` and Caffe2 ``data_type``."""
        from caffe2torch.db import serialize
        from caffe2torch.proto import caffe2_pb2
        if data_type == caffe2_pb2.TensorProto.STRING:
            raise RuntimeError("tensor().init: string tensors cannot be initialized from "
                               "Python; feed a numpy array of bytes instead")
        self._blob.feed(np.zeros(list(dims), dtype=serialize.numpy_dtype(data_type)))

    def feed(self, value):
        """Copy ``value`` into the blob."""
        return self._blob.feed(np.array(value, copy=True))

    def fetch(self):
        """A copy of the tensor."""
        return self._blob.fetch()

    @property
    def _shape(self):
        return list(np.shape(self.data))


class _CurrentWorkspace:
    """``C.Workspace.current``: the current workspace (a class-level property, as Caffe2's)."""

    def __get__(self, obj, cls):
        return Workspace._current()


class Net:
    """A net created in a Workspace: ``run()`` runs it once."""

    def __init__(self, workspace, name):
        self._ws = workspace
        self._name = name

    def run(self):
        """Run the net once; True on success."""
        return self._ws._run_net(self._name)

    def name(self):
        """The net's name."""
        return self._name


class Workspace:
    """A workspace of one's own (Caffe2's ``C.Workspace``), apart from the current one.

    Example::

        ws = workspace.C.Workspace()
        ws.create_blob("x").feed(np.ones(3, np.float32))
        ws.run(net)                 # a core.Net, NetDef, Plan, or OperatorDef
        y = ws.blobs["y"].fetch()
    """

    def __init__(self, root_folder=None):
        from caffe2torch.python import workspace
        self._impl = workspace.Workspace(root_folder)

    @staticmethod
    def _current():
        from caffe2torch.python import workspace
        wrapper = Workspace.__new__(Workspace)
        wrapper._impl = workspace.C()
        return wrapper

    current = _CurrentWorkspace()

    @property
    def blobs_raw(self):
        """The blob dict itself (values as stored)."""
        return self._impl.blobs

    @property
    def blobs(self):
        """{name: Blob}."""
        return {name: Blob(self, name) for name in self._impl.blobs}

    @property
    def nets(self):
        """{name: Net} of the created nets."""
        return {name: Net(self, name) for name in self._impl.nets}

    def create_blob(self, name):
        """A Blob named ``name`` (empty until fed)."""
        self._impl.blobs.setdefault(str(name), None)
        return Blob(self, str(name))

    def _with(self, fn, *args, **kwargs):
        from caffe2torch.python import workspace
        saved = workspace._workspaces[workspace._current[0]]
        workspace._workspaces[workspace._current[0]] = self._impl
        try:
            return fn(*args, **kwargs)
        finally:
            workspace._workspaces[workspace._current[0]] = saved

    def feed_blob(self, name, value, device_option=None):
        """FeedBlob in this workspace."""
        from caffe2torch.python import workspace
        return self._with(workspace.FeedBlob, name, value, device_option)

    def fetch_blob(self, name):
        """FetchBlob in this workspace."""
        from caffe2torch.python import workspace
        return self._with(workspace.FetchBlob, name)

    def create_net(self, net, overwrite=False):
        """CreateNet in this workspace."""
        from caffe2torch.proto import caffe2_pb2
        from caffe2torch.python import workspace
        if not hasattr(net, "Proto") and not isinstance(net, (caffe2_pb2.NetDef, bytes)):
            raise TypeError(f"create_net takes a core.Net, NetDef or serialized NetDef, not "
                            f"{type(net).__name__}")
        self._with(workspace.CreateNet, net, overwrite)
        proto = net.Proto() if hasattr(net, "Proto") else net
        if isinstance(proto, bytes):
            proto = caffe2_pb2.NetDef.FromString(proto)
        return Net(self, proto.name)

    def run(self, obj):
        """Run a core.Net / NetDef (once), a Plan / PlanDef, an ExecutionStep or an OperatorDef."""
        from caffe2torch.proto import caffe2_pb2
        from caffe2torch.python import workspace
        proto = obj.Proto() if hasattr(obj, "Proto") else obj
        if isinstance(proto, caffe2_pb2.OperatorDef):
            return self._with(workspace.RunOperatorOnce, proto)
        if isinstance(proto, (caffe2_pb2.PlanDef, caffe2_pb2.ExecutionStep)):
            return self._with(workspace.RunPlan, proto)
        return self._with(workspace.RunNetOnce, proto)

    def _run_net(self, name_or_net, num_iter=1):
        from caffe2torch.python import workspace
        return self._with(workspace.RunNet, name_or_net, num_iter)

    def reset(self):
        """Drop all blobs and nets."""
        from caffe2torch.python import workspace
        return self._with(workspace.ResetWorkspace)


def registered_operators():
    """All op types caffe2torch can run."""
    from caffe2torch.ops import registry
    return registry.registered_ops()


def nearby_opnames(name):
    """Registered op types close to ``name``."""
    import difflib
    return difflib.get_close_matches(name, registered_operators(), n=5)


_EXPORTS = {
    "Mode": Mode, "create_db": create_db, "Workspace": Workspace, "Blob": Blob,
    "DB": DB, "Transaction": Transaction, "Cursor": Cursor,
    "registered_operators": registered_operators, "nearby_opnames": nearby_opnames,
    # Build flags Caffe2 code tests (skipIf): no MKL-DNN/IDEEP backend here.
    "use_mkldnn": False, "use_ideep": False, "use_trt": False,
}


class Namespace:
    """``workspace.C``: call it for the current Workspace; its attributes are the binding's API."""

    def __init__(self, current):
        self._current = current
        self.__doc__ = __doc__

    def __call__(self):
        return self._current()

    def __getattr__(self, name):
        try:
            return _EXPORTS[name]
        except KeyError:
            if name.startswith("__"):
                raise AttributeError(name) from None
            raise AttributeError(
                f"workspace.C.{name}: caffe2torch does not provide this part of Caffe2's C++ "
                f"binding; it has {', '.join(sorted(_EXPORTS))} (see docs/compat.md)") from None

    def __dir__(self):
        return sorted(_EXPORTS)
