"""HalfToFloat / FloatToHalf, the float16 fills, Lars, RowWiseSparseAdagrad, FP16/FP32
MomentumSGDUpdate, LpNorm and ClipTensorByScaling, against the formulas of Caffe2's op docs,
with Caffe2's own test helpers (hypothesis_test_util) where its tests use them."""
import numpy as np
import pytest

pytest.importorskip("hypothesis")

import hypothesis.strategies as st  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from caffe2torch.python import core, workspace  # noqa: E402
from caffe2torch.python import hypothesis_test_util as hu  # noqa: E402

from .helpers import rand as rand64  # noqa: E402


def rand(*shape, seed=0):
    """Float32 values in [-1, 1)."""
    return rand64(*shape, seed=seed).astype(np.float32)

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def run(op_type, inputs, outputs, **args):
    for name, value in inputs.items():
        workspace.FeedBlob(name, value)
    workspace.RunOperatorOnce(core.CreateOperator(op_type, list(inputs), outputs, **args))
    return [workspace.FetchBlob(o) for o in outputs]


class TestPrecisionOps(hu.HypothesisTestCase):
    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(elements=st.floats(-100, 100, width=32)), **hu.gcs)
    def test_float_to_half_and_back(self, X, gc, dc):
        op = core.CreateOperator("FloatToHalf", ["X"], ["Y"])
        self.assertReferenceChecks(gc, op, [X], lambda X: [X.astype(np.float16)])
        back = core.CreateOperator("HalfToFloat", ["Y"], ["Z"])
        self.assertReferenceChecks(gc, back, [X.astype(np.float16)],
                                   lambda Y: [Y.astype(np.float32)])

    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(min_dim=1, max_dim=2, elements=st.floats(-3, 3, width=32)),
           p=st.sampled_from([1, 2]), average=st.booleans(), **hu.gcs_cpu_only)
    def test_lp_norm(self, X, p, average, gc, dc):
        X = X + np.where(X >= 0, 0.5, -0.5).astype(np.float32)  # away from |x|'s kink
        op = core.CreateOperator("LpNorm", ["X"], ["Z"], p=p, average=average)

        def ref(X):
            z = np.abs(X).sum() if p == 1 else (X * X).sum()
            return [np.array([z / X.size if average else z], np.float32)]
        self.assertReferenceChecks(gc, op, [X], ref)
        self.assertGradientChecks(gc, op, [X], 0, [0], stepsize=1e-3, threshold=1e-2)


def test_float_to_half_clip_and_the_wrong_dtype():
    big = np.array([1e6, -1e6, 1.0], np.float32)
    assert np.isinf(run("FloatToHalf", {"X": big}, ["Y"])[0][:2]).all()
    clipped = run("FloatToHalf", {"X": big}, ["Y"], clip=1)[0]
    np.testing.assert_array_equal(clipped, np.array([65504, -65504, 1], np.float16))
    with pytest.raises(RuntimeError, match="must be torch.float16"):
        run("HalfToFloat", {"X": big}, ["Y"])


def test_half_casts_are_each_others_gradient():
    net = core.Net("casts")
    net.FloatToHalf("x", "h")
    net.HalfToFloat("h", "y")
    grads = net.AddGradientOperators(["y"])
    assert [op.type for op in net.Proto().op][-2:] == ["FloatToHalf", "HalfToFloat"]
    workspace.FeedBlob("x", rand(3, 2))
    workspace.RunNetOnce(net)
    g = workspace.FetchBlob(grads["x"])
    assert g.dtype == np.float32 and (g == 1).all()


def test_float16_fills():
    workspace.RunOperatorOnce(core.CreateOperator("Float16ConstantFill", [], ["c"], shape=[2, 3],
                                                  value=1.5))
    c = workspace.FetchBlob("c")
    assert c.dtype == np.float16 and c.shape == (2, 3) and (c == 1.5).all()
    workspace.RunOperatorOnce(core.CreateOperator("Float16UniformFill", [], ["u"], shape=[500],
                                                  min=-2.0, max=3.0))
    u = workspace.FetchBlob("u")
    assert u.dtype == np.float16 and u.min() >= -2 and u.max() <= 3 and u.std() > 1


@pytest.mark.parametrize("offset, lr_min, lr_max", [(0.5, 0.02, 1e30), (0.0, 0.0, 1e30),
                                                    (0.5, 0.02, 0.3), (10.0, 0.5, 1e30)])
