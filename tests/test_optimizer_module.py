"""caffe2torch.python.optimizer: each build_* trains a small model; every step's parameters
match the same update written in torch (torch.optim where Caffe2's formula is torch's)."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, core, model_helper, optimizer, workspace


@pytest.fixture(autouse=True)
def _fresh(fresh_workspace):
    yield


def f32(x):
    return float(np.float32(x))


def _model():
    model = model_helper.ModelHelper(name="opt_model")
    hidden = brew.fc(model, "data", "hidden", dim_in=4, dim_out=5)
    hidden = brew.relu(model, hidden, hidden)
    pred = brew.fc(model, hidden, "pred", dim_in=5, dim_out=3)
    _, loss = model.net.SoftmaxWithLoss([pred, "label"], ["softmax", "loss"])
    model.AddGradientOperators([loss])
    return model


def _torch_loss(params, x, y):
    h = torch.relu(x @ params["hidden_w"].T + params["hidden_b"])
    logits = h @ params["pred_w"].T + params["pred_b"]
    return torch.nn.functional.cross_entropy(logits, y)


def _train(build, update, steps=4, counts_iterations=True, **kwargs):
    """Run ``steps`` of Caffe2 training and of ``update(params, grads, step, state)`` in torch."""
    model = _model()
    build(model, **kwargs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    y = rng.integers(0, 3, 6).astype(np.int32)
    workspace.FeedBlob("data", x)
    workspace.FeedBlob("label", y)
    workspace.RunNetOnce(model.param_init_net)
    workspace.CreateNet(model.net)
    names = ["hidden_w", "hidden_b", "pred_w", "pred_b"]
    params = {n: torch.tensor(workspace.FetchBlob(n), dtype=torch.float64, requires_grad=True)
              for n in names}
    state = {}
    for step in range(1, steps + 1):
        workspace.RunNet(model.net)
        loss = _torch_loss(params, torch.tensor(x, dtype=torch.float64), torch.tensor(y).long())
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
        with torch.no_grad():
            update(params, grads, step, state)
        for n in names:
            np.testing.assert_allclose(workspace.FetchBlob(n), params[n].detach().numpy(),
                                       rtol=2e-5, atol=2e-6, err_msg=f"{n} after step {step}")
    if counts_iterations:
        assert workspace.FetchBlob("optimizer_iteration")[0] == steps
    else:
        assert not workspace.HasBlob("optimizer_iteration")
    return model


def _with_torch_optim(make):
    def update(params, grads, step, state):
        if "opt" not in state:
            state["opt"] = make(list(params.values()))
        for name, p in params.items():
            p.grad = grads[name]
        state["opt"].step()
    return update


def test_build_sgd_step_policy_as_in_the_mnist_tutorial():
    def update(params, grads, step, state):
        lr = f32(0.1) * f32(0.999) ** step  # AtomicIter runs first: step k uses iter k
        for n, p in params.items():
            p -= lr * grads[n]
    model = _train(optimizer.build_sgd, update, base_learning_rate=0.1, policy="step",
                   stepsize=1, gamma=0.999)
    types = [op.type for op in model.net.Proto().op]
    assert types[-6:] == ["AtomicIter", "LearningRate"] + ["WeightedSum"] * 4
    assert workspace.HasBlob("SgdOptimizer_0_lr_cpu") or any(
        n.endswith("_lr_cpu") for n in workspace.Blobs())


def test_build_sgd_with_momentum_is_torch_sgd_nesterov():
    _train(optimizer.build_sgd,
           _with_torch_optim(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=f32(0.9),
                                                        nesterov=True)),
           base_learning_rate=0.1, momentum=0.9)


def test_build_sgd_momentum_without_nesterov():
    _train(optimizer.build_sgd,
           _with_torch_optim(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=f32(0.5))),
           base_learning_rate=0.1, momentum=0.5, nesterov=0)


def test_build_multi_precision_sgd_on_float32_params_is_sgd():
    _train(optimizer.build_multi_precision_sgd,
           _with_torch_optim(lambda ps: torch.optim.SGD(ps, lr=0.2)), base_learning_rate=0.2)


def test_build_adagrad_is_torch_adagrad():
    _train(optimizer.build_adagrad,
           _with_torch_optim(lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=f32(1e-4))),
           base_learning_rate=0.1)


def test_build_adam_uses_caffe2s_iteration_for_bias_correction():
    b1, b2, eps = f32(0.9), f32(0.999), f32(1e-8)

    def update(params, grads, step, state):
        t = step + 1  # the Adam op sees iter = step (after AtomicIter) and uses t = iter + 1
        corr = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for n, p in params.items():
            m1, m2 = state.get(n, (torch.zeros_like(p), torch.zeros_like(p)))
            m1 = b1 * m1 + (1 - b1) * grads[n]
            m2 = b2 * m2 + (1 - b2) * grads[n] ** 2
            state[n] = (m1, m2)
            p -= f32(0.01) * corr * m1 / (torch.sqrt(m2) + eps)
    _train(optimizer.build_adam, update, base_learning_rate=0.01)


def test_build_rms_prop():
    decay, eps, alpha = f32(0.9), f32(1e-5), f32(0.01)

    def update(params, grads, step, state):
        for n, p in params.items():
            ms = state.get(n, torch.zeros_like(p))
            ms = ms + (1 - decay) * (grads[n] ** 2 - ms)
            state[n] = ms
            p -= alpha * grads[n] / torch.sqrt(eps + ms)
    _train(optimizer.build_rms_prop, update, base_learning_rate=0.01)


def test_build_ftrl():
    alpha, beta, l1, l2 = f32(0.05), f32(1e-4), f32(0.001), f32(0.002)

    def update(params, grads, step, state):
        for name, p in params.items():
            n, z = state.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
            g = grads[name]
            new_n = n + g * g
            z = z + g - (torch.sqrt(new_n) - torch.sqrt(n)) / alpha * p
            state[name] = (new_n, z)
            w = (l1 * torch.sign(z) - z) / ((beta + torch.sqrt(new_n)) / alpha + l2)
            p.copy_(torch.where(z.abs() > l1, w, torch.zeros_like(w)))
    # FTRL takes alpha as an argument: no LearningRate, no iteration counter (as in Caffe2).
    _train(optimizer.build_ftrl, update, counts_iterations=False, alpha=0.05, lambda1=0.001,
           lambda2=0.002)


def test_add_weight_decay_touches_weights_only():
    wd = f32(0.01)

    def update(params, grads, step, state):
        for n, p in params.items():
            g = grads[n] + (wd * p if n.endswith("_w") else 0)
            p -= f32(0.1) * g

    def build(model, **kwargs):
        optimizer.add_weight_decay(model, 0.01)
        optimizer.build_sgd(model, 0.1)
    _train(build, update)


def test_optimizer_objects_api():
    net, init = core.Net("opt_obj"), core.Net("opt_obj_init")
    init.ConstantFill([], "w", shape=[3], value=1.0)
    sgd = optimizer.SgdOptimizer(base_learning_rate=0.5)
    sgd(net, init, "w", "w_grad")
    assert sgd.get_auxiliary_parameters().shared  # the ONE blob
    sgd.scale_learning_rate(2.0)
    assert sgd.base_learning_rate == 1.0
    workspace.RunNetOnce(init)
    workspace.FeedBlob("w_grad", np.ones(3, np.float32))
    workspace.RunNetOnce(net)
    np.testing.assert_allclose(workspace.FetchBlob("w"), [0.5, 0.5, 0.5])


def test_lr_injection_scales_the_rate():
    model = _model()
    optimizer.build_sgd(model, 0.1, allow_lr_injection=True)
    workspace.FeedBlob("data", np.ones((2, 4), np.float32))
    workspace.FeedBlob("label", np.zeros(2, np.int32))
    workspace.RunNetOnce(model.param_init_net)
    optimizer.set_lr_injection(0.0)
    before = workspace.FetchBlob("pred_w")
    workspace.RunNetOnce(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("pred_w"), before)
    assert optimizer.get_lr_injection()[0] == 0.0


def test_update_ops_follow_the_parameter_device():
    model = model_helper.ModelHelper(name="gpu_opt")
    with core.DeviceScope(core.DeviceOption(caffe2_pb2.CUDA, 0)):
        brew.fc(model, "data", "fc", dim_in=2, dim_out=2)
        model.net.AveragedLoss("fc", "loss")
    model.AddGradientOperators(["loss"])
    optimizer.build_sgd(model, 0.1)
    updates = [op for op in model.net.Proto().op if op.type == "WeightedSum"]
    assert updates and all(op.device_option.device_type == caffe2_pb2.CUDA for op in updates)
    lr = next(op for op in model.net.Proto().op if op.type == "LearningRate")
    assert lr.output[0].endswith("_lr_gpu0")
    iters = next(op for op in model.net.Proto().op if op.type == "AtomicIter")
    assert iters.device_option.device_type == caffe2_pb2.CPU
