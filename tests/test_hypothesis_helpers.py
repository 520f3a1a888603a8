"""Caffe2's test helpers (test_util, gradient_checker, device_checker, hypothesis_test_util),
used as Caffe2's own op tests use them, on CPU and (when present) CUDA."""
import numpy as np
import pytest

pytest.importorskip("hypothesis")  # a test requirement (pinned in the requirements)

from hypothesis import given, settings  # noqa: E402
import hypothesis.strategies as st  # noqa: E402

from caffe2torch.ops import registry  # noqa: E402
from caffe2torch.python import core, device_checker, gradient_checker, workspace  # noqa: E402
from caffe2torch.python import hypothesis_test_util as hu  # noqa: E402
from caffe2torch.python import test_util  # noqa: E402


class TestOpsWithCaffe2Helpers(hu.HypothesisTestCase):
    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(elements=st.floats(-2, 2, width=32)), **hu.gcs)
    def test_tanh(self, X, gc, dc):
        op = core.CreateOperator("Tanh", ["X"], ["Y"])
        self.assertReferenceChecks(gc, op, [X], lambda X: [np.tanh(X)])
        self.assertDeviceChecks(dc, op, [X], [0])
        self.assertGradientChecks(gc, op, [X], 0, [0])

    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(min_dim=2, max_dim=2), **hu.gcs)
    def test_softmax_with_grad_reference(self, X, gc, dc):
        def ref(X):
            e = np.exp(X - X.max(axis=1, keepdims=True))
            return [e / e.sum(axis=1, keepdims=True)]

        def grad_ref(dY, outputs, inputs):
            Y = outputs[0]
            return [Y * (dY - (dY * Y).sum(axis=1, keepdims=True))]
        op = core.CreateOperator("Softmax", ["X"], ["Y"])
        self.assertReferenceChecks(gc, op, [X], ref, output_to_grad="Y", grad_reference=grad_ref)
        self.assertGradientChecks(gc, op, [X], 0, [0], stepsize=1e-2)

    @settings(max_examples=5, deadline=None)
    @given(n=hu.dims(1, 4), k=hu.dims(1, 4), m=hu.dims(1, 3), **hu.gcs)
    def test_fc(self, n, k, m, gc, dc):
        X, W, b = (np.random.rand(*s).astype(np.float32) - 0.5 for s in [(n, k), (m, k), (m,)])
        op = core.CreateOperator("FC", ["X", "W", "b"], ["Y"])
        self.assertReferenceChecks(gc, op, [X, W, b], lambda X, W, b: [X @ W.T + b])
        self.assertDeviceChecks(dc, op, [X, W, b], [0])
        for i in range(3):
            self.assertGradientChecks(gc, op, [X, W, b], i, [0])

    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(min_dim=2, max_dim=3), **hu.gcs)
    def test_mul_broadcast_scalar(self, X, gc, dc):
        op = core.CreateOperator("Mul", ["X", "s"], ["Y"], broadcast=1)
        s = np.array([1.5], np.float32)
        self.assertReferenceChecks(gc, op, [X, s], lambda X, s: [X * s[0]])
        self.assertGradientChecks(gc, op, [X, s], 0, [0])

    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(), **hu.gcs_cpu_only)
    def test_validation_and_raise_checks(self, X, gc, dc):
        op = core.CreateOperator("Relu", ["X"], ["Y"])

        def validate(X, Y):
            assert (Y >= 0).all() and np.array_equal(Y[X > 0], X[X > 0])
        self.assertValidationChecks(gc, op, [X], validate)
        bad = core.CreateOperator("FC", ["X", "W", "b"], ["Y"])
        self.assertRunOpRaises(gc, bad, [X, np.ones((2, 7), np.float32),
                                         np.ones(3, np.float32)])

    def test_adam_reference(self):
        p, m1, m2, g = (np.random.rand(3).astype(np.float32) for _ in range(4))
        lr, it = np.array([-0.1], np.float32), np.array([2], np.int64)

        def ref(p, m1, m2, g, lr, it):
            t = it[0] + 1
            nm1 = 0.9 * m1 + 0.1 * g
            nm2 = 0.999 * m2 + 0.001 * g * g
            c = np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
            return [p + lr[0] * c * nm1 / (np.sqrt(nm2) + 1e-5), nm1, nm2]
        op = core.CreateOperator("Adam", ["p", "m1", "m2", "g", "lr", "it"], ["p", "m1", "m2"])
        self.assertReferenceChecks(hu.cpu_do, op, [p, m1, m2, g, lr, it], ref, threshold=1e-5)