def test_lars_formula(offset, lr_min, lr_max):
    x, dx = rand(4, 3), rand(4, 3, seed=1) * 0.1
    wd, trust = np.array([0.01], np.float32), np.array([0.8], np.float32)
    (got,) = run("Lars", {"X": x, "dX": dx, "wd": wd, "trust": trust,
                          "lr_max": np.array([lr_max], np.float32)}, ["r"],
                 offset=offset, lr_min=lr_min)
    val = 0.8 / (np.linalg.norm(dx) / np.linalg.norm(x) + 0.01 + offset)
    np.testing.assert_allclose(got, [min(max(val, lr_min), min(lr_max, 3e38))], rtol=1e-5)


def test_lars_of_a_zero_parameter_is_one_clipped():
    (got,) = run("Lars", {"X": np.zeros(3, np.float32), "dX": rand(3),
                          "wd": np.zeros(1, np.float32), "trust": np.ones(1, np.float32),
                          "lr_max": np.array([0.5], np.float32)}, ["r"])
    np.testing.assert_allclose(got, [0.5])


@pytest.mark.parametrize("indices", [[0, 2], [2, 0, 2]])
def test_row_wise_sparse_adagrad(indices):
    param, moment = rand(4, 3), np.abs(rand(4, seed=2))
    grad = rand(len(indices), 3, seed=3)
    lr, eps = np.array([-0.1], np.float32), 1e-5
    got_p, got_m = run("RowWiseSparseAdagrad",
                       {"p": param, "m": moment, "i": np.array(indices, np.int64), "g": grad,
                        "lr": lr}, ["p", "m"], epsilon=eps)
    p, m = param.astype(np.float64), moment.astype(np.float64)
    for k, row in enumerate(indices):  # Caffe2's doc: m[row] += mean(g²); w += lr·g/(√m + ε)
        m[row] += np.mean(grad[k].astype(np.float64) ** 2)
        p[row] += lr[0] * grad[k] / (np.sqrt(m[row]) + eps)
    np.testing.assert_allclose(got_m, m, rtol=1e-5)
    np.testing.assert_allclose(got_p, p, rtol=1e-5, atol=1e-7)


def test_row_wise_sparse_adagrad_needs_one_moment_per_row():
    with pytest.raises(RuntimeError, match="one value per row"):
        run("RowWiseSparseAdagrad", {"p": rand(4, 3), "m": rand(4, 3), "i": np.array([0]),
                                     "g": rand(1, 3), "lr": np.array([-0.1], np.float32)},
            ["p", "m"])


@pytest.mark.parametrize("op_type, dtype", [("FP16MomentumSGDUpdate", np.float16),
                                            ("FP32MomentumSGDUpdate", np.float32)])
@pytest.mark.parametrize("nesterov", [0, 1])
def test_momentum_sgd_update_with_weight_decay(op_type, dtype, nesterov):
    g, m, w = rand(5, seed=1), rand(5, seed=2), rand(5, seed=3)
    lr, mu, wd = 0.1, 0.9, 1e-2
    got_g, got_m, got_w = run(op_type, {"g": g.astype(dtype), "m": m.astype(dtype),
                                        "lr": np.array([lr], np.float32),
                                        "w": w.astype(dtype)}, ["g", "m", "w"],
                              momentum=mu, nesterov=nesterov, weight_decay=wd)
    g, m, w = (a.astype(dtype).astype(np.float64) for a in (g, m, w))
    g = g + wd * w
    if nesterov:
        new_m = mu * m + lr * g
        step = (1 + mu) * new_m - mu * m
    else:
        step = new_m = lr * g + mu * m
    tol = 2e-3 if dtype == np.float16 else 1e-5
    assert got_w.dtype == dtype
    np.testing.assert_allclose(got_m, new_m, rtol=tol, atol=tol)
    np.testing.assert_allclose(got_w, w - step, rtol=tol, atol=tol)


@pytest.mark.parametrize("val, extra", [(0.5, None), (4.0, None), (4.0, 2.0)])
def test_clip_tensor_by_scaling(val, extra):
    x = rand(3, 2)
    inputs = {"x": x, "val": np.array([val], np.float32)}
    if extra is not None:
        inputs["t"] = np.array([extra], np.float32)
    (got,) = run("ClipTensorByScaling", inputs, ["y"], threshold=1.5)
    threshold = 1.5 * (extra or 1.0)
    np.testing.assert_allclose(got, x * threshold / val if val > threshold else x, rtol=1e-6)


def test_clip_tensor_by_scaling_needs_a_threshold():
    with pytest.raises(RuntimeError, match="needs argument 'threshold'"):
        run("ClipTensorByScaling", {"x": rand(2), "val": np.ones(1, np.float32)}, ["y"])
