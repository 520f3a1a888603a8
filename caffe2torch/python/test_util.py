"""Caffe2's ``test_util``: the TestCase that Caffe2's own op tests (and users') derive from."""
import unittest

import numpy as np

from caffe2torch.python import core, workspace


def rand_array(*dims):
    """Uniform values in [-0.5, 0.5) as float32, of shape ``dims`` (Caffe2's helper)."""
    return np.array(np.random.rand(*dims) - 0.5).astype(np.float32)


def randBlobFloat32(name, *dims, **kwargs):
    """FeedBlob ``name`` with float32 values in [0, 1); returns the name."""
    offset = kwargs.get("offset", 0.0)
    workspace.FeedBlob(name, np.random.rand(*dims).astype(np.float32) + np.float32(offset))
    return name


def randBlobsFloat32(names, *dims, **kwargs):
    """randBlobFloat32 for each name."""
    return [randBlobFloat32(n, *dims, **kwargs) for n in names]


def numOps(net):
    """The number of ops of a core.Net or NetDef."""
    return len((net.Proto() if hasattr(net, "Proto") else net).op)


def str_compare(a, b, encoding="utf8"):
    """Compare a str and bytes (or either) as text."""
    a = a.decode(encoding) if isinstance(a, bytes) else a
    b = b.decode(encoding) if isinstance(b, bytes) else b
    return a == b


class TestCase(unittest.TestCase):
    """A unittest TestCase whose tests each start from an empty workspace."""

    @classmethod
    def setUpClass(cls):
        workspace.GlobalInit(["caffe2", "--caffe2_log_level=0"])
        core.SetEnginePref({}, {})

    def setUp(self):
        self.ws = workspace.C.Workspace()
        workspace.ResetWorkspace()

    def tearDown(self):
        workspace.ResetWorkspace()

    def assertArrayEqual(self, a, b):
        """Exact equality of two arrays (shapes and values)."""
        np.testing.assert_array_equal(a, b)

    def assertNetContainOps(self, net, op_types):
        """Every type in ``op_types`` (types or OperatorDefs) occurs in ``net``."""
        types = [op.type for op in (net.Proto() if hasattr(net, "Proto") else net).op]
        for t in op_types:
            self.assertIn(getattr(t, "type", t), types)
