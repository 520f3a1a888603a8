"""The tutorial's recipe on the real MNIST: 200 iterations reach the published test accuracy.

Issue: trained on the real training set with the tutorial's numbers (the notebooks' defaults: LeNet,
batch 64, 200 iterations, base_lr -0.1, step policy, stepsize 1, gamma 0.999, Xavier init,
bookkeeping ops) and tested on all 10,000 test images in 100 batches, the mean accuracy is at
least 0.945 (published runs: 0.9467 to 0.957); seeded runs are reproducible.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch.python import workspace
from mnist_tutorial import lenet
from mnist_tutorial.data import db_path, prepare_mnist
from pipeline import params

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = params.defaults()  # the notebooks' parameters cells (params/default.yaml: none)


@pytest.fixture(scope="module")
def real_mnist(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("real-mnist")
    prepare_mnist(data_dir, source="package")
    return db_path(data_dir, "train"), db_path(data_dir, "test")


def _train(real_mnist, root, iters, seed):
    """Train the tutorial's model; returns (losses, accuracies) per iteration."""
    p = DEFAULTS
    workspace.ResetWorkspace(str(root))
    train, test, _deploy = lenet.build_models(
        *real_mnist, train_batch_size=p["train_batch_size"], test_batch_size=p["test_batch_size"],
        base_lr=p["base_lr"], lr_policy=p["lr_policy"], stepsize=p["stepsize"], gamma=p["gamma"])
    torch.manual_seed(seed)
    workspace.RunNetOnce(train.param_init_net)
    workspace.CreateNet(train.net, overwrite=True)
    losses, accuracies = np.zeros(iters), np.zeros(iters)
    for i in range(iters):
        workspace.RunNet(train.net)
        losses[i] = workspace.FetchBlob("loss")
        accuracies[i] = workspace.FetchBlob("accuracy")
    return train, test, losses, accuracies


def test_tutorial_recipe_reaches_published_accuracy(real_mnist, tmp_path):
    p = DEFAULTS
    assert (p["train_batch_size"], p["train_iters"], p["base_lr"], p["lr_policy"], p["stepsize"],
            p["gamma"]) == (64, 200, -0.1, "step", 1, 0.999)
    train, test, losses, accuracies = _train(real_mnist, tmp_path, p["train_iters"], p["seed"])
    assert losses[0] > 2.0 and losses[-20:].mean() < 0.5  # it learned
    # the bookkeeping ops wrote one line per iteration
    assert len((tmp_path / "loss.log").read_text().splitlines()) == p["train_iters"]

    workspace.RunNetOnce(test.param_init_net)
    workspace.CreateNet(test.net, overwrite=True)
    test_accuracy = np.zeros(p["test_iters"])
    for i in range(p["test_iters"]):
        workspace.RunNet(test.net.Proto().name)
        test_accuracy[i] = workspace.FetchBlob("accuracy")
    assert p["test_iters"] * p["test_batch_size"] == 10000  # every test image once
    assert test_accuracy.mean() >= 0.945, f"mean test accuracy {test_accuracy.mean():.4f}"


def test_seeded_training_is_reproducible(real_mnist, tmp_path):
    *_, losses_a, acc_a = _train(real_mnist, tmp_path / "a", 15, seed=123)
    *_, losses_b, acc_b = _train(real_mnist, tmp_path / "b", 15, seed=123)
    *_, losses_c, _ = _train(real_mnist, tmp_path / "c", 15, seed=124)
    np.testing.assert_array_equal(losses_a, losses_b)
    np.testing.assert_array_equal(acc_a, acc_b)
    assert not np.array_equal(losses_a, losses_c)  # the seed does drive the initialization
