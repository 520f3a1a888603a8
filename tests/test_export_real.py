"""Real Caffe2 nets (../shared/caffe2-artifacts and the tutorial's LeNet predictor) converted to a
module, torch.export (.pt2, dynamic batch), ONNX (onnxruntime) and TorchScript, each compared
with RunNetOnce. Exports are module-scoped fixtures: each net is traced once per format."""
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch import convert
from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, workspace
from caffe2torch.python.executor import PreparedNet
from caffe2torch.python.model_helper import ModelHelper
from caffe2torch.python.predictor import predictor_exporter as pe
from caffe2torch.python.workspace import Workspace
from tutorial import NOTEBOOKS

ARTIFACTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "caffe2-artifacts"
TOL = 1e-5
CPU = core.DeviceOption(caffe2_pb2.CPU)
# SqueezeNet 1.1 (the file's topology): output channels of each conv, by blob-name prefix.
SQUEEZE_CHANNELS = {"conv1": 64, "conv10": 1000, **{
    f"fire{i}/{part}": n * (1 if part == "squeeze1x1" else 4)
    for i, n in zip(range(2, 10), (16, 16, 32, 32, 48, 48, 64, 64))
    for part in ("squeeze1x1", "expand1x1", "expand3x3")}}

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def load(name):
    return caffe2_pb2.NetDef.FromString((ARTIFACTS / name).read_bytes())


def squeeze_weights(net, x):
    """Random weights of the right shapes for SqueezeNet, found by running it op by op."""
    rng = np.random.default_rng(0)
    ws = Workspace()
    ws.blobs["data"] = torch.from_numpy(x)
    params = {}
    for op in net.op:
        if op.type == "Conv":
            c_in = ws.blobs[op.input[0]].shape[1]
            c_out = SQUEEZE_CHANNELS[op.input[1][:-len("_w")]]
            k = next(a.i for a in op.arg if a.name == "kernel")
            std = (2.0 / (c_in * k * k)) ** 0.5
            params[op.input[1]] = rng.normal(0, std, (c_out, c_in, k, k)).astype(np.float32)
            params[op.input[2]] = rng.uniform(-0.1, 0.1, c_out).astype(np.float32)
            ws.blobs.update({n: torch.from_numpy(params[n]) for n in op.input[1:]})
        one = caffe2_pb2.NetDef(name="one")
        one.op.append(op)
        PreparedNet(one, ws).run()
    return params


class Case:
    """A net to convert: a module, example inputs at batch 2 and 3, and RunNetOnce's outputs."""

    def __init__(self, module, run_reference, make_inputs):
        self.module = module
        self._run_reference = run_reference  # inputs -> outputs (numpy) by RunNetOnce
        self._make_inputs = make_inputs  # rng, batch -> tuple of numpy arrays
        self._references = {}

    def make_inputs(self, batch):
        """The inputs of batch size ``batch`` (the same arrays every time)."""
        return self._make_inputs(np.random.default_rng(batch), batch)

    def reference(self, batch):
        """RunNetOnce's outputs on make_inputs(batch), computed once."""
        if batch not in self._references:
            self._references[batch] = self._run_reference(*self.make_inputs(batch))
        return self._references[batch]


def _notebook_lenet():
    """02_build's own AddLeNetModel, read from the notebook's cell (the model's one definition)."""
    import nbformat

    from caffe2torch.python import brew

    notebook = nbformat.read(str(NOTEBOOKS / "02_build.ipynb"), as_version=4)
    source = next(c.source for c in notebook.cells
                  if c.cell_type == "code" and "def AddLeNetModel(" in c.source)
    scope = {"brew": brew}
    exec(compile(source, "02_build.ipynb", "exec"), scope)
    return scope["AddLeNetModel"]


