"""``workspace.Predictor``: Caffe2's C++ Predictor, run eagerly by caffe2torch's executor.

Example (the model zoo's two files)::

    with open("init_net.pb", "rb") as f:
        init_net = f.read()
    with open("predict_net.pb", "rb") as f:
        predict_net = f.read()
    p = workspace.Predictor(init_net, predict_net)
    [probabilities] = p.run([image])          # or p.run({"data": image})

As in Caffe2, the predictor's blobs live in a child workspace of the current one: it reads the
current workspace's blobs, and what its nets write stays its own. ``run([a, b])`` feeds the
predict net's first external inputs in order (Caffe2's C++ Predictor; exported nets list the
data input first); ``run({name: array})`` feeds by name. It returns the external outputs.
"""
import numpy as np
import torch

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import workspace as _workspace
from caffe2torch.python.executor import PreparedNet
from caffe2torch.python.plan_runner import _ChildWorkspace


def _net(net, what):
    if isinstance(net, (bytes, bytearray)):
        proto = caffe2_pb2.NetDef()
        proto.ParseFromString(bytes(net))
        return proto
    if hasattr(net, "Proto"):
        return net.Proto()
    if isinstance(net, caffe2_pb2.NetDef):
        return net
    raise TypeError(f"Predictor: {what} must be a serialized NetDef (bytes), a NetDef or a "
                    f"core.Net, not {type(net).__name__}")


class Predictor:
    """Runs ``init_net`` once, then ``predict_net`` on each ``run(inputs)``."""

    def __init__(self, init_net, predict_net):
        init_net = _net(init_net, "init_net")
        self.predict_net = _net(predict_net, "predict_net")
        self.workspace = _ChildWorkspace(_workspace.C())
        init = PreparedNet(init_net, self.workspace)
        try:
            init.run(1)
        finally:
            init.close()
        blobs = self.workspace.blobs
        self.input_names = list(self.predict_net.external_input)
        self.output_names = list(self.predict_net.external_output)
        for name in self.input_names:  # inputs the init net did not fill are fed by run()
            if blobs.get(name) is None:
                blobs.maps[0][name] = None
        self._net = PreparedNet(self.predict_net, self.workspace)

    def _feed(self, name, value):
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(value))
        self.workspace.blobs[name] = tensor

    def run(self, inputs):
        """Feed ``inputs`` (a list in input order, or {name: array}); the outputs as arrays."""
        if isinstance(inputs, dict):
            unknown = sorted(set(inputs) - set(self.input_names))
            if unknown:
                raise ValueError(f"Predictor.run: {unknown} are not inputs of the predict net "
                                 f"(its inputs: {self.input_names})")
            for name, value in inputs.items():
                self._feed(name, value)
        else:
            if len(inputs) > len(self.input_names):
                raise ValueError(f"Predictor.run: {len(inputs)} inputs given, the predict net "
                                 f"takes {len(self.input_names)}: {self.input_names}")
            for name, value in zip(self.input_names, inputs):
                self._feed(name, value)
        self._net.run(1)
        outputs = []
        for name in self.output_names:
            value = self.workspace.blobs[name]
            if type(value).__name__ == "Deferred":
                value = value.resolve()
            outputs.append(value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                           else value)
        return outputs
