"""workspace functions beyond the tutorials: SerializeBlob / DeserializeBlob (a blob as one
serialized BlobProto, what Save writes per record) and RunPlanInBackground (a plan on a thread,
with Caffe2's handle: ``is_done()``, ``is_succeeded()``)."""
import threading

import numpy as np

from caffe2torch.db import serialize


def CreateBlob(name):
    """Create blob ``name`` without a value (if it does not exist); True."""
    from caffe2torch.python import workspace
    workspace.C().blobs.setdefault(str(name), None)
    return True


def SerializeBlob(name):
    """Blob ``name`` as the bytes of one BlobProto (a tensor, or a byte string)."""
    from caffe2torch.python import workspace
    value = workspace.FetchBlob(name)
    size = int(np.asarray(value).size) if isinstance(value, (np.ndarray, list)) else 1
    (_, data), = serialize.serialize_blob(str(name), value, chunk_size=max(size, 1))
    return data


def DeserializeBlob(name, serialized_blob):
    """Store the blob serialized by SerializeBlob (or read from a db record) as ``name``."""
    from caffe2torch.python import workspace
    blob = serialize.parse_blob(serialized_blob, f"the serialized blob for {name!r}")
    if blob.type == "std::string":
        return workspace.FeedBlob(name, blob.content)
    if blob.type == serialize.COUNTER_TYPE:
        from caffe2torch.ops.checks import Counter
        workspace.C().blobs[str(name)] = Counter(int(blob.tensor.int64_data[0]))
        return True
    value = serialize.deserialize_records([(str(name), serialized_blob)])[str(name)]
    return workspace.FeedBlob(name, value)


def GetBlobSizeBytes(name):
    """Bytes blob ``name`` holds: its tensor's data, or for strings pointers plus characters."""
    from caffe2torch.python import workspace
    value = workspace.FetchBlob(name)
    if isinstance(value, (bytes, str)):
        return len(value)
    arr = np.asarray(value)
    if arr.dtype.kind in "OSU":
        return arr.size * np.dtype(object).itemsize + sum(len(v) for v in arr.reshape(-1))
    return int(arr.nbytes)


class BackgroundPlan:
    """A plan running on a thread: ``wait()``, ``is_done()``, ``is_succeeded()``, ``error``."""

    def __init__(self, plan, ws):
        from caffe2torch.python import plan_runner
        self.error = None
        self._ok = False

        def run():
            try:
                self._ok = bool(plan_runner.run_plan(plan, ws))
            except Exception as exc:  # kept for is_succeeded() and the caller to inspect
                self.error = exc
        self._thread = threading.Thread(target=run, name="RunPlanInBackground", daemon=True)
        self._thread.start()

    def wait(self, timeout=None):
        """Block until the plan ends (or ``timeout`` seconds pass); True when it has ended."""
        self._thread.join(timeout)
        return self.is_done()

    def is_done(self):
        """True once the plan has ended, successfully or not."""
        return not self._thread.is_alive()

    def is_succeeded(self):
        """True when the plan ended without an error."""
        return self.is_done() and self.error is None and self._ok


def RunPlanInBackground(plan_or_step):
    """Start the plan in the current workspace on a thread; returns a BackgroundPlan handle."""
    from caffe2torch.python import workspace
    return BackgroundPlan(plan_or_step, workspace.C())
