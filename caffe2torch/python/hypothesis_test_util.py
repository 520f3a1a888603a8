"""Caffe2's ``hypothesis_test_util``: property tests of ops on every device, with references.

Needs the ``hypothesis`` package. Example (a test in Caffe2's own style)::

    class TestTanh(hu.HypothesisTestCase):
        @given(X=hu.tensor(), **hu.gcs)
        def test_tanh(self, X, gc, dc):
            op = core.CreateOperator("Tanh", ["X"], ["Y"])
            self.assertReferenceChecks(gc, op, [X], lambda X: [np.tanh(X)])
            self.assertDeviceChecks(dc, op, [X], [0])
            self.assertGradientChecks(gc, op, [X], 0, [0])
"""
import contextlib
import os

import hypothesis
import hypothesis.extra.numpy
import hypothesis.strategies as st
import numpy as np

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, device_checker, gradient_checker, test_util, workspace


def is_sandcastle():
    """True on Facebook's CI (never here, unless SANDCASTLE is set)."""
    return os.getenv("SANDCASTLE") == "1" or os.getenv("TW_JOB_USER") == "sandcastle"


def is_travis():
    """True on Travis CI."""
    return "TRAVIS" in os.environ


hypothesis.settings.register_profile(
    "sandcastle", derandomize=True, suppress_health_check=list(hypothesis.HealthCheck),
    database=None, max_examples=50, deadline=None, print_blob=True)
