"""The pipeline's steps (download, build, train, test, export) as importable functions.

Each notebook calls the functions of its step cell by cell, in the order of the tutorial's cells;
``<name>_step(run_dir, ...)`` runs the same calls in one go (tests and the benchmark use it). A step
reads what earlier steps left in ``<run_dir>/workspace`` and writes its own files there, in
Caffe2's formats: NetDefs as ``.pb`` and ``.pbtxt``, parameters and batches as minidb (Save op).

Relative paths (``run_dir``, ``data_dir``) are taken from the repository root, so the notebooks'
default parameters work from Jupyter's ``notebooks/`` folder as well as from the runner.
"""
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, net_drawer, workspace
from mnist_tutorial import lenet

REPO_ROOT = Path(__file__).resolve().parents[1]
NET_FILES = ("train_net", "train_init_net", "test_net", "test_init_net", "deploy_net")
PARAMS_DB = "mnist_params.minidb"  # the trained parameters, written by the Save op
LAST_BATCH_DB = "test_last_batch.minidb"  # the last test batch: data and label
MODEL_DB = "mnist_model.minidb"  # the predictor (predictor_exporter.save_to_db)
SHOWN_IMAGES = (1, 2, 10)  # the tutorial's images 1, 2 and 10 of the last batch (1-based)


class StepError(RuntimeError):
    """A step cannot go on; the message says what is missing or wrong and what to do."""


# --- paths, devices, seeds, files --------------------------------------------------------------

def resolve(path):
    """``path`` as an absolute Path; a relative one is taken from the repository root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def workspace_dir(run_dir):
    """The folder that holds a run's artifacts: ``<run_dir>/workspace``."""
    return resolve(run_dir) / "workspace"


def start_workspace(run_dir):
    """Reset caffe2torch's workspace with ``<run_dir>/workspace`` as its root (created)."""
    root = workspace_dir(run_dir)
    workspace.ResetWorkspace(str(root))
    return root


