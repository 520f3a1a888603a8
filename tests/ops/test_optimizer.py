"""Optimizer ops against torch references of Caffe2's update formulas (and torch.optim where they
coincide): LearningRate policies, MomentumSGD(Update), Adam, Adagrad, RmsProp, Ftrl, the sparse
forms, ScatterWeightedSum, ScatterAssign."""
import math

import numpy as np
import pytest
import torch

from caffe2torch.python import core, workspace

from .helpers import DEVICES, check_op, rand

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def f32(x):
    """An argument as the op sees it: Argument.f is a float32."""
    return float(np.float32(x))


def lr_of(it, **args):
    workspace.FeedBlob("iter", np.array([it], dtype=np.int64))
    workspace.RunOperatorOnce(core.CreateOperator("LearningRate", ["iter"], ["lr"], **args))
    return float(workspace.FetchBlob("lr"))


# --- LearningRate policies ----------------------------------------------------------------------

def _cosine(it, lo=0.1, hi=0.5, period=50, t_mult=1.0, shrink=0.99):
    if t_mult != 1.0:
        i = math.floor(math.log(1 - it / period * (1 - t_mult)) / math.log(t_mult))
        t_i = t_mult ** i * period
        t_cur = it - (1 - t_mult ** i) / (1 - t_mult) * period
    else:
        i, t_i = it // period, period
        t_cur = it - t_i * i
    s = shrink ** i
    return lo * s + 0.5 * (hi * s - lo * s) * (1 + math.cos(math.pi * t_cur / t_i))


