"""Caffe2's ``gradient_checker``: an op's (or a net's) gradient against finite differences.

The loss is ½·Σ‖output‖² over the outputs with gradients, so each output's gradient is the
output itself; the numeric gradient of one input is the central difference
(L(x + h) − L(x − h)) / 2h per element. Example::

    checker = gradient_checker.GradientChecker(stepsize=0.05, threshold=0.005)
    op = core.CreateOperator("Tanh", ["X"], ["Y"])
    ok, grad, estimate = checker.CheckSimple(op, [X], 0, [0])
"""
import numpy as np

from caffe2torch.python import core, workspace


def _loss_and_feed_grads(outputs, device_option):
    loss = 0.0
    for name in outputs:
        value = workspace.FetchBlob(name)
        loss += float(np.sum(value.astype(np.float64) ** 2))
        workspace.FeedBlob(name + "_grad", value, device_option)
    return loss / 2.0


def fetch_dense_gradient(grad, like):
    """The gradient blob ``grad`` as a dense array shaped like ``like`` (a GradientSlice's
    rows are scattered and summed into zeros)."""
    if isinstance(grad, core.GradientSlice):
        indices = workspace.FetchBlob(str(grad.indices))
        values = workspace.FetchBlob(str(grad.values))
        dense = np.zeros_like(np.asarray(like))
        np.add.at(dense, indices.reshape(-1).astype(np.int64),
                  values.reshape((-1,) + dense.shape[1:]))
        return dense
    return workspace.FetchBlob(str(grad))


class GradientChecker:
    """Compares an op's gradient ops with a numerical estimate (Caffe2's class)."""

    def __init__(self, stepsize, threshold, device_option=None, workspace_name="gradient_check",
                 input_device_options=None):
        self._stepsize = stepsize
        self._threshold = threshold
        self._device_option = device_option or core.DeviceOption(0)
        self._workspace_name = workspace_name
        self._input_device_options = input_device_options or {}

    def _feed(self, names, inputs, input_device_options):
        for name, value in zip(names, inputs):
            option = input_device_options.get(name, self._device_option)
            workspace.FeedBlob(name, value, option)

    def GetLossAndGrad(self, op, grad_ops, inputs, input_names, input_to_check, grad_name,
                       outputs_with_grads, input_device_options=None):
        """(loss, gradient of input ``input_to_check``) for the given input values."""
        self._feed(input_names, inputs, input_device_options or self._input_device_options)
        workspace.RunOperatorOnce(op)
        loss = _loss_and_feed_grads([op.output[i] for i in outputs_with_grads],
                                    self._device_option)
        workspace.RunOperatorsOnce(grad_ops)
        return loss, fetch_dense_gradient(grad_name, inputs[input_to_check])

    def CheckSimple(self, op, inputs, input_to_check, outputs_with_grads, grad_ops=None,
                    input_device_options=None, ensure_outputs_are_inferred=False):
        """(ok, analytic gradient, numeric estimate) for input number ``input_to_check``."""
        old_ws = workspace.CurrentWorkspace()
        workspace.SwitchWorkspace(self._workspace_name, True)
        try:
            workspace.ResetWorkspace()
            op = _on_device(op, self._device_option)
            if grad_ops is None:
                grad_ops, g_input = core.GradientRegistry.GetGradientForOp(
                    op, [s + "_grad" for s in op.output])
            else:
                g_input = [n + "_grad" for n in op.input]
            grad_name = g_input[input_to_check]
            if grad_name is None:
                raise ValueError(f"{op.type}: input {input_to_check} ({op.input[input_to_check]!r})"
                                 " has no gradient")
            inputs = [np.array(x, copy=True) for x in inputs]
            options = input_device_options or self._input_device_options
            _, grad = self.GetLossAndGrad(op, grad_ops, inputs, op.input, input_to_check,
                                          grad_name, outputs_with_grads, options)
            x = inputs[input_to_check]
            estimate = np.zeros(x.shape, dtype=np.float64)
            for k in range(x.size):
                x.flat[k] += self._stepsize
                pos, _ = self.GetLossAndGrad(op, grad_ops, inputs, op.input, input_to_check,
                                             grad_name, outputs_with_grads, options)
                x.flat[k] -= 2 * self._stepsize
                neg, _ = self.GetLossAndGrad(op, grad_ops, inputs, op.input, input_to_check,
                                             grad_name, outputs_with_grads, options)
                x.flat[k] += self._stepsize
                estimate.flat[k] = (pos - neg) / self._stepsize / 2
            fail = ~np.isclose(grad, estimate, atol=self._threshold, rtol=self._threshold)
            if np.any(fail):
                idx = np.flatnonzero(fail)
                print("Failed. [idx, grad, grad_estimate] are:")
                print(np.vstack([idx, grad.flat[idx], estimate.flat[idx]]).T)
            return not np.any(fail), grad, estimate
        finally:
            workspace.ResetWorkspace()
            workspace.SwitchWorkspace(old_ws)


