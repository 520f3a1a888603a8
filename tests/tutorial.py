"""Helpers for the tests that run the tutorial's notebooks: small real MNIST and papermill runs."""
from pathlib import Path

import nbformat
import papermill

from caffe2torch.binaries.make_mnist_db import write_mnist_db
from mnist_tutorial.data import _package_pickle, db_path, load_mnist_pickle

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "caffe2torch"
PARAMS = ["conv1_w", "conv1_b", "conv2_w", "conv2_b", "fc3_w", "fc3_b", "pred_w", "pred_b"]
NET_FILES = ("train_net", "train_init_net", "test_net", "test_init_net", "deploy_net")


def write_small_mnist(data_dir, train=640, test=500):
    """Real MNIST images, the first ``train``/``test`` of each split, as the tutorial's LMDBs."""
    arrays = load_mnist_pickle(_package_pickle()[0])
    for split, n in (("train", train), ("test", test)):
        images, labels = arrays[split]
        write_mnist_db(images[:n], labels[:n], str(db_path(data_dir, split)), "lmdb",
                       channel_first=True)
    return db_path(data_dir, "train"), db_path(data_dir, "test")


def run_notebook(name, run_dir, output=None, **parameters):
    """Execute notebooks/<name>.ipynb with papermill on ``run_dir``; returns the executed notebook.

    Raises papermill.PapermillExecutionError when a cell fails.
    """
    output = Path(output or Path(run_dir) / f"{name}.ipynb")
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(output), parameters={"run_dir": str(run_dir),
                                                                    **parameters},
        kernel_name=KERNEL, progress_bar=False, cwd=str(output.parent))
    return nbformat.read(str(output), as_version=4)


def cell_texts(notebook):
    """What each code cell printed (streams and text/plain), joined per cell."""
    return ["".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                    for o in cell.outputs)
            for cell in notebook.cells if cell.cell_type == "code"]