def _lenet_predictor(folder):
    """The tutorial's LeNet deploy model (brew), saved with predictor_exporter; (path, case)."""
    AddLeNetModel = _notebook_lenet()  # noqa: N806 (the tutorial's name)

    workspace.ResetWorkspace(str(folder))
    model = ModelHelper(name="mnist_deploy", arg_scope={"order": "NCHW"})
    AddLeNetModel(model, "data")
    workspace.RunNetOnce(model.param_init_net)
    workspace.FeedBlob("data", np.zeros((1, 1, 28, 28), np.float32))
    workspace.RunNetOnce(model.net)
    path = folder / "mnist_model.minidb"
    pe.save_to_db("minidb", str(path), pe.PredictorExportMeta(
        predict_net=model.net.Proto(), parameters=[str(p) for p in model.params],
        inputs=["data"], outputs=["softmax"]))
    workspace.ResetWorkspace()

    def reference(x):
        workspace.ResetWorkspace()
        net = pe.prepare_prediction_net(str(path), "minidb")
        workspace.FeedBlob("data", x)
        workspace.RunNet(net)
        return [workspace.FetchBlob("softmax")]

    def inputs(rng, batch):
        return (rng.uniform(0, 1, (batch, 1, 28, 28)).astype(np.float32),)

    return path, Case(convert.from_predictor_db(str(path)), reference, inputs)


def _with_init(init_name, predict_name, inputs, outputs, device_option=None):
    init, predict = load(init_name), load(predict_name)
    blobs = {}

    def reference(*xs):
        workspace.ResetWorkspace()
        if not blobs:  # run the init net once; later calls feed its blobs again
            workspace.RunNetOnce(init, device_option=device_option)
            blobs.update({n: workspace.FetchBlob(n) for n in workspace.Blobs()})
        for name, value in blobs.items():
            workspace.FeedBlob(name, value)
        for name, x in zip(inputs, xs):
            workspace.FeedBlob(name, x)
        workspace.RunNetOnce(predict, device_option=device_option)
        return [workspace.FetchBlob(n) for n in outputs]

    return convert.from_netdefs(init, predict, inputs, outputs), reference


def _case(name, tmp_path_factory):
    if name == "lenet_predictor":
        return _lenet_predictor(tmp_path_factory.mktemp("lenet"))[1]
    if name == "cifar_resnet":
        module, ref = _with_init("cifar_resnet_init_net.pb", "cifar_resnet_predict_net.pb",
                                 ["data"], ["softmax"], device_option=CPU)
        return Case(module, ref,
                    lambda rng, b: (rng.standard_normal((b, 3, 32, 32), np.float32),))
    if name == "hemt":
        names = ["DBInput_train/tanh_input", "DBInput_train/sig_input"]
        module, ref = _with_init("hemt_init_net.pb", "hemt_predict_net.pb", names,
                                 ["origin/Mul/origin_pred"])
        return Case(module, ref, lambda rng, b: tuple(
            rng.uniform(-1, 1, (b, 1)).astype(np.float32) for _ in names))
    if name == "squeezenet":
        net = load("squeeze_predict_net.pb")
        params = squeeze_weights(net, np.zeros((1, 3, 64, 64), np.float32))

        def ref(x):
            workspace.ResetWorkspace()
            for k, v in params.items():
                workspace.FeedBlob(k, v)
            workspace.FeedBlob("data", x)
            workspace.RunNetOnce(net)
            return [workspace.FetchBlob("softmaxout")]

        module = convert.NetModule(net, {k: torch.from_numpy(v) for k, v in params.items()})
        return Case(module, ref,
                    lambda rng, b: (rng.uniform(0, 1, (b, 3, 64, 64)).astype(np.float32),))
    if name in ("onnx_lenet", "mtcnn_pnet"):
        needs = {"onnx_lenet": "Reshape", "mtcnn_pnet": "PRelu"}[name]
        if not registry.is_registered(needs):
            pytest.skip(f"{name} needs op {needs}, which caffe2torch does not implement yet")
        data, out, shape = {"onnx_lenet": ("1", "26", (1, 28, 28)),
                            "mtcnn_pnet": ("data", "prob1", (3, 12, 12))}[name]
        module, ref = _with_init(f"{name}_init_net.pb", f"{name}_predict_net.pb", [data], [out])
        return Case(module, ref,
                    lambda rng, b: (rng.uniform(0, 1, (b, *shape)).astype(np.float32),))
    raise AssertionError(name)