hypothesis.settings.register_profile(
    "dev", max_examples=10, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.register_profile(
    "debug", max_examples=1000, deadline=None, verbosity=hypothesis.Verbosity.verbose,
    suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.load_profile(
    "sandcastle" if is_sandcastle() else os.getenv("CAFFE2_HYPOTHESIS_PROFILE", "dev"))


def dims(min_value=1, max_value=5):
    """A dimension size."""
    return st.integers(min_value=min_value, max_value=max_value)


def elements_of_type(dtype=np.float32, filter_=None):
    """Values of ``dtype``: floats in [-1, 1], ints in [-2**30, 2**30], or bools."""
    if dtype in (np.float16, np.float32, np.float64):
        elems = st.floats(min_value=-1.0, max_value=1.0, width=8 * np.dtype(dtype).itemsize)
    elif dtype in (np.int32, np.int64):
        elems = st.integers(min_value=-2 ** 30, max_value=2 ** 30)
    elif dtype in (bool, np.bool_):
        elems = st.booleans()
    else:
        raise ValueError(f"elements_of_type: unsupported dtype {dtype}")
    return elems if filter_ is None else elems.filter(filter_)


def arrays(dims, dtype=np.float32, elements=None, unique=False):
    """Arrays of shape ``dims``."""
    if elements is None:
        elements = elements_of_type(dtype)
    return hypothesis.extra.numpy.arrays(dtype, dims, elements=elements, unique=unique)


def tensor(min_dim=1, max_dim=4, dtype=np.float32, elements=None, unique=False, **kwargs):
    """An array of ``min_dim``..``max_dim`` dimensions, each of size 1..5 (dims kwargs)."""
    shape = st.lists(dims(**kwargs), min_size=min_dim, max_size=max_dim)
    return shape.flatmap(lambda d: arrays(d, dtype, elements, unique=unique))


def tensor1d(min_len=1, max_len=64, dtype=np.float32, elements=None):
    """A 1-D array."""
    return tensor(1, 1, dtype, elements, min_value=min_len, max_value=max_len)


def segment_ids(size, is_sorted):
    """Segment ids for ``size`` rows (sorted, starting at 0, if ``is_sorted``)."""
    if size == 0:
        return st.just(np.empty(shape=[0], dtype=np.int32))
    if is_sorted:
        return arrays([size], dtype=np.int32, elements=st.booleans()).map(
            lambda x: np.cumsum(x, dtype=np.int32) - x[0])
    return arrays([size], dtype=np.int32, elements=st.integers(min_value=0, max_value=2 * size))


def lengths(size, min_segments=None, max_segments=None, **kwargs):
    """Segment lengths summing to ``size``: cut [0, size] at random borders."""
    min_segments = 0 if min_segments is None else min_segments
    max_segments = size if max_segments is None else max_segments
    if not 0 <= min_segments <= max_segments:
        raise ValueError("lengths: need 0 <= min_segments <= max_segments")
    if size == 0 and max_segments == 0:
        return st.just(np.empty(shape=[0], dtype=np.int32))
    if max_segments <= 0:
        raise ValueError("lengths: a non-zero size needs at least one segment")
    borders = st.integers(min_value=max(min_segments - 1, 0), max_value=max_segments - 1)
    return borders.flatmap(lambda n: arrays([n], np.int32, st.integers(0, size))).map(
        lambda cuts: np.diff(np.sort(np.append(cuts, [0, size]))).astype(np.int32))


def tensors(n, min_dim=1, max_dim=4, dtype=np.float32, elements=None, **kwargs):
    """``n`` arrays of one shared shape."""
    shape = st.lists(dims(**kwargs), min_size=min_dim, max_size=max_dim)
    return shape.flatmap(lambda d: st.lists(arrays(d, dtype, elements), min_size=n, max_size=n))


def tensors1d(n, min_len=1, max_len=64, dtype=np.float32, elements=None):
    """``n`` 1-D arrays of one shared length."""
    return tensors(n, 1, 1, dtype, elements, min_value=min_len, max_value=max_len)


cpu_do = caffe2_pb2.DeviceOption()
cuda_do = caffe2_pb2.DeviceOption(device_type=caffe2_pb2.CUDA)
gpu_do = cuda_do
hip_do = caffe2_pb2.DeviceOption(device_type=caffe2_pb2.HIP)
# Caffe2 decides these at import from its build; we ask torch the same way.
gpu_device_options = [gpu_do] if workspace.has_gpu_support else []
device_options = [cpu_do] + gpu_device_options
expanded_device_options = [cpu_do] + [
    caffe2_pb2.DeviceOption(device_type=caffe2_pb2.CUDA, cuda_gpu_id=i)
    for i in range(workspace.NumCudaDevices())]


def device_checker_device_options():
    """The device lists the device checks compare (all available)."""
    return st.just(device_options)


def gradient_checker_device_option():
    """One device to check gradients on."""
    return st.sampled_from(device_options)


gcs = dict(gc=gradient_checker_device_option(), dc=device_checker_device_options())
gcs_cpu_only = dict(gc=st.sampled_from([cpu_do]), dc=st.just([cpu_do]))
gcs_cuda_only = dict(gc=st.sampled_from(gpu_device_options or [cpu_do]),
                     dc=st.just(gpu_device_options))
gcs_gpu_only = gcs_cuda_only


@contextlib.contextmanager
def temp_workspace(name=b"temp_ws"):
    """Run the block in a fresh workspace, then return to the current one."""
    old = workspace.CurrentWorkspace()
    workspace.SwitchWorkspace(name.decode() if isinstance(name, bytes) else name, True)
    try:
        yield
    finally:
        workspace.ResetWorkspace()
        workspace.SwitchWorkspace(old)


def runOpBenchmark(device_option, op, inputs, input_device_options=None, iterations=10):
    """Run ``op`` ``iterations`` times on ``inputs``; caffe2torch returns True (no timings)."""
    with temp_workspace():
        for name, value in zip(op.input, inputs):
            workspace.FeedBlob(name, value, (input_device_options or {}).get(name, device_option))
        copy = type(op)()
        copy.CopyFrom(op)
        copy.device_option.CopyFrom(device_option)
        net = caffe2_pb2.NetDef(name="benchmark")
        net.op.extend([copy])
        workspace.CreateNet(net)
        return workspace.RunNet(net.name, iterations)


class HypothesisTestCase(test_util.TestCase):
    """TestCase with Caffe2's device, gradient, reference and validation checks."""

    def assertDeviceChecks(self, device_options, op, inputs, outputs_to_check,
                           input_device_options=None, threshold=0.01):
        """Outputs ``outputs_to_check`` agree on every device option."""
        checker = device_checker.DeviceChecker(threshold, device_options=device_options)
        self.assertTrue(checker.CheckSimple(op, inputs, outputs_to_check, input_device_options))

    def assertGradientChecks(self, device_option, op, inputs, outputs_to_check,
                             outputs_with_grads, grad_ops=None, threshold=0.005, stepsize=0.05,
                             input_device_options=None, ensure_outputs_are_inferred=False):
        """The gradient of input ``outputs_to_check`` matches finite differences."""
        checker = gradient_checker.GradientChecker(
            stepsize=stepsize, threshold=threshold, device_option=device_option,
            workspace_name=str(device_option), input_device_options=input_device_options)
        ok, grad, estimate = checker.CheckSimple(op, inputs, outputs_to_check, outputs_with_grads,
                                                 grad_ops=grad_ops)
        self.assertEqual(grad.shape, estimate.shape)
        self.assertTrue(ok, "Gradient check failed for input " + str(op.input[outputs_to_check]))

    def _assertGradReferenceChecks(self, op, inputs, ref_outputs, output_to_grad, grad_reference,
                                   threshold=1e-4):
        grad_blob_name = output_to_grad + "_grad"
        grad_ops, grad_map = core.GradientRegistry.GetBackwardPass([op],
                                                                   {output_to_grad: grad_blob_name})
        output_grad = workspace.FetchBlob(output_to_grad)
        grad_ref_outputs = grad_reference(output_grad, ref_outputs, inputs)
        workspace.FeedBlob(grad_blob_name, output_grad)
        workspace.RunOperatorsOnce(grad_ops)
        self.assertEqual(len(grad_ref_outputs), len(inputs))
        for name, ref in zip(op.input, grad_ref_outputs):
            if ref is None:
                continue
            self.assertIn(name, grad_map, f"no gradient for input {name}")
            grad = grad_map[name]
            if isinstance(grad, core.GradientSlice) and isinstance(ref, tuple):
                # Caffe2's sparse reference: (values, indices)
                np.testing.assert_allclose(workspace.FetchBlob(str(grad.indices)), ref[1])
                got, ref = workspace.FetchBlob(str(grad.values)), ref[0]
            else:
                from caffe2torch.python.gradient_checker import fetch_dense_gradient
                got = fetch_dense_gradient(grad, workspace.FetchBlob(name))
            np.testing.assert_allclose(got, ref, atol=threshold, rtol=threshold,
                                       err_msg=f"gradient of {name}")

    def assertReferenceChecks(self, device_option, op, inputs, reference,
                              input_device_options=None, threshold=1e-4, output_to_grad=None,
                              grad_reference=None, atol=None, outputs_to_check=None,
                              ensure_outputs_are_inferred=False):
        """The op's outputs equal ``reference(*inputs)`` (a list/tuple of arrays)."""
        op = _on(op, device_option)
        with temp_workspace():
            if len(op.input) > len(inputs):
                raise ValueError(f"{op.type} has {len(op.input)} inputs but only {len(inputs)} "
                                 "values were given")
            for name, value in zip(op.input, inputs):
                workspace.FeedBlob(name, value,
                                   (input_device_options or {}).get(name, device_option))
            workspace.RunOperatorOnce(op)
            ref_outputs = reference(*inputs)
            if not isinstance(ref_outputs, (list, tuple)):
                raise RuntimeError("the reference must return a list or tuple of outputs")
            names = list(op.output) if outputs_to_check is None else \
                [op.output[i] for i in outputs_to_check]
            for name, ref in zip(names, ref_outputs):
                if ref is None:
                    continue
                got = workspace.FetchBlob(name)
                if isinstance(ref, np.ndarray) and ref.dtype.kind in "OSU":
                    np.testing.assert_array_equal(np.asarray(got), ref, err_msg=name)
                else:
                    np.testing.assert_allclose(
                        got, ref, atol=threshold if atol is None else atol, rtol=threshold,
                        err_msg=f"output {name} of {op.type}")
            if grad_reference is not None:
                if output_to_grad is None:
                    raise ValueError("grad_reference needs output_to_grad")
                self._assertGradReferenceChecks(op, inputs, ref_outputs, output_to_grad,
                                                grad_reference, threshold=threshold)
            return [workspace.FetchBlob(n) for n in names]

    def assertValidationChecks(self, device_option, op, inputs, validator,
                               input_device_options=None, as_kwargs=True, init_net=None):
        """``validator`` accepts the op's inputs and outputs (by name, or as two lists)."""
        op = _on(op, device_option)
        with temp_workspace():
            for name, value in zip(op.input, inputs):
                workspace.FeedBlob(name, value,
                                   (input_device_options or {}).get(name, device_option))
            if init_net is not None:
                workspace.RunNetOnce(init_net)
            workspace.RunOperatorOnce(op)
            outputs = [workspace.FetchBlob(n) for n in op.output]
            if as_kwargs:
                validator(**dict(zip(list(op.input) + list(op.output), inputs + outputs)))
            else:
                validator(inputs=inputs, outputs=outputs)

    def assertRunOpRaises(self, device_option, op, inputs, input_device_options=None,
                          exception=(Exception,), regexp=None):
        """Running ``op`` raises ``exception`` (matching ``regexp``)."""
        op = _on(op, device_option)
        with temp_workspace():
            for name, value in zip(op.input, inputs):
                workspace.FeedBlob(name, value,
                                   (input_device_options or {}).get(name, device_option))
            if regexp is None:
                self.assertRaises(exception, workspace.RunOperatorOnce, op)
            else:
                self.assertRaisesRegex(exception, regexp, workspace.RunOperatorOnce, op)


def _on(op, device_option):
    copy = type(op)()
    copy.CopyFrom(op)
    if device_option is not None:
        copy.device_option.CopyFrom(device_option)
    return copy
