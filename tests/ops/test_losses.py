"""The losses of losses.py vs PyTorch formulas written here."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caffe2torch.python import core, workspace

from .helpers import check_op, rand


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def bce(x, t):
    return F.binary_cross_entropy_with_logits(x, t, reduction="none")


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4), (6,)])
@pytest.mark.parametrize("variant", ["plain", "log_D_trick", "unjoined_lr_loss"])
def test_sigmoid_cross_entropy_with_logits(shape, variant):
    x, t = rand(*shape) * 3, rand(*shape, seed=1, low=0, high=1)
    args = {} if variant == "plain" else {variant: 1}

    def reference(x, t):
        if variant == "plain":
            per = bce(x, t)
        elif variant == "log_D_trick":
            per = -(2 * t - 1) * torch.log(torch.sigmoid(x))
        else:
            per = (1 - t) * torch.log1p(torch.exp(x)) - x * t
        return per.mean(-1)
    check_op("SigmoidCrossEntropyWithLogits", {"X": x, "T": t}, ["Y"], args, reference,
             no_grad_inputs=("T",))


def test_weighted_sigmoid_cross_entropy_with_logits():
    x, t, w = rand(3, 4) * 2, rand(3, 4, seed=1, low=0, high=1), rand(3, 4, seed=2, low=0, high=2)
    check_op("WeightedSigmoidCrossEntropyWithLogits", {"X": x, "T": t, "W": w}, ["Y"], {},
             lambda x, t, w: (bce(x, t) * w).mean(-1), no_grad_inputs=("T", "W"))


@pytest.mark.parametrize("shape", [(3, 4), (5,)])
def test_cross_entropy(shape):
    x = rand(*shape, low=0.05, high=1.0)
    label = rand(*shape, seed=1, low=0, high=1)
    check_op("CrossEntropy", {"X": x, "L": label}, ["Y"], {},
             lambda x, lab: -(lab * x.log()).reshape(-1, shape[-1]).sum(1), no_grad_inputs=("L",))


@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_make_two_class(shape):
    check_op("MakeTwoClass", {"X": rand(*shape, low=0, high=1)}, ["Y"], {},
             lambda x: torch.stack([1 - x, x], -1))


def spatial_reference(scale, with_weight):
    def forward(x, label, weight=None):
        p = torch.softmax(x, 1)
        nll = -torch.log_softmax(x, 1).gather(1, label.long().clamp(min=0).unsqueeze(1)).squeeze(1)
        w = (label != -1).double()
        if with_weight:
            w = w * weight
        return p, scale * (nll * w).sum() / w.sum()
    return forward


@pytest.mark.parametrize("with_weight", [False, True])
def test_spatial_softmax_with_loss(with_weight):
    rng = np.random.default_rng(0)
    label = rng.integers(-1, 4, (2, 3, 5)).astype(np.int32)
    inputs = {"X": rand(2, 4, 3, 5) * 2, "label": label}
    if with_weight:
        inputs["weight"] = rand(2, 3, 5, seed=3, low=0.1, high=2)
    check_op("SpatialSoftmaxWithLoss", inputs, ["P", "loss"], {},
             spatial_reference(1.0, with_weight), grad_outputs=["loss"],
             no_grad_inputs=("weight",))


def test_spatial_softmax_with_loss_scale_multiplies_the_gradient_only():
    """Caffe2's forward ignores ``scale``; its gradient op applies it."""
    workspace.FeedBlob("X", rand(1, 3, 2, 2))
    workspace.FeedBlob("label", np.array([[[0, 1], [2, -1]]], np.int32))
    results = []
    for scale in (1.0, 0.25):
        net = core.Net(f"scaled_{scale}")
        net.SpatialSoftmaxWithLoss(["X", "label"], ["P", "loss"], scale=scale)
        net.AddGradientOperators(["loss"])
        workspace.RunNetOnce(net)
        results.append((workspace.FetchBlob("loss"), workspace.FetchBlob("X_grad")))
    (loss, dx), (scaled_loss, scaled_dx) = results
    assert loss == scaled_loss and np.abs(dx).max() > 0
    np.testing.assert_allclose(scaled_dx, 0.25 * dx, rtol=1e-12)


