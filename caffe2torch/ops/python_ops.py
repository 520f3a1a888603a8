"""``Python`` and ``PythonGradient``: ops whose forward is a user's Python function
(registered by :mod:`caffe2torch.python.python_op`); they run on the CPU, as in Caffe2."""
import numpy as np
import torch

from caffe2torch.ops.registry import gradient_op, grad_name, register_op
from caffe2torch.python import python_op


class PythonTensor:
    """A blob as a Python op sees it (Caffe2's TensorCPU): ``data``, ``shape``, ``feed``,
    ``reshape``."""

    def __init__(self, value=None):
        self._array = None
        if isinstance(value, torch.Tensor):
            # A numpy view of a CPU tensor: in-place writes to inputs reach the blob, as in C++.
            self._array = value.detach().cpu().numpy()
        elif value is not None:
            self._array = np.asarray(value)

    @property
    def data(self):
        """The values as a numpy array (writable; reshape or feed an output first)."""
        if self._array is None:
            raise RuntimeError("this output has no data yet: call reshape(shape) or feed(array)")
        return self._array

    @property
    def shape(self):
        """The dimensions."""
        return () if self._array is None else self._array.shape

    def feed(self, value):
        """Set the blob to ``value`` (an array-like)."""
        self._array = np.array(value)
        return True

    def reshape(self, shape):
        """Give the blob ``shape`` (float32 zeros unless it already holds that many values)."""
        shape = tuple(int(d) for d in shape)
        if self._array is not None and self._array.size == int(np.prod(shape)):
            self._array = self._array.reshape(shape)
        else:
            self._array = np.zeros(shape, dtype=np.float32)

    _reshape = reshape

    def init(self, dims, caffe2_type=None):
        """Caffe2's init(dims, type): a zero tensor (float32 unless the type says otherwise)."""
        from caffe2torch.ops.utility import torch_dtype
        dtype = torch.float32 if caffe2_type is None else torch_dtype(caffe2_type)
        self._array = torch.zeros([int(d) for d in dims], dtype=dtype).numpy()

    def fetch(self):
        """A copy of the values."""
        return None if self._array is None else self._array.copy()

    def value(self):
        """The value to store in the workspace."""
        if self._array is None:
            return None
        if self._array.dtype.kind in "OSU":
            return self._array
        return torch.from_numpy(np.ascontiguousarray(self._array))


def _setup(which):
    def setup(ctx):
        # This op instance's function (a builder runs here, once per instance).
        ctx.state["fn"] = python_op.instantiate(ctx.require("token"), which)
    return setup


def _run(ctx, inputs, which):
    _, pass_workspace = python_op.lookup(ctx.require("token"), which)
    fn = ctx.state["fn"]
    ins = [PythonTensor(x) for x in inputs]
    outs = [PythonTensor() for _ in ctx.output_names]
    if pass_workspace:
        from caffe2torch.python.workspace_c import Workspace
        ws = Workspace.__new__(Workspace)
        ws._impl = ctx.workspace
        fn(ins, outs, ws)
    else:
        fn(ins, outs)
    return [o.value() for o in outs]


def _indices(op, name):
    for a in op.arg:
        if a.name == name:
            return list(a.ints)
    return []


def _python_grad(op, g_output):
    """PythonGradient(inputs + outputs + output grads) -> input grads (chosen by the indices)."""
    out_idx = _indices(op, "grad_output_indices") or range(len(op.output))
    in_idx = _indices(op, "grad_input_indices") or range(len(op.input))
    g_input = [None] * len(op.input)
    for i in in_idx:
        g_input[i] = grad_name(op.input[i])
    grads = [g_output[i] if g_output[i] is not None else grad_name(op.output[i]) for i in out_idx]
    inputs = list(op.input) + list(op.output) + grads
    return [gradient_op(op, "PythonGradient", inputs, [g_input[i] for i in in_idx])], g_input


@register_op("Python", gradient=_python_grad, setup=_setup("forward"), cpu_only_inputs=True,
             side_effects=True)
def python(ctx, inputs):
    """Calls the registered f(inputs, outputs[, workspace]) (see core.CreatePythonOperator)."""
    return _run(ctx, inputs, "forward")


@register_op("PythonGradient", setup=_setup("gradient"), cpu_only_inputs=True,
             side_effects=True)
def python_gradient(ctx, inputs):
    """Calls the registered grad_f(inputs + outputs + output grads, input grads)."""
    return _run(ctx, inputs, "gradient")
