"""Caffe2's ``device_checker``: an op or a net gives the same outputs on every device option."""
import numpy as np

from caffe2torch.python import core, workspace


class DeviceChecker:
    """Runs an op (or net) under each device option and compares with the first one's outputs."""

    def __init__(self, threshold, device_options):
        self._threshold = threshold
        self._device_options = device_options

    def CheckSimple(self, op, inputs, outputs_to_check, input_device_options=None):
        """True when outputs ``outputs_to_check`` (indices) agree across the device options."""
        input_device_options = input_device_options or {}
        old_ws = workspace.CurrentWorkspace()
        results = []
        workspace.SwitchWorkspace("_device_check_", True)
        try:
            for option in self._device_options:
                workspace.ResetWorkspace()
                op_here = type(op)()
                op_here.CopyFrom(op)
                op_here.device_option.CopyFrom(option)
                for name, value in zip(op.input, inputs):
                    workspace.FeedBlob(name, value, input_device_options.get(name, option))
                workspace.RunOperatorOnce(op_here)
                results.append([workspace.FetchBlob(op.output[i]) for i in outputs_to_check])
        finally:
            workspace.ResetWorkspace()
            workspace.SwitchWorkspace(old_ws)
        return self._agree(results, [op.output[i] for i in outputs_to_check])

    def _agree(self, results, names):
        ok = True
        for k, result in enumerate(results[1:], start=1):
            for name, a, b in zip(names, results[0], result):
                a, b = np.asarray(a), np.asarray(b)
                same = a.shape == b.shape and (
                    np.allclose(a, b, atol=self._threshold, rtol=self._threshold)
                    if a.dtype.kind in "fc" else np.array_equal(a, b))
                if not same:
                    print(f"Failure in checking device option {k} and blob {name}: the outputs "
                          f"differ ({a.shape} vs {b.shape})")
                    ok = False
        return ok

    def CheckNet(self, net, inputs=None, blobs_to_check=None, ignore=None):
        """True when the net's blobs (all written ones, less ``ignore``) agree across devices."""
        inputs = inputs or {}
        ignore = set(ignore or ())
        proto = net.Proto() if hasattr(net, "Proto") else net
        if blobs_to_check is None:
            blobs_to_check = sorted({o for op in proto.op for o in op.output} - ignore)
        old_ws = workspace.CurrentWorkspace()
        results = []
        workspace.SwitchWorkspace("_device_check_", True)
        try:
            for option in self._device_options:
                workspace.ResetWorkspace()
                copy = core.Net(proto).Proto()
                for op in copy.op:
                    op.device_option.CopyFrom(option)
                for name, value in inputs.items():
                    workspace.FeedBlob(name, value, option)
                workspace.RunNetOnce(copy)
                results.append([workspace.FetchBlob(b) for b in blobs_to_check])
        finally:
            workspace.ResetWorkspace()
            workspace.SwitchWorkspace(old_ws)
        return self._agree(results, blobs_to_check)
