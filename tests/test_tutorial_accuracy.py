"""The tutorial's recipe on the real MNIST, through the notebooks: the published test accuracy.

Issue: trained on the real training set with the tutorial's numbers (the notebooks' defaults: LeNet,
batch 64, 200 iterations, base_lr -0.1, step policy, stepsize 1, gamma 0.999, Xavier init,
bookkeeping ops) and tested on all 10,000 test images in 100 batches, the mean accuracy is at
least 0.945 (published runs: 0.9467 to 0.957). The databases come from the offline package, as
in `make run`, and again from a zip shaped like the tutorial's mnist-lmdb.zip.
"""
import json
import zipfile
from pathlib import Path

import pytest
from tutorial import run_notebook

from mnist_tutorial.data import DataError, prepare_databases
from pipeline import params

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = params.defaults()  # the notebooks' parameters cells (params/default.yaml: none)
BUILD = ("device", "train_batch_size", "test_batch_size", "base_lr", "lr_policy", "stepsize",
         "gamma")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    p = DEFAULTS
    assert (p["train_batch_size"], p["train_iters"], p["base_lr"], p["lr_policy"], p["stepsize"],
            p["gamma"]) == (64, 200, -0.1, "step", 1, 0.999)
    assert p["test_iters"] * p["test_batch_size"] == 10000  # every test image once
    run_dir, data_dir = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("data")
    run_notebook("01_download", run_dir, data_dir=str(data_dir), data_source="package")
    run_notebook("02_build", run_dir, **{k: p[k] for k in BUILD} | {"device": "cpu"})
    run_notebook("03_train", run_dir, seed=p["seed"], train_iters=p["train_iters"])
    # the notebook's own check fails the run below the threshold
    run_notebook("04_test", run_dir, test_iters=p["test_iters"],
                 min_test_accuracy=p["min_test_accuracy"])
    return run_dir, data_dir


def test_the_tutorial_recipe_reaches_the_published_accuracy(default_run):
    run_dir, _ = default_run
    ws = run_dir / "workspace"
    metrics = json.loads((ws / "metrics_test.json").read_text())
    assert metrics["test_images"] == 10000
    assert metrics["test_accuracy"] >= 0.945, metrics
    train = json.loads((ws / "metrics_train.json").read_text())
    assert train["train_iters"] == 200 and train["train_loss_last10"] < 0.5  # it learned
    assert len((ws / "loss.log").read_text().splitlines()) == 200


def test_the_download_built_the_full_databases_from_the_package(default_run, tmp_path):
    run_dir, data_dir = default_run
    info = json.loads((run_dir / "workspace" / "data.json").read_text())
    assert (info["train_records"], info["test_records"]) == (60000, 10000)
    assert Path(info["train_db"]) == data_dir / "mnist-train-nchw-lmdb"
    assert info["source"] == "package"

    # a user's copy of the tutorial's mnist-lmdb.zip, given as data_url (here: a local path)
    archive = tmp_path / "mnist-lmdb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for db in ("mnist-train-nchw-lmdb", "mnist-test-nchw-lmdb"):
            zf.write(data_dir / db / "data.mdb", f"{db}/data.mdb")
    info = prepare_databases(tmp_path / "from-zip", source="caffe2-zip", url=str(archive))
    assert (info["train_records"], info["test_records"]) == (60000, 10000)
    with pytest.raises(DataError, match="data_url is used with data_source caffe2-zip"):
        prepare_databases(tmp_path / "x", source="package", url=str(archive))

