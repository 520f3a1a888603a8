"""The torch oracle: run a one-op NetDef through the workspace, compare forward and gradients."""
import numpy as np
import torch

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace
from caffe2torch.python.gradient_checker import fetch_dense_gradient

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_option(device):
    """The Caffe2 DeviceOption for 'cpu' or 'cuda'."""
    return core.DeviceOption(caffe2_pb2.CUDA if device == "cuda" else caffe2_pb2.CPU, 0)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _compare(what, got, expected, atol, rtol):
    expected = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else \
        np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != expected {expected.shape}"
    if expected.dtype.kind in "fc":
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, expected, err_msg=what)


def check_op(op_type, inputs, outputs, args=None, torch_forward=None, grad=True, atol=1e-8,
             rtol=1e-7, grad_outputs=None, no_grad_inputs=(), device="cpu", seed=0):
    """Run ``op_type`` on ``inputs`` ({name: numpy array}) and check it against ``torch_forward``.

    ``torch_forward(*tensors)`` returns the expected output(s) in ``outputs`` order (None skips
    one). With ``grad``, the op's gradient ops (built by ``AddGradientOperators`` with a random
    upstream gradient on ``grad_outputs``, default the first output) must give the gradients
    that torch.autograd gives for every floating-point input not in ``no_grad_inputs``.
    Float64 inputs keep tolerances tight. Returns the gradient map.
    """
    args = args or {}
    option = device_option(device)
    op = core.CreateOperator(op_type, list(inputs), outputs, device_option=option, **args)

    def feed(extra=None):
        workspace.ResetWorkspace()
        for name, value in {**inputs, **(extra or {})}.items():
            workspace.FeedBlob(name, value, device_option=option)

    feed()
    workspace.RunOperatorOnce(op)
    got = {name: workspace.FetchBlob(name) for name in outputs if workspace.HasBlob(name)
           and workspace.C().blobs[name] is not None}

    tensors = [torch.tensor(value, requires_grad=value.dtype.kind == "f")
               for value in inputs.values()]
    expected = _as_list(torch_forward(*tensors))
    assert len(expected) <= len(outputs), "torch_forward returned more values than outputs"
    for name, exp in zip(outputs, expected):
        if exp is not None:
            assert name in got, f"{op_type} did not write output {name!r}"
            _compare(f"{op_type} output {name!r}", got[name], exp, atol, rtol)

    if not grad:
        return None
    assert registry.get_schema(op_type).differentiable, f"{op_type} has no gradient maker"
    grad_outputs = grad_outputs or [outputs[0]]
    rng = np.random.default_rng(seed)
    upstream = {name: np.asarray(rng.standard_normal(got[name].shape), dtype=got[name].dtype)
                for name in grad_outputs}
    net = core.Net(f"check_{op_type}")
    net.Proto().op.extend([op])
    grad_map = net.AddGradientOperators({name: f"{name}_upstream" for name in grad_outputs})
    feed({f"{name}_upstream": value for name, value in upstream.items()})
    workspace.RunNetOnce(net)

    by_name = dict(zip(outputs, expected))
    loss = sum((by_name[name] * torch.tensor(upstream[name])).sum() for name in grad_outputs)
    wanted = [(name, t) for name, t in zip(inputs, tensors)
              if t.requires_grad and name not in no_grad_inputs]
    reference = torch.autograd.grad(loss, [t for _, t in wanted], allow_unused=True)
    for (name, t), ref in zip(wanted, reference):
        assert name in grad_map, f"{op_type}: no gradient for input {name!r} (map {grad_map})"
        ref = torch.zeros_like(t) if ref is None else ref
        got_grad = fetch_dense_gradient(grad_map[name], inputs[name])  # a GradientSlice too
        _compare(f"{op_type} gradient of {name!r}", got_grad, ref, atol, rtol)
    for name in no_grad_inputs:
        assert name not in grad_map, f"{op_type}: unexpected gradient for input {name!r}"
    return grad_map


def rand(*shape, seed=0, low=-1.0, high=1.0):
    """A float64 array with values uniform in [low, high)."""
    return np.random.default_rng(seed).uniform(low, high, shape)