@settings(max_examples=10, deadline=None)
@given(lengths=st.integers(0, 12).flatmap(hu.lengths), t=hu.tensors(2, min_dim=1, max_dim=2))
def test_strategies_make_what_caffe2s_do(lengths, t):
    assert lengths.dtype == np.int32 and (lengths >= 0).all()
    assert t[0].shape == t[1].shape and t[0].dtype == np.float32


def test_gradient_checker_catches_a_wrong_gradient():
    original = registry.get_schema("Tanh").gradient
    try:
        @core.GradientRegistry.RegisterGradient("Tanh")
        def wrong(op, g_output):  # d tanh = 1 - y², here 2·(1 - y²)
            return [core.CreateOperator("TanhGradient", [op.output[0], g_output[0]], ["t"]),
                    core.CreateOperator("Scale", ["t"], [op.input[0] + "_grad"], scale=2.0)], \
                [op.input[0] + "_grad"]
        checker = gradient_checker.GradientChecker(stepsize=0.05, threshold=0.005)
        X = np.array([0.1, -0.5, 0.7], np.float32)
        ok, grad, estimate = checker.CheckSimple(core.CreateOperator("Tanh", ["X"], ["Y"]), [X],
                                                 0, [0])
        assert not ok
        np.testing.assert_allclose(grad, 2 * estimate, rtol=0.02)
    finally:
        registry.register_gradient("Tanh", original)
    ok, _, _ = checker.CheckSimple(core.CreateOperator("Tanh", ["X"], ["Y"]), [X], 0, [0])
    assert ok


def test_net_gradient_checker_and_device_checker_on_nets():
    net = core.Net("ngc")
    net.FC(["x", "w", "b"], "fc")
    net.Sigmoid("fc", "y")
    net.AddExternalOutput("y")
    rng = np.random.default_rng(0)
    values = {"x": rng.standard_normal((2, 3)).astype(np.float32),
              "w": rng.standard_normal((2, 3)).astype(np.float32),
              "b": np.zeros(2, np.float32)}
    workspace.ResetWorkspace()
    grad, estimate = gradient_checker.NetGradientChecker.Check(net, [0], values, "w",
                                                               step_size=1e-2, threshold=1e-2)
    assert grad.shape == (2, 3)
    checker = device_checker.DeviceChecker(1e-4, hu.device_options)
    assert checker.CheckNet(net, inputs=values)


def test_device_checker_reports_disagreement():
    # Two "devices" that run different random seeds must disagree on a random fill.
    options = [core.DeviceOption(0, 0, random_seed=1), core.DeviceOption(0, 0, random_seed=2)]
    op = core.CreateOperator("GaussianFill", [], ["r"], shape=[4])
    assert not device_checker.DeviceChecker(1e-4, options).CheckSimple(op, [], [0])


class TestUtilCase(test_util.TestCase):
    def test_each_test_starts_empty(self):
        test_util.randBlobFloat32("a", 2, 3)
        self.assertEqual(workspace.FetchBlob("a").shape, (2, 3))
        net = core.Net("tu")
        net.Relu("a", "b")
        self.assertEqual(test_util.numOps(net), 1)
        self.assertNetContainOps(net, ["Relu"])
        self.assertTrue(test_util.str_compare(b"x", "x"))
        self.assertEqual(test_util.rand_array(2, 2).dtype, np.float32)


@pytest.mark.skipif(not workspace.has_gpu_support, reason="needs CUDA")
def test_device_checks_compare_cpu_with_cuda():
    X = np.random.rand(3, 4).astype(np.float32)
    op = core.CreateOperator("Softmax", ["X"], ["Y"])
    assert len(hu.device_options) == 2
    assert device_checker.DeviceChecker(1e-5, hu.device_options).CheckSimple(op, [X], [0])


from caffe2torch.python.serialized_test import serialized_test_util as serial  # noqa: E402


class TestSerializedTestCaseAsCaffe2sOpTestsUseIt(serial.SerializedTestCase):
    @serial.given(X=hu.tensor(elements=st.floats(0.5, 2, width=32)), **hu.gcs_cpu_only)
    @settings(max_examples=3, deadline=None)
    def test_reference_and_serialized_checks(self, X, gc, dc):
        op = core.CreateOperator("Sqrt", ["X"], ["Y"])
        self.assertReferenceChecks(gc, op, [X], lambda X: [np.sqrt(X)])
        self.assertSerializedOperatorChecks([X], [np.sqrt(X)], None, op, gc)