NETS = ["lenet_predictor", "cifar_resnet", "hemt", "squeezenet", "onnx_lenet", "mtcnn_pnet"]


@pytest.fixture(scope="module", params=NETS)
def case(request, tmp_path_factory):
    c = _case(request.param, tmp_path_factory)
    c.name = request.param
    c.folder = tmp_path_factory.mktemp(request.param)
    c.example = tuple(torch.from_numpy(x) for x in c.make_inputs(2))
    c.program = convert.export_program(c.module, c.example, dynamic_batch=True)
    return c


def _outputs(out):
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.detach().numpy() for o in out]


def _close(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
        assert np.abs(g - w).max() <= TOL, f"{what}: max abs diff {np.abs(g - w).max():.3g}"


def test_module_matches_runnetonce(case):
    xs = case.make_inputs(3)
    _close(_outputs(case.module(*map(torch.from_numpy, xs))), case.reference(3),
           f"{case.name} module")
    # Parameters keep their blob names (sanitised where torch needs it, mapping kept).
    for torch_name, blob in case.module.blob_names.items():
        assert case.module.torch_name(blob) == torch_name
        assert "." not in torch_name and "/" not in torch_name


def test_exported_program_has_a_dynamic_batch_and_round_trips(case):
    path = case.folder / "model.pt2"
    convert.save_pt2(case.program, path)
    loaded = torch.export.load(path).module()
    for batch in (1, 3):
        xs = case.make_inputs(batch)
        _close(_outputs(loaded(*map(torch.from_numpy, xs))), case.reference(batch),
               f"{case.name} pt2 batch {batch}")


def test_onnx_runs_in_onnxruntime_with_caffe2_names(case):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) needs it
    pytest.importorskip("onnxruntime")
    report = convert.export_onnx(case.module, case.example, case.folder / "model.onnx",
                                 dynamic_batch=True, program=case.program)
    assert report.checked and report.max_abs_diff <= TOL
    assert report.input_names == case.module.input_names
    assert report.output_names == case.module.output_names
    model = onnx.load(report.path)
    initializers = {i.name for i in model.graph.initializer}
    assert initializers & set(case.module.blob_names.values())  # Caffe2 names, e.g. 'conv1_w'
    for batch in (1, 3):
        xs = case.make_inputs(batch)
        got = convert.run_onnxruntime(report.path, report.input_names, map(torch.from_numpy, xs))
        _close(got, case.reference(batch), f"{case.name} onnx batch {batch}")


def test_torchscript_matches(case):
    path = case.folder / "model.pt"
    convert.export_torchscript(case.module, case.example, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        loaded = torch.jit.load(str(path))
    xs = case.make_inputs(3)
    _close(_outputs(loaded(*map(torch.from_numpy, xs))), case.reference(3),
           f"{case.name} torchscript")


def test_cuda_nets_need_the_cpu_override():
    predict = load("cifar_resnet_predict_net.pb")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA options run as they are")
    workspace.RunNetOnce(load("cifar_resnet_init_net.pb"), device_option=CPU)
    workspace.FeedBlob("data", np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(RuntimeError, match=r"device_option=core.DeviceOption\(caffe2_pb2.CPU\)"):
        workspace.RunNetOnce(predict)
    workspace.CreateNet(predict, device_option=CPU)
    workspace.RunNet(predict.name)
    assert workspace.FetchBlob("softmax").shape == (1, 10)
    assert predict.op[0].device_option.device_type == caffe2_pb2.CUDA  # the caller's net is kept


def test_device_override_keeps_random_seeds():
    net = core.Net("seeded")
    net.GaussianFill([], "y", shape=[4],
                     device_option=core.DeviceOption(caffe2_pb2.CUDA, 0, random_seed=5))
    runs = []
    for _ in range(2):
        workspace.RunNetOnce(net, device_option=CPU)
        runs.append(workspace.FetchBlob("y"))
    np.testing.assert_array_equal(runs[0], runs[1])