POLICIES = {
    "gate": (dict(multiplier_1=2.0, multiplier_2=0.5, num_iter=5),
             lambda it: 0.5 if it >= 5 else 2.0),
    "pieceWarmup": (dict(m1=0.1, n1=3, m2=0.5, n2=6, m3=1.0),
                    lambda it: 0.1 if it < 3 else (0.5 if it < 6 else 1.0)),
    "alter": (dict(active_period=3, inactive_period=2),
              lambda it: 1.0 if it % 5 < 3 else 0.0),
    "hill": (dict(num_iter=4, start_multiplier=0.25, gamma=0.5, power=1.0, end_multiplier=0.3),
             lambda it: 0.25 + 0.75 * it / 4 if it < 4 else max(0.3, (1 + 0.5 * (it - 4)) ** -1)),
    "cosine": (dict(min_lr=0.1, max_lr=0.5, period=7), lambda it: _cosine(it, period=7)),
    "cosine_t_mult": (dict(policy="cosine", min_lr=0.1, max_lr=0.5, period=4, t_mult=2.0,
                           lr_shrink=0.9),
                      lambda it: _cosine(it, period=4, t_mult=2.0, shrink=0.9)),
    "constantThenLinearWarmup": (
        dict(start_warmup_multiplier=0.2, constant_warmup_num_iter=3, linear_warmup_num_iter=4),
        lambda it: 0.2 if it < 3 else (0.2 + 0.8 * (it - 3) / 4 if it < 7 else 1.0)),
    "compositeCosine": (
        dict(start_warmup_multiplier=0.2, constant_warmup_num_iter=2, linear_warmup_num_iter=2,
             cosine_min_lr=0.1, cosine_max_lr=0.5, cosine_period=5),
        lambda it: (0.2 if it < 2 else 0.2 + 0.8 * (it - 2) / 2) if it < 4
        else _cosine(it - 4, period=5)),
    "cyclical": (dict(max_lr=0.4, stepsize=3),
                 lambda it: 1 + (0.4 / 0.1 - 1) * max(0.0,
                                                      1 - abs(it / 3 - 2 * (it // 6 + 1) + 1))),
    "composite": (
        dict(sub_policy_num_iters=[3, 4], sub_policy_0_policy="exp", sub_policy_0_gamma=0.5,
             sub_policy_0_lr_scale=2.0, sub_policy_1_policy="step", sub_policy_1_stepsize=2,
             sub_policy_1_gamma=0.5),
        # the first sub-policy covers iterations 1..3, the next 4..7, each seeing the global iter
        lambda it: 2.0 * 0.5 ** it if it <= 3 else 0.5 ** (it // 2)),
}


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("it", [1, 3, 4, 6, 9, 13])
def test_learning_rate_policies(name, it):
    args, f = POLICIES[name]
    args = {"policy": name, **args}
    got = lr_of(it, base_lr=0.1, **args)
    assert got == pytest.approx(0.1 * f(it), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("args, match", [
    (dict(policy="composite"), "sub_policy_num_iters"),
    (dict(policy="composite", sub_policy_num_iters=[2], sub_policy_0_policy="composite"),
     "cannot be a sub-policy"),
    (dict(policy="alter"), "active_period"),
    (dict(policy="slope"), "unknown policy 'slope'"),
])
def test_learning_rate_policy_errors(args, match):
    with pytest.raises(Exception, match=match):
        lr_of(1, base_lr=0.1, **args)


# --- MomentumSGD --------------------------------------------------------------------------------

def _momentum_ref(g, m, lr, mu, nesterov):
    lr = lr.reshape(())
    if not nesterov:
        adj = lr * g + mu * m
        return adj, adj
    new_m = mu * m + lr * g
    return (1 + mu) * new_m - mu * m, new_m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [0, 1])
@pytest.mark.parametrize("shape", [(5,), (3, 4)])
def test_momentum_sgd_and_update(device, nesterov, shape):
    g, m, p = rand(*shape, seed=1), rand(*shape, seed=2), rand(*shape, seed=3)
    lr = np.array([0.1])
    args = dict(momentum=0.9, nesterov=nesterov)
    check_op("MomentumSGD", {"g": g, "m": m, "lr": lr}, ["g_out", "m_out"], args,
             lambda g, m, lr: _momentum_ref(g, m, lr, f32(0.9), nesterov), grad=False,
             device=device)
    check_op("MomentumSGDUpdate", {"g": g, "m": m, "lr": lr, "p": p}, ["g_out", "m_out", "p_out"],
             args, lambda g, m, lr, p: (*_momentum_ref(g, m, lr, f32(0.9), nesterov),
                                        p - _momentum_ref(g, m, lr, f32(0.9), nesterov)[0]),
             grad=False, device=device)


@pytest.mark.parametrize("nesterov", [0, 1])
def test_momentum_sgd_update_matches_torch_optim_sgd(nesterov):
    """Caffe2's momentum (m = μm + lr·g; w -= m) is torch.optim.SGD's for a constant lr."""
    p0 = rand(6, seed=4)
    ref = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.SGD([ref], lr=0.05, momentum=f32(0.8), nesterov=bool(nesterov))
    workspace.FeedBlob("p", p0)
    workspace.FeedBlob("m", np.zeros(6))
    workspace.FeedBlob("lr", np.array([0.05]))
    op = core.CreateOperator("MomentumSGDUpdate", ["g", "m", "lr", "p"], ["g", "m", "p"],
                             momentum=0.8, nesterov=nesterov)
    for step in range(4):
        g = rand(6, seed=10 + step)
        workspace.FeedBlob("g", g)
        workspace.RunOperatorOnce(op)
        ref.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(workspace.FetchBlob("p"), ref.detach().numpy(), rtol=1e-12)


def test_sparse_momentum_sgd_update():
    p, m = rand(5, 3, seed=1), rand(5, 3, seed=2)
    g, idx = rand(2, 3, seed=3), np.array([4, 1], dtype=np.int64)
    lr = np.array([0.1])

    def ref(g, m, lr, p, idx):
        m, p = m.clone(), p.clone()
        adj, new_m = _momentum_ref(g, m[idx], lr, 0.5, 0)
        m[idx] = new_m
        p[idx] = p[idx] - adj
        return adj, m, p
    check_op("SparseMomentumSGDUpdate", {"g": g, "m": m, "lr": lr, "p": p, "idx": idx},
             ["g_out", "m_out", "p_out"], dict(momentum=0.5), ref, grad=False)


# --- Adam ---------------------------------------------------------------------------------------

def _adam_ref(p, m1, m2, g, lr, it, b1=0.9, b2=0.999, eps=1e-5):
    b1, b2, eps = f32(b1), f32(b2), f32(eps)
    t = float(it.reshape(())) + 1
    corr = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    m1 = m1 * b1 + g * (1 - b1)
    m2 = m2 * b2 + g * g * (1 - b2)
    step = corr * m1 / (torch.sqrt(m2) + eps)
    return p + lr.reshape(()) * step, m1, m2, step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("it, args", [(0, {}), (5, dict(beta1=0.8, beta2=0.99, epsilon=1e-8))])
@pytest.mark.parametrize("outputs", [3, 4])
def test_adam(device, it, args, outputs):
    ins = {"p": rand(3, 4, seed=1), "m1": rand(3, 4, seed=2), "m2": rand(3, 4, seed=3, low=0),
           "g": rand(3, 4, seed=4), "lr": np.array([-0.01]), "iter": np.array([it], np.int64)}
    names = ["p_out", "m1_out", "m2_out", "step"][:outputs]
    b = dict(b1=args.get("beta1", 0.9), b2=args.get("beta2", 0.999), eps=args.get("epsilon", 1e-5))
    check_op("Adam", ins, names, args, lambda *x: _adam_ref(*x, **b)[:outputs], grad=False,
             device=device)


def test_sparse_adam_updates_only_indexed_rows():
    ins = {"p": rand(4, 2, seed=1), "m1": rand(4, 2, seed=2), "m2": rand(4, 2, seed=3, low=0),
           "idx": np.array([2, 0], np.int64), "g": rand(2, 2, seed=4),
           "lr": np.array([-0.01]), "iter": np.array([3], np.int64)}

    def ref(p, m1, m2, idx, g, lr, it):
        p, m1, m2 = p.clone(), m1.clone(), m2.clone()
        np_, a, b, _ = _adam_ref(p[idx], m1[idx], m2[idx], g, lr, it)
        p[idx], m1[idx], m2[idx] = np_, a, b
        return p, m1, m2
    check_op("SparseAdam", ins, ["p_out", "m1_out", "m2_out"], {}, ref, grad=False)


# --- Adagrad ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args", [{}, dict(epsilon=1e-3, decay=0.9)])
def test_adagrad(device, args):
    eps, decay = f32(args.get("epsilon", 1e-5)), f32(args.get("decay", 1.0))

    def ref(p, h, g, lr):
        h = decay * h + g * g
        return p + lr.reshape(()) * g / (torch.sqrt(h) + eps), h
    check_op("Adagrad", {"p": rand(6, seed=1), "h": rand(6, seed=2, low=0), "g": rand(6, seed=3),
                         "lr": np.array([-0.1])}, ["p_out", "h_out"], args, ref, grad=False,
             device=device)


def test_adagrad_matches_torch_optim_adagrad():
    p0 = rand(5, seed=7)
    ref = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.Adagrad([ref], lr=0.1, eps=f32(1e-5))
    workspace.FeedBlob("p", p0)
    workspace.FeedBlob("h", np.zeros(5))
    workspace.FeedBlob("lr", np.array([-0.1]))
    op = core.CreateOperator("Adagrad", ["p", "h", "g", "lr"], ["p", "h"], epsilon=1e-5)
    for step in range(3):
        g = rand(5, seed=20 + step)
        workspace.FeedBlob("g", g)
        workspace.RunOperatorOnce(op)
        ref.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(workspace.FetchBlob("p"), ref.detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("idx", [[3, 0], [1, 1]], ids=["unique", "repeated"])
def test_sparse_adagrad(idx):
    idx = np.array(idx, np.int64)

    def ref(p, h, idx, g, lr):
        p, h = p.clone(), h.clone()
        for i, row in enumerate(idx.tolist()):  # one index after the other, as Caffe2's loop
            h[row] = h[row] + g[i] * g[i]
            p[row] = p[row] + lr.reshape(()) * g[i] / (torch.sqrt(h[row]) + f32(1e-5))
        return p, h
    check_op("SparseAdagrad", {"p": rand(4, 3, seed=1), "h": rand(4, 3, seed=2, low=0),
                               "idx": idx, "g": rand(2, 3, seed=3), "lr": np.array([-0.1])},
             ["p_out", "h_out"], {}, ref, grad=False)


# --- RmsProp ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args", [{}, dict(decay=0.5, momentum=0.7, epsilon=1e-3)])
def test_rms_prop(device, args):
    decay, mu = f32(args.get("decay", 0.9)), f32(args.get("momentum", 0.0))
    eps = f32(args.get("epsilon", 1e-5))

    def ref(g, ms, mom, lr):
        ms = ms + (1 - decay) * (g * g - ms)
        mom = mom * mu + lr.reshape(()) * g / torch.sqrt(eps + ms)
        return mom, ms, mom
    check_op("RmsProp", {"g": rand(2, 3, seed=1), "ms": rand(2, 3, seed=2, low=0),
                         "mom": rand(2, 3, seed=3), "lr": np.array([1.0])},
             ["g_out", "ms_out", "mom_out"], args, ref, grad=False, device=device)


# --- Ftrl ---------------------------------------------------------------------------------------

def _ftrl_ref(w, n, z, g, alpha=0.005, beta=1.0, l1=0.001, l2=0.001):
    alpha, beta, l1, l2 = f32(alpha), f32(beta), f32(l1), f32(l2)
    new_n = n + g * g
    sigma = (torch.sqrt(new_n) - torch.sqrt(n)) / alpha
    new_z = z + g - sigma * w
    new_w = (l1 * torch.sign(new_z) - new_z) / ((beta + torch.sqrt(new_n)) / alpha + l2)
    return torch.where(new_z.abs() > l1, new_w, torch.zeros_like(new_w)), new_n, new_z


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("args, alpha_input", [({}, False), (dict(alpha=0.1, lambda1=0.5), False),
                                               ({}, True)])
def test_ftrl(device, args, alpha_input):
    w, g = rand(3, 2, seed=1), rand(3, 2, seed=2)
    nz = np.stack([rand(3, 2, seed=3, low=0), rand(3, 2, seed=4)], axis=-1)
    ins = {"w": w, "nz": nz, "g": g}
    alpha = args.get("alpha", 0.005)
    if alpha_input:
        ins["alpha"] = np.array([0.2])
        alpha = 0.2

    def ref(w, nz, g, *_):
        nw, nn, nzz = _ftrl_ref(w, nz[..., 0], nz[..., 1], g, alpha=alpha,
                                l1=args.get("lambda1", 0.001))
        return nw, torch.stack([nn, nzz], dim=-1)
    check_op("Ftrl", ins, ["w_out", "nz_out"], args, ref, grad=False, device=device)


def test_sparse_ftrl():
    w = rand(4, 2, seed=1)
    nz = np.stack([rand(4, 2, seed=3, low=0), rand(4, 2, seed=4)], axis=-1)
    idx, g = np.array([2, 0], np.int64), rand(2, 2, seed=2)

    def ref(w, nz, idx, g):
        w, nz = w.clone(), nz.clone()
        nw, nn, nzz = _ftrl_ref(w[idx], nz[idx][..., 0], nz[idx][..., 1], g)
        w[idx] = nw
        nz[idx] = torch.stack([nn, nzz], dim=-1)
        return w, nz
    check_op("SparseFtrl", {"w": w, "nz": nz, "idx": idx, "g": g}, ["w_out", "nz_out"], {}, ref,
             grad=False)


def test_ftrl_rejects_a_wrong_n_z():
    workspace.FeedBlob("w", rand(3))
    workspace.FeedBlob("nz", rand(3))
    workspace.FeedBlob("g", rand(3))
    with pytest.raises(RuntimeError, match="extra_shape"):
        workspace.RunOperatorOnce(core.CreateOperator("Ftrl", ["w", "nz", "g"], ["w", "nz"]))


# --- ScatterWeightedSum, ScatterAssign ----------------------------------------------------------

@pytest.mark.parametrize("idx", [[3, 0], [2, 2]], ids=["unique", "repeated"])
@pytest.mark.parametrize("w0", [1.0, 0.5])
def test_scatter_weighted_sum(idx, w0):
    x0, x1, x2 = rand(4, 3, seed=1), rand(2, 3, seed=2), rand(2, 3, seed=3)
    workspace.FeedBlob("x0", x0)
    for name, value in [("w0", [w0]), ("x1", x1), ("w1", [2.0]), ("x2", x2), ("w2", [-1.0]),
                        ("idx", np.array(idx, np.int64))]:
        workspace.FeedBlob(name, np.asarray(value, dtype=np.float64 if name != "idx" else None))
    workspace.RunOperatorOnce(core.CreateOperator(
        "ScatterWeightedSum", ["x0", "w0", "idx", "x1", "w1", "x2", "w2"], ["x0"]))
    expected = x0.copy()
    for i, row in enumerate(idx):
        expected[row] = w0 * expected[row] + 2.0 * x1[i] - x2[i]
    np.testing.assert_allclose(workspace.FetchBlob("x0"), expected, rtol=1e-12)


def test_scatter_weighted_sum_must_be_in_place():
    for name, value in [("x0", rand(2)), ("w0", [1.0]), ("idx", np.array([0])), ("x1", rand(1)),
                        ("w1", [1.0])]:
        workspace.FeedBlob(name, np.asarray(value))
    with pytest.raises(ValueError, match="in place"):
        workspace.CreateNet(_net("ScatterWeightedSum", ["x0", "w0", "idx", "x1", "w1"], ["y"]))


def _net(op_type, inputs, outputs, **args):
    net = core.Net(f"{op_type}_net")
    getattr(net, op_type)(inputs, outputs, **args)
    return net


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_assign_last_slice_wins(device):
    option = core.DeviceOption(1 if device == "cuda" else 0, 0)
    data = rand(4, 2, seed=1)
    slices = rand(3, 2, seed=2)
    workspace.FeedBlob("data", data, device_option=option)
    workspace.FeedBlob("idx", np.array([1, 3, 1], np.int64), device_option=option)
    workspace.FeedBlob("slices", slices, device_option=option)
    workspace.RunOperatorOnce(core.CreateOperator(
        "ScatterAssign", ["data", "idx", "slices"], ["data"], device_option=option))
    expected = data.copy()
    expected[3], expected[1] = slices[1], slices[2]
    np.testing.assert_array_equal(workspace.FetchBlob("data"), expected)


# --- WeightedSum grad_on_w ----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_weighted_sum_grad_on_w_gives_weight_gradients(device):
    inputs = {"X0": rand(3, 4), "w0": np.array([0.5]), "X1": rand(3, 4, seed=1),
              "w1": np.array([-2.0])}
    grads = check_op("WeightedSum", inputs, ["Y"], {"grad_on_w": 1},
                     lambda x0, w0, x1, w1: x0 * w0 + x1 * w1, device=device)
    assert {"X0", "w0", "X1", "w1"} <= set(grads)