def _on_device(op, device_option):
    if device_option is None or op.HasField("device_option"):
        return op
    copy = type(op)()
    copy.CopyFrom(op)
    copy.device_option.CopyFrom(device_option)
    return copy


class NetGradientChecker:
    """Gradient checks of whole nets (Caffe2's class of that name)."""

    @staticmethod
    def CompareNets(nets, outputs, outputs_with_grad_ids, inputs_with_grads, input_values=None,
                    threshold=0.0000001, print_net_images=False):
        """Run several nets on the same inputs; their outputs and input gradients must agree."""
        results = []
        for net in nets:
            if input_values:
                for name, value in input_values.items():
                    workspace.FeedBlob(name, value)
            grad_net = core.Net(net.Proto())
            grad_map = grad_net.AddGradientOperators(
                [outputs[i] for i in outputs_with_grad_ids])
            workspace.RunNetOnce(grad_net)
            results.append(([workspace.FetchBlob(o) for o in outputs],
                            [fetch_dense_gradient(grad_map[str(i)], workspace.FetchBlob(str(i)))
                             for i in inputs_with_grads]))
        first_out, first_grads = results[0]
        for outs, grads in results[1:]:
            for a, b in zip(first_out + first_grads, outs + grads):
                np.testing.assert_allclose(a, b, atol=threshold, rtol=threshold)
        return results

    @staticmethod
    def Check(net, outputs_with_grad_ids, input_values, input_to_check, step_size=0.0001,
              threshold=0.05, print_net=True):
        """Analytic vs numeric gradient of ``input_to_check`` for loss ½·Σ‖external output‖²."""
        outputs = [net.Proto().external_output[i] for i in outputs_with_grad_ids]
        grad_net = core.Net(net.Proto())
        grad_map = grad_net.AddGradientOperators({o: o + "_grad_in" for o in outputs})

        def loss_and_grad(values):
            for name, value in values.items():
                workspace.FeedBlob(name, value)
            workspace.RunNetOnce(net)
            loss = 0.0
            for o in outputs:
                out = workspace.FetchBlob(o)
                loss += float(np.sum(out.astype(np.float64) ** 2)) / 2
                workspace.FeedBlob(o + "_grad_in", out)
            workspace.RunNetOnce(grad_net)
            return loss, fetch_dense_gradient(grad_map[input_to_check],
                                              values[input_to_check])

        values = {k: np.array(v, copy=True) for k, v in input_values.items()}
        _, grad = loss_and_grad(values)
        x = values[input_to_check]
        estimate = np.zeros(x.shape, dtype=np.float64)
        for k in range(x.size):
            x.flat[k] += step_size
            pos, _ = loss_and_grad(values)
            x.flat[k] -= 2 * step_size
            neg, _ = loss_and_grad(values)
            x.flat[k] += step_size
            estimate.flat[k] = (pos - neg) / (2 * step_size)
        np.testing.assert_allclose(grad, estimate, atol=threshold, rtol=threshold,
                                   err_msg=f"gradient of {input_to_check!r}")
        return grad, estimate