@pytest.mark.parametrize("beta, scale", [(1.0, 1.0), (0.11, 2.0)])
def test_smooth_l1_loss(beta, scale):
    inputs = {"Y_hat": rand(4, 8), "Y": rand(4, 8, seed=1), "alpha_in": rand(4, 8, seed=2, low=0,
                                                                              high=2),
              "alpha_out": rand(4, 8, seed=3, low=0, high=1)}

    def reference(y_hat, y, a_in, a_out):
        d = a_in * (y_hat - y)
        per = F.smooth_l1_loss(d, torch.zeros_like(d), reduction="none", beta=beta)
        return scale * (a_out * per).sum() / y_hat.shape[0]
    check_op("SmoothL1Loss", inputs, ["loss"], dict(beta=beta, scale=scale), reference,
             no_grad_inputs=("Y", "alpha_in", "alpha_out"))


@pytest.mark.parametrize("normalize, scale", [(1, 1.0), (0, 0.5)])
def test_sigmoid_cross_entropy_loss(normalize, scale):
    targets = np.random.default_rng(1).integers(-1, 2, (3, 6)).astype(np.int32)
    x = rand(3, 6) * 3

    def reference(x, t):
        care = (t != -1).double()
        per = bce(x, t.clamp(min=0).double()) * care
        return scale * per.sum() / (care.sum() if normalize else 1.0)
    check_op("SigmoidCrossEntropyLoss", {"X": x, "T": targets}, ["loss"],
             dict(normalize=normalize, scale=scale), reference)


def focal_inputs(num_classes, highest_label):
    """Logits for 2 anchors of ``num_classes``; labels −1 (ignored) .. highest_label."""
    rng = np.random.default_rng(9)
    n, a, h, w = 2, 2, 3, 2
    return {"X": rand(n, a * num_classes, h, w) * 2,
            "T": rng.integers(-1, highest_label + 1, (n, a, h, w)).astype(np.int32),
            "fg": np.array([3.0])}


@pytest.mark.parametrize("gamma, alpha", [(2.0, 0.25), (1.0, 0.5)])
def test_sigmoid_focal_loss(gamma, alpha):
    inputs = focal_inputs(3, 3)  # sigmoid: classes 1..3, 0 background

    def reference(x, t, fg):
        n, d, h, w = x.shape
        x5 = x.reshape(n, 2, 3, h, w)
        p = torch.sigmoid(x5)
        t5 = t.long().unsqueeze(2)
        cls = torch.arange(1, 4).reshape(1, 1, 3, 1, 1)
        pos, neg = (t5 == cls).double(), ((t5 != -1) & (t5 != cls)).double()
        loss = -pos * alpha * (1 - p) ** gamma * torch.log(p) \
            - neg * (1 - alpha) * p ** gamma * torch.log(1 - p)
        return 0.5 * loss.sum() / fg.max().clamp(min=1)
    check_op("SigmoidFocalLoss", inputs, ["loss"],
             dict(num_classes=3, gamma=gamma, alpha=alpha, scale=0.5), reference,
             no_grad_inputs=("fg",))


def test_softmax_focal_loss():
    inputs = focal_inputs(3, 2)  # softmax: classes 0..2, 0 background

    def reference(x, t, fg):
        n, d, h, w = x.shape
        p = torch.softmax(x.reshape(n, 2, 3, h, w), 2)
        t = t.long()
        p_t = p.gather(2, t.clamp(min=0).unsqueeze(2)).squeeze(2)
        z = torch.where(t == 0, 0.75, 0.25) * (t >= 0) / fg.max().clamp(min=1)
        return (-(1 - p_t) ** 2 * torch.log(p_t) * z).sum(), p.reshape(x.shape)
    check_op("SoftmaxFocalLoss", inputs, ["loss", "P"], dict(num_classes=3, gamma=2.0),
             reference, no_grad_inputs=("fg",))


@pytest.mark.parametrize("beta, count", [(1.0, 3.0), (0.11, 0.0)])
def test_select_smooth_l1_loss(beta, count):
    locations = np.array([[0, 0, 1, 2], [1, 4, 0, 0], [1, 0, 2, 1]], np.float32)
    inputs = {"Y_hat": rand(2, 8, 3, 3), "Y": rand(3, 4, seed=1), "L": locations,
              "S": np.array([count], np.float32)}

    def reference(y_hat, y, loc, s):
        total = 0.0
        for i, (n, c, yy, xx) in enumerate(loc.long().tolist()):
            d = (y_hat[n, c:c + 4, yy, xx] - y[i]).abs()
            total = total + torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).sum()
        return 2.0 * total / max(float(s.detach()[0]), 1.0)
    check_op("SelectSmoothL1Loss", inputs, ["loss"], dict(beta=beta, scale=2.0), reference,
             no_grad_inputs=("Y", "L", "S"))
