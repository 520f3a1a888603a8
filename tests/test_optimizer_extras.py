"""optimizer: max_gradient_norm, lars, rowWise Adagrad, float16 parameters with float32 master
copies (build_multi_precision_sgd, PseudoFP16Initializer) and build_fp16_sgd; each step checked
against the update formula of Caffe2's op docs written in torch."""
import numpy as np
import pytest
import torch
from test_optimizer_module import _train, f32

from caffe2torch.python import brew, core, model_helper, optimizer, workspace
from caffe2torch.python.modeling.initializers import (PseudoFP16Initializer,
                                                      ReversePseudoFP16Initializer)

pytestmark = pytest.mark.usefixtures("fresh_workspace")


@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_max_gradient_norm_scales_the_rate_by_the_global_norm(max_norm):
    def update(params, grads, step, state):
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
        ratio = max_norm / max(float(norm), max_norm)
        for n, p in params.items():
            p -= f32(0.1) * ratio * grads[n]
    model = _train(optimizer.build_sgd, update, base_learning_rate=0.1,
                   max_gradient_norm=max_norm)
    types = [op.type for op in model.net.Proto().op]
    assert types.count("SumSqrElements") == 4 and "norm_clipped_grad_update/norm_ratio" in \
        [o for op in model.net.Proto().op for o in op.output]


def test_max_gradient_norm_with_lr_injection():
    def update(params, grads, step, state):
        norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
        ratio = 0.05 / max(float(norm), 0.05)
        for n, p in params.items():
            p -= f32(0.1) * ratio * grads[n]
    _train(optimizer.build_sgd, update, base_learning_rate=0.1, max_gradient_norm=0.05,
           allow_lr_injection=True)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_lars_scales_each_parameters_rate(offset):
    def update(params, grads, step, state):
        for n, p in params.items():
            norm = float(p.norm())  # a zero parameter (the biases at first) keeps factor 1
            factor = 1.0 / (float(grads[n].norm()) / norm + offset) if norm > 0 else 1.0
            p -= f32(0.1) * factor * grads[n]
    model = _train(optimizer.build_sgd, update, base_learning_rate=0.1, lars=offset)
    assert [op.type for op in model.net.Proto().op].count("Lars") == 4


def test_lars_must_be_nonnegative():
    model = model_helper.ModelHelper(name="m")
    brew.fc(model, "data", "out", dim_in=2, dim_out=2)
    model.AddGradientOperators(["out"])
    with pytest.raises(ValueError, match="Lars offset must be nonnegative"):
        optimizer.build_sgd(model, 0.1, lars=-1.0)