def __getattr__(name):
    # torch loads on first use, so that the download step's kernel starts without it
    if name == "torch":
        import torch
        return torch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def resolve_device(device):
    """"auto" → "cuda" when PyTorch sees a GPU, else "cpu"; "cuda" without a GPU is an error."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StepError("device=cuda but PyTorch sees no GPU (torch.cuda.is_available() is False); "
                        "use device=cpu or device=auto, or run on a GPU machine")
    if device not in ("cpu", "cuda"):
        raise StepError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


def device_option(device):
    """The DeviceOption to build under: CUDA GPU 0 for "cuda", None (Caffe2's CPU) for "cpu"."""
    return core.DeviceOption(caffe2_pb2.CUDA, 0) if device == "cuda" else None


def seed_everything(seed):
    """Seed Python, numpy and torch (CPU and CUDA) so that a run is reproducible."""
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_atomic(path, data):
    """Write bytes or text to ``path`` through a temporary file beside it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj):
    """Write ``obj`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, made_by):
    """Read a handover JSON file; a missing one names the step that writes it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StepError(f"{path} is missing: run the {made_by} step first") from None


def load_net(run_dir, name):
    """The NetDef ``<run_dir>/workspace/<name>.pb`` written by the build step."""
    path = workspace_dir(run_dir) / f"{name}.pb"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StepError(f"{path} is missing: run the build step first") from None
    netdef = caffe2_pb2.NetDef()
    netdef.ParseFromString(data)
    return netdef


def net_device_option(netdef):
    """The DeviceOption the build step gave the net's ops (None: CPU)."""
    for op in netdef.op:
        if op.HasField("device_option") and op.device_option.device_type != caffe2_pb2.CPU:
            return op.device_option
    return None


def trained_params(netdef):
    """The blobs the SGD update writes (the first input of each WeightedSum), in order."""
    return [op.input[0] for op in netdef.op if op.type == "WeightedSum"]


def save_blobs(blobs, path, option=None):
    """Write ``blobs`` of the current workspace to a minidb at ``path`` with the Save op."""
    workspace.RunOperatorOnce(core.CreateOperator(
        "Save", list(blobs), [], db=str(path), db_type="minidb", absolute_path=1,
        device_option=option))


def load_blobs(blobs, path, made_by, option=None):
    """Read ``blobs`` from the minidb at ``path`` into the workspace with the Load op."""
    if not Path(path).exists():
        raise StepError(f"{path} is missing: run the {made_by} step first")
    workspace.RunOperatorOnce(core.CreateOperator(
        "Load", [], list(blobs), db=str(path), db_type="minidb", absolute_path=1,
        device_option=option))


def _in_jupyter():
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def show_png(path):
    """Display a PNG inline when running in Jupyter; in plain Python the file is enough."""
    if _in_jupyter():
        from IPython.display import display
        # the text/plain part is what a log of the run (papermill's log_output) shows
        display({"image/png": Path(path).read_bytes(), "text/plain": f"[figure {Path(path).name}]"},
                raw=True)


def _pyplot():
    import matplotlib
    if not _in_jupyter():
        matplotlib.use("Agg")  # plain Python, maybe without a display: draw into files only
    from matplotlib import pyplot
    return pyplot


def save_figure(fig, path):
    """Save a matplotlib figure as PNG, close it and show the file inline in Jupyter."""
    fig.savefig(path, dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    show_png(path)
    return path


# --- 01 download: tutorial cells 1-2 -----------------------------------------------------------

def data_info(train_db, test_db, db_type, source):
    """The handover record of the databases: paths, type, record counts and source."""
    from mnist_tutorial.data import scan_db
    info = {"db_type": db_type, "source": source}
    for split, path in (("train", train_db), ("test", test_db)):
        info[f"{split}_db"] = str(path)
        info[f"{split}_records"] = scan_db(path, db_type)["records"]
    return info


def download_step(run_dir, data_dir="data", data_source="auto", data_url=""):
    """Prepare the MNIST LMDBs in ``data_dir`` and record where they are in ``data.json``."""
    from mnist_tutorial.data import db_path, prepare_mnist
    root = start_workspace(run_dir)
    data_dir = resolve(data_dir)
    train_db, test_db = db_path(data_dir, "train"), db_path(data_dir, "test")
    if data_url and data_source in ("package", "existing"):
        raise StepError(f"data_url is used with data_source caffe2-zip, idx or auto, not "
                        f"{data_source}; drop data_url or change data_source")
    if data_source == "existing":
        # databases put there by hand (e.g. a mounted volume): use them as they are, any size
        for path in (train_db, test_db):
            if not path.is_dir():
                raise StepError(f"data_source=existing but {path} does not exist; prepare the "
                                "databases or use data_source=auto")
    else:
        prepare_mnist(data_dir, source=data_source, url=data_url or None)
    info = data_info(train_db, test_db, "lmdb", data_source)
    write_json(root / "data.json", info)
    print(f"workspace root: {root}")
    print(f"training data: {train_db} ({info['train_records']:,} records)")
    print(f"test data:     {test_db} ({info['test_records']:,} records)")
    return info


# --- 02 build: tutorial cells 3-12 -------------------------------------------------------------

def build_models(run_dir, device="auto", seed=0, train_batch_size=64, test_batch_size=100,
                 base_lr=-0.1, lr_policy="step", stepsize=1, gamma=0.999, power=0.75):
    """Build the train, test and deploy models on the databases of ``data.json`` (cells 3-8)."""
    start_workspace(run_dir)
    info = read_json(workspace_dir(run_dir) / "data.json", "download")
    seed_everything(seed)
    device = resolve_device(device)
    models = lenet.build_models(
        info["train_db"], info["test_db"], db_type=info["db_type"],
        train_batch_size=train_batch_size, test_batch_size=test_batch_size, base_lr=base_lr,
        lr_policy=lr_policy, stepsize=stepsize, gamma=gamma, power=power,
        device_option=device_option(device))
    for model in models:
        print(f"{model.net.Name()}: {len(model.net.Proto().op)} ops, "
              f"{len(model.param_init_net.Proto().op)} init ops, params "
              f"{[str(p) for p in model.params]}")
    print(f"device: {device}")
    return models


def draw_nets(run_dir, train_model):
    """Draw the train net in full and its minimal op graph as PNGs (cells 9-10)."""
    root = workspace_dir(run_dir)
    graph = net_drawer.GetPydotGraph(train_model.net.Proto().op, "mnist", rankdir="LR")
    full = root / "train_net_graph.png"
    write_atomic(full, net_drawer.render(graph, fmt="png"))
    show_png(full)
    graph = net_drawer.GetPydotGraphMinimal(train_model.net.Proto().op, "mnist", rankdir="LR",
                                            minimal_dependency=True)
    minimal = root / "train_net_graph_minimal.png"
    write_atomic(minimal, net_drawer.render(graph, fmt="png"))
    show_png(minimal)
    return full, minimal


def print_init_net(train_model, chars=400):
    """Print the start of the train init net's protobuf text (cell 11)."""
    print("*******train_model.param_init_net.Proto()*******\n")
    print(str(train_model.param_init_net.Proto())[:chars] + "\n...")


def save_nets(run_dir, models):
    """Write the five NetDefs as binary ``.pb`` and text ``.pbtxt`` files (cell 12)."""
    train_model, test_model, deploy_model = models
    nets = {"train_net": train_model.net, "train_init_net": train_model.param_init_net,
            "test_net": test_model.net, "test_init_net": test_model.param_init_net,
            "deploy_net": deploy_model.net}
    root = workspace_dir(run_dir)
    for name, net in nets.items():
        proto = net.Proto()
        write_atomic(root / f"{name}.pb", proto.SerializeToString())
        write_atomic(root / f"{name}.pbtxt", str(proto))
    print(f"Protocol buffers files have been created in your root folder: {root}")
    return sorted(root.glob("*_net.pb*"))


def build_step(run_dir, **options):
    """Cells 3-12 in one call: build the models, draw them, print and save the nets."""
    models = build_models(run_dir, **options)
    draw_nets(run_dir, models[0])
    print_init_net(models[0])
    save_nets(run_dir, models)
    return models


# --- 03 train: tutorial cells 13-14 ------------------------------------------------------------

def train(run_dir, seed=0, train_iters=200, print_every=25):
    """Initialize, run the train net ``train_iters`` times, save the parameters (cell 13)."""
    root = start_workspace(run_dir)
    init_net, net = load_net(run_dir, "train_init_net"), load_net(run_dir, "train_net")
    seed_everything(seed)
    started = time.perf_counter()
    workspace.RunNetOnce(init_net)
    # the Print and Summarize ops (re)start their files in the workspace root here
    workspace.CreateNet(net, overwrite=True)
    accuracy, loss = np.zeros(train_iters), np.zeros(train_iters)
    for i in range(train_iters):
        workspace.RunNet(net.name)
        accuracy[i] = workspace.FetchBlob("accuracy")
        loss[i] = workspace.FetchBlob("loss")
        if print_every and (i % print_every == 0 or i == train_iters - 1):
            print(f"iteration {i:5d}: loss {loss[i]:.4f}  accuracy {accuracy[i]:.4f}", flush=True)
    seconds = time.perf_counter() - started
    params = trained_params(net)
    save_blobs(params, root / PARAMS_DB, net_device_option(net))
    tail = slice(max(0, train_iters - 10), train_iters)
    metrics = {"final_train_loss": float(loss[-1]), "final_train_accuracy": float(accuracy[-1]),
               "train_loss_last10": float(loss[tail].mean()),
               "train_accuracy_last10": float(accuracy[tail].mean()),
               "train_iters": train_iters, "train_seconds": round(seconds, 3),
               "train_iters_per_second": round(train_iters / seconds, 2)}
    write_json(root / "metrics_train.json", metrics)
    print(f"trained {train_iters} iterations in {seconds:.1f} s; parameters "
          f"{params} saved to {root / PARAMS_DB}")
    return {"loss": loss, "accuracy": accuracy, "metrics": metrics}


def plot_training(run_dir, history):
    """Plot loss and accuracy over the iterations into ``train_curves.png`` (cell 13)."""
    pyplot = _pyplot()
    fig = pyplot.figure()
    pyplot.plot(history["loss"], "b")
    pyplot.plot(history["accuracy"], "r")
    pyplot.legend(("Loss", "Accuracy"), loc="upper right")
    pyplot.xlabel("iteration")
    return save_figure(fig, workspace_dir(run_dir) / "train_curves.png")


def show_sample_batch(run_dir):
    """Show the last training batch and the softmax of its first image (cell 14)."""
    from caffe2torch.python import visualize
    pyplot = _pyplot()
    root = workspace_dir(run_dir)
    fig = pyplot.figure()
    visualize.NCHW.ShowMultiple(workspace.FetchBlob("data"))
    save_figure(fig, root / "sample_batch.png")
    softmax = workspace.FetchBlob("softmax")
    fig = pyplot.figure()
    pyplot.plot(softmax[0], "ro")
    pyplot.title("Prediction for the first image")
    save_figure(fig, root / "first_prediction.png")
    label = int(workspace.FetchBlob("label")[0])
    print(f"first image: label {label}, predicted {int(softmax[0].argmax())} "
          f"(confidence {softmax[0].max():.4f})")
    return softmax[0]


def train_step(run_dir, seed=0, train_iters=200, print_every=25):
    """Cells 13-14 in one call."""
    history = train(run_dir, seed=seed, train_iters=train_iters, print_every=print_every)
    plot_training(run_dir, history)
    show_sample_batch(run_dir)
    return history


# --- 04 test: tutorial cell 15 -----------------------------------------------------------------

def test(run_dir, test_iters=100):
    """Load the trained parameters and run the test net over ``test_iters`` batches (cell 15)."""
    root = start_workspace(run_dir)
    init_net, net = load_net(run_dir, "test_init_net"), load_net(run_dir, "test_net")
    option = net_device_option(net)
    load_blobs(trained_params(load_net(run_dir, "train_net")), root / PARAMS_DB, "train", option)
    started = time.perf_counter()
    workspace.RunNetOnce(init_net)
    workspace.CreateNet(net, overwrite=True)
    test_accuracy = np.zeros(test_iters)
    for i in range(test_iters):
        workspace.RunNet(net.name)
        test_accuracy[i] = workspace.FetchBlob("accuracy")
    seconds = time.perf_counter() - started
    # the last batch goes to the export step, which predicts it with the reloaded model
    save_blobs(["data", "label"], root / LAST_BATCH_DB, option)
    metrics = {"test_accuracy": float(test_accuracy.mean()), "test_batches": test_iters,
               "test_images": int(test_iters * workspace.FetchBlob("label").shape[0]),
               "test_seconds": round(seconds, 3)}
    write_json(root / "metrics_test.json", metrics)
    print(f"test_accuracy: {metrics['test_accuracy']:f}")
    return {"accuracy": test_accuracy, "metrics": metrics}


def plot_test(run_dir, result):
    """Plot the accuracy of each test batch into ``test_accuracy.png`` (cell 15)."""
    pyplot = _pyplot()
    fig = pyplot.figure()
    pyplot.plot(result["accuracy"], "r")
    pyplot.title("Accuracy over test batches.")
    pyplot.xlabel("batch")
    return save_figure(fig, workspace_dir(run_dir) / "test_accuracy.png")


class AccuracyTooLow(StepError):
    """The test accuracy is below ``min_test_accuracy``."""


def check_test_accuracy(result, min_test_accuracy):
    """Fail the step when the mean test accuracy is below ``min_test_accuracy``."""
    accuracy = result["metrics"]["test_accuracy"]
    if accuracy < min_test_accuracy:
        raise AccuracyTooLow(f"test accuracy {accuracy:.4f} is below min_test_accuracy "
                             f"{min_test_accuracy}: train longer or lower the threshold")
    print(f"test accuracy {accuracy:.4f} >= min_test_accuracy {min_test_accuracy}")


def test_step(run_dir, test_iters=100, min_test_accuracy=0.0):
    """Cell 15 in one call, then the accuracy check."""
    result = test(run_dir, test_iters=test_iters)
    plot_test(run_dir, result)
    check_test_accuracy(result, min_test_accuracy)
    return result


# --- 05 export: tutorial cells 16-17 -----------------------------------------------------------

def export_predictor(run_dir):
    """Save the deploy net with the trained parameters as a predictor minidb (cell 16)."""
    from caffe2torch.python.predictor import predictor_exporter as pe
    root = start_workspace(run_dir)
    deploy = load_net(run_dir, "deploy_net")
    option = net_device_option(deploy)
    params = [name for name in deploy.external_input if name != "data"]
    load_blobs(params, root / PARAMS_DB, "train", option)
    load_blobs(["data", "label"], root / LAST_BATCH_DB, "test")
    # one deploy run on the last test batch: the exporter records the shapes of data and softmax
    workspace.RunNetOnce(deploy)
    pe_meta = pe.PredictorExportMeta(predict_net=deploy, parameters=params, inputs=["data"],
                                     outputs=["softmax"])
    path = root / MODEL_DB
    pe.save_to_db("minidb", str(path), pe_meta)
    print(f"The deploy model is saved to: {path}")
    return {"path": path, "data": workspace.FetchBlob("data"),
            "label": workspace.FetchBlob("label"), "softmax": workspace.FetchBlob("softmax"),
            "device_option": option}


def reload_and_predict(run_dir, exported):
    """Reset, load the predictor with prepare_prediction_net, predict the last batch (cell 17)."""
    from caffe2torch.python.predictor import predictor_exporter as pe
    root = start_workspace(run_dir)
    print(f"The blobs in the workspace after reset: {workspace.Blobs()}")
    predict_net = pe.prepare_prediction_net(str(exported["path"]), "minidb",
                                            exported["device_option"])
    print(f"The blobs in the workspace after loading the model: {workspace.Blobs()}")
    blob = exported["data"]
    workspace.FeedBlob("data", blob, exported["device_option"])
    workspace.RunNet(predict_net, 1)
    softmax = workspace.FetchBlob("softmax")
    print(f"Shape of softmax: {softmax.shape}")
    if not np.allclose(softmax, exported["softmax"], atol=1e-5):
        raise StepError("the reloaded predictor disagrees with the deploy net it was exported "
                        f"from (max difference {np.abs(softmax - exported['softmax']).max():g})")
    predictions = []
    for number in SHOWN_IMAGES:
        probabilities = softmax[number - 1]
        predictions.append({"image": number, "prediction": int(probabilities.argmax()),
                            "confidence": float(probabilities.max()),
                            "label": int(exported["label"][number - 1])})
        print(f"image {number}: prediction {predictions[-1]['prediction']}, confidence "
              f"{predictions[-1]['confidence']:.6f} (label {predictions[-1]['label']})")
    pyplot = _pyplot()
    fig, axes = pyplot.subplots(1, len(SHOWN_IMAGES), figsize=(3 * len(SHOWN_IMAGES), 3.4))
    for ax, p in zip(axes, predictions):
        ax.imshow(blob[p["image"] - 1, 0], cmap="gray", interpolation="nearest")
        ax.set_title(f"image {p['image']}: {p['prediction']} ({p['confidence']:.3f})")
        ax.axis("off")
    save_figure(fig, root / "predictions.png")
    metrics = {"exported_model": str(exported["path"]), "reload_matches_deploy_net": True,
               "predictions": predictions}
    write_json(root / "metrics_export.json", metrics)
    return predictions


def export_step(run_dir):
    """Cells 16-17 in one call."""
    return reload_and_predict(run_dir, export_predictor(run_dir))
