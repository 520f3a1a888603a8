"""The ops data_parallel_model adds between devices (NCCL collectives, SpatialBN statistics
across batches), with Caffe2's test helpers against numpy references."""
import numpy as np
import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
import hypothesis.strategies as st  # noqa: E402

from caffe2torch.python import core  # noqa: E402
from caffe2torch.python import hypothesis_test_util as hu  # noqa: E402

_floats = st.floats(-2, 2, width=32)


def _bn_ref(x, scale, bias, sums, sumsq, num_batches, eps):
    count = num_batches * x.size // x.shape[1]
    mean = sums / count
    inv_std = 1 / np.sqrt(sumsq / count - mean ** 2 + eps)
    shape = (1, -1, 1, 1)
    y = (x - mean.reshape(shape)) * (inv_std * scale).reshape(shape) + bias.reshape(shape)
    return y, mean, inv_std


class TestCrossDeviceOps(hu.HypothesisTestCase):
    @settings(max_examples=5, deadline=None)
    @given(n=st.integers(1, 4), X=hu.tensor(min_dim=2, max_dim=2, elements=_floats), **hu.gcs)
    def test_nccl_allreduce_and_reduce(self, n, X, gc, dc):
        inputs = [X * (k + 1) for k in range(n)]
        names = [f"x{k}" for k in range(n)]
        total = sum(inputs)
        op = core.CreateOperator("NCCLAllreduce", names, [f"y{k}" for k in range(n)])
        self.assertReferenceChecks(gc, op, inputs, lambda *xs: [total] * n)
        op = core.CreateOperator("NCCLReduce", names, ["y"])
        self.assertReferenceChecks(gc, op, inputs, lambda *xs: [total])
        op = core.CreateOperator("NCCLBroadcast", names, [f"y{k}" for k in range(n)],
                                 root=n - 1)
        self.assertReferenceChecks(gc, op, inputs, lambda *xs: [xs[-1]] * n)

    @settings(max_examples=5, deadline=None)
    @given(X=hu.tensor(min_dim=4, max_dim=4, elements=_floats), **hu.gcs)
    def test_channel_stats(self, X, gc, dc):
        op = core.CreateOperator("ChannelStats", ["X"], ["sum", "sumsq"])
        self.assertReferenceChecks(
            gc, op, [X], lambda X: [X.sum((0, 2, 3)), (X * X).sum((0, 2, 3))], threshold=1e-3)
        self.assertDeviceChecks(dc, op, [X], [0, 1])

    @settings(max_examples=5, deadline=None)
    @given(batches=st.integers(1, 3), seed=st.integers(0, 100), **hu.gcs)
    def test_spatial_bn_with_the_sums_of_several_batches(self, batches, seed, gc, dc):
        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal((2, 3, 2, 2)).astype(np.float32) for _ in range(batches)]
        sums = sum(x.sum((0, 2, 3)) for x in xs).astype(np.float32)
        sumsq = sum((x * x).sum((0, 2, 3)) for x in xs).astype(np.float32)
        scale, bias = rng.random(3).astype(np.float32) + 0.5, rng.random(3).astype(np.float32)
        rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
        op = core.CreateOperator(
            "SpatialBN", ["X", "scale", "bias", "rm", "rv", "sums", "sumsq"],
            ["Y", "rm_out", "rv_out", "saved_mean", "saved_inv_std"], epsilon=1e-3,
            momentum=0.9, num_batches=batches)

        def ref(X, scale, bias, rm, rv, sums, sumsq):
            y, mean, inv_std = _bn_ref(X, scale, bias, sums, sumsq, batches, 1e-3)
            var = inv_std ** -2 - 1e-3
            return [y, 0.9 * rm + 0.1 * mean, 0.9 * rv + 0.1 * var, mean, inv_std]
        self.assertReferenceChecks(gc, op, [xs[0], scale, bias, rm, rv, sums, sumsq], ref,
                                   threshold=1e-3)
        if batches == 1:  # one batch's sums: the same as the plain training SpatialBN
            plain = core.CreateOperator("SpatialBN", ["X", "scale", "bias", "rm", "rv"],
                                        ["Y", "rm_out", "rv_out", "saved_mean",
                                         "saved_inv_std"], epsilon=1e-3, momentum=0.9)
            self.assertReferenceChecks(gc, plain, [xs[0], scale, bias, rm, rv],
                                       lambda *a: ref(*a, sums, sumsq), threshold=1e-3)

    @settings(max_examples=5, deadline=None)
    @given(seed=st.integers(0, 100), **hu.gcs)
    def test_backprop_stats_and_gradient_of_one_batch_match_the_plain_gradient(self, seed,
                                                                               gc, dc):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
        dy = rng.standard_normal((2, 3, 2, 2)).astype(np.float32)
        scale = rng.random(3).astype(np.float32) + 0.5
        mean = x.mean((0, 2, 3))
        inv_std = (1 / np.sqrt(x.var((0, 2, 3)) + 1e-5)).astype(np.float32)
        xhat = (x - mean.reshape(1, -1, 1, 1)) * inv_std.reshape(1, -1, 1, 1)
        dscale, dbias = (dy * xhat).sum((0, 2, 3)), dy.sum((0, 2, 3))
        op = core.CreateOperator("ChannelBackpropStats", ["X", "mean", "inv_std", "dY"],
                                 ["dscale", "dbias"])
        self.assertReferenceChecks(gc, op, [x, mean, inv_std, dy],
                                   lambda *a: [dscale, dbias], threshold=1e-3)
        plain = core.CreateOperator("SpatialBNGradient", ["X", "scale", "dY", "mean", "inv_std"],
                                    ["dX", "dscale", "dbias"])
        combined = core.CreateOperator(
            "SpatialBNGradient", ["X", "scale", "dY", "mean", "inv_std", "ds", "db"],
            ["dX", "dscale", "dbias"], num_batches=1)
        want = self.assertReferenceChecks(gc, plain, [x, scale, dy, mean, inv_std],
                                          lambda *a: [None, dscale, dbias], threshold=1e-3)
        self.assertReferenceChecks(gc, combined, [x, scale, dy, mean, inv_std, dscale, dbias],
                                   lambda *a: want, threshold=1e-3)