def test_row_wise_adagrad_on_a_sparse_gradient():
    init_net, net = core.Net("init"), core.Net("train")
    param = init_net.GivenTensorFill([], "emb", shape=[4, 3],
                                     values=np.arange(12, dtype=np.float32) / 10)
    opt = optimizer.AdagradOptimizer(alpha=0.5, epsilon=1e-4, rowWise=True)
    opt(net, init_net, param, core.GradientSlice("idx", "g"))
    assert "RowWiseSparseAdagrad" in [op.type for op in net.Proto().op]
    idx, g = np.array([1, 3], np.int64), np.ones((2, 3), np.float32)
    workspace.FeedBlob("idx", idx)
    workspace.FeedBlob("g", g)
    workspace.RunNetOnce(init_net)
    assert workspace.FetchBlob("emb_avg_squared_sum").shape == (4,)
    workspace.RunNetOnce(net)
    expected = np.arange(12, dtype=np.float64).reshape(4, 3) / 10
    expected[[1, 3]] -= 0.5 * 1.0 / (np.sqrt(1.0) + 1e-4)
    np.testing.assert_allclose(workspace.FetchBlob("emb"), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(workspace.FetchBlob("emb_avg_squared_sum"), [0, 1, 0, 1])


def test_row_wise_adagrad_refuses_a_dense_gradient():
    model = model_helper.ModelHelper(name="m")
    brew.fc(model, "data", "out", dim_in=2, dim_out=2)
    model.AddGradientOperators(["out"])
    with pytest.raises(ValueError, match="sparse gradients only"):
        optimizer.build_adagrad(model, 0.1, rowWise=True)


def _fp16_model(initializer=PseudoFP16Initializer):
    model = model_helper.ModelHelper(name="fp16")
    model.net.FloatToHalf("data", "data16")
    brew.fc(model, "data16", "pred16", dim_in=4, dim_out=3,
            WeightInitializer=initializer, BiasInitializer=initializer)
    model.net.HalfToFloat("pred16", "pred")
    _, loss = model.net.SoftmaxWithLoss(["pred", "label"], ["softmax", "loss"])
    model.AddGradientOperators([loss])
    return model


def _feed():
    rng = np.random.default_rng(0)
    workspace.FeedBlob("data", rng.standard_normal((6, 4)).astype(np.float32))
    workspace.FeedBlob("label", rng.integers(0, 3, 6).astype(np.int32))


def test_pseudo_fp16_initializer_makes_fp16_params_with_fp32_masters():
    model = _fp16_model()
    info = model.get_param_info("pred16_w")
    assert str(info.blob_copy[core.DataType.FLOAT]) == "pred16_w_fp32"
    workspace.RunNetOnce(model.param_init_net)
    assert workspace.FetchBlob("pred16_w").dtype == np.float16
    assert workspace.FetchBlob("pred16_w_fp32").dtype == np.float32
    np.testing.assert_array_equal(workspace.FetchBlob("pred16_w"),
                                  workspace.FetchBlob("pred16_w_fp32").astype(np.float16))


def test_build_multi_precision_sgd_updates_the_fp32_masters():
    model = _fp16_model()
    optimizer.build_multi_precision_sgd(model, base_learning_rate=0.5)
    types = [op.type for op in model.net.Proto().op]
    assert types.count("MomentumSGDUpdate") == 2
    assert types[-6:] == ["HalfToFloat", "MomentumSGDUpdate", "FloatToHalf"] * 2
    _feed()
    workspace.RunNetOnce(model.param_init_net)
    workspace.CreateNet(model.net)
    for _ in range(3):
        before = {n: workspace.FetchBlob(n + "_fp32").copy() for n in ("pred16_w", "pred16_b")}
        workspace.RunNet(model.net)
        for n, old in before.items():
            grad16 = workspace.FetchBlob(n + "_grad")
            assert grad16.dtype == np.float16
            new = workspace.FetchBlob(n + "_fp32")
            np.testing.assert_allclose(new, old - f32(0.5) * grad16.astype(np.float32),
                                       rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(workspace.FetchBlob(n), new.astype(np.float16))


def test_build_fp16_sgd_updates_fp16_params_in_place_with_weight_decay():
    model = _fp16_model()
    optimizer.build_fp16_sgd(model, base_learning_rate=0.5, momentum=0.0, weight_decay=0.01)
    assert [op.type for op in model.net.Proto().op].count("FP16MomentumSGDUpdate") == 2
    _feed()
    workspace.RunNetOnce(model.param_init_net)
    assert workspace.FetchBlob("pred16_w_momentum").dtype == np.float16
    before = workspace.FetchBlob("pred16_w").astype(np.float32)
    workspace.RunNetOnce(model.net)
    grad = workspace.FetchBlob("pred16_w_grad").astype(np.float32)  # lr·(g + wd·w) after it
    after = workspace.FetchBlob("pred16_w")
    assert after.dtype == np.float16
    np.testing.assert_allclose(after.astype(np.float32), before - grad, atol=2e-3)


def test_reverse_pseudo_fp16_initializer():
    model = model_helper.ModelHelper(name="rev")
    brew.fc(model, "data", "out", dim_in=2, dim_out=2,
            WeightInitializer=ReversePseudoFP16Initializer)
    workspace.RunNetOnce(model.param_init_net)
    assert workspace.FetchBlob("out_w").dtype == np.float32
    assert workspace.FetchBlob("out_w_fp16").dtype == np.float16
    info = model.get_param_info("out_w")
    assert str(info.blob_copy[core.DataType.FLOAT16]) == "out_w_fp16"


@pytest.mark.parametrize("build, kwargs", [
    (optimizer.build_sgd, {}), (optimizer.build_adagrad, {}),
    (optimizer.build_adagrad, {"rowWise": True})])
def test_sparse_gradient_of_gather_trains_only_the_rows_used(build, kwargs):
    model = model_helper.ModelHelper(name="embedding")
    w = model.param_init_net.ConstantFill([], "emb", shape=[4, 2], value=1.0)
    model.params.append(w)
    rows = model.net.Gather([w, "ids"], "rows")
    loss = model.net.AveragedLoss(model.net.SumElements(rows, "s"), "loss")
    grads = model.AddGradientOperators([loss])
    assert isinstance(grads["emb"], core.GradientSlice)
    build(model, base_learning_rate=0.5, **kwargs)
    workspace.FeedBlob("ids", np.array([0, 2, 2], np.int64))
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    emb = workspace.FetchBlob("emb")
    np.testing.assert_array_equal(emb[[1, 3]], 1.0)  # rows not gathered keep their values
    assert (emb[[0, 2]] < 1.0).all()  # the gathered ones moved against their gradient
    if build is optimizer.build_sgd:  # row 2 was gathered twice: twice the step
        np.testing.assert_allclose(emb[0], 1 - 0.5)
        np.testing.assert_allclose(emb[2], 1 - 2 * 0.5)
