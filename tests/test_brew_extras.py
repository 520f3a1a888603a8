"""brew beyond the tutorial (spatial_bn, sum, concat, transpose, lrn, layer_norm, instance_norm,
db_input, add_weight_decay, kernel=[kh, kw]), cnn.CNNModelHelper, modeling, and
predictor.mobile_exporter, in the style of Caffe2's brew_test: build, run, fetch."""
import numpy as np
import pytest

from caffe2torch.db.serialize import NumpyArrayToCaffe2Tensor
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, cnn, core, model_helper, workspace
from caffe2torch.python.modeling import initializers, parameter_info
from caffe2torch.python.predictor import mobile_exporter


@pytest.fixture(autouse=True)
def _fresh(fresh_workspace):
    yield


def test_spatial_bn_params_and_training_outputs():
    model = model_helper.ModelHelper(name="bn")
    out = brew.spatial_bn(model, "x", "bn", dim_in=3, epsilon=1e-3)
    assert str(out) == "bn"
    op = model.net.Proto().op[-1]
    assert list(op.input) == ["x", "bn_s", "bn_b", "bn_rm", "bn_riv"]
    assert list(op.output) == ["bn", "bn_rm", "bn_riv", "bn_sm", "bn_siv"]
    assert [str(p) for p in model.params] == ["bn_s", "bn_b"]
    assert [str(p) for p in model.GetComputedParams()] == ["bn_rm", "bn_riv"]
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    workspace.FeedBlob("x", x)
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(workspace.FetchBlob("bn"), (x - mean) / np.sqrt(var + 1e-3),
                               rtol=1e-4, atol=1e-5)
    test = model_helper.ModelHelper(name="bn_test", init_params=False)
    only = brew.spatial_bn(test, "x", "bn", dim_in=3, is_test=True)
    assert [str(o) for o in test.net.Proto().op[-1].output] == ["bn"] and str(only) == "bn"
    assert len(test.param_init_net.Proto().op) == 0


def test_sum_and_concat():
    model = model_helper.ModelHelper(name="sum_concat")
    brew.sum(model, ["a", "b"], "s")
    brew.concat(model, ["a", "b"], "c", axis=1)
    assert list(model.net.Proto().op[-1].output) == ["c", "_c_concat_dims"]
    a, b = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    workspace.FeedBlob("a", a)
    workspace.FeedBlob("b", b)
    workspace.RunNetOnce(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("s"), a + b)
    np.testing.assert_array_equal(workspace.FetchBlob("c"), np.concatenate([a, b], axis=1))
    args = {a.name for a in model.net.Proto().op[-1].arg}
    assert "order" not in args  # an explicit axis drops the model's order, as Caffe2 does


def test_conv_kernel_as_a_list():
    model = model_helper.ModelHelper(name="conv_hw")
    brew.conv(model, "x", "conv", dim_in=2, dim_out=4, kernel=[3, 1])
    op = model.net.Proto().op[-1]
    args = {a.name: a.i for a in op.arg if a.HasField("i")}
    assert args["kernel_h"] == 3 and args["kernel_w"] == 1 and "kernel" not in args
    workspace.FeedBlob("x", np.ones((1, 2, 5, 5), np.float32))
    workspace.RunNetOnce(model.param_init_net)
    assert workspace.FetchBlob("conv_w").shape == (4, 2, 3, 1)
    workspace.RunNetOnce(model.net)
    assert workspace.FetchBlob("conv").shape == (1, 4, 3, 5)


def test_db_input_reads_batches(tmp_path):
    from caffe2torch.db import open_db
    path = str(tmp_path / "in.minidb")
    with open_db("minidb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(4):
            protos = caffe2_pb2.TensorProtos()
            protos.protos.extend([NumpyArrayToCaffe2Tensor(np.full(2, i, np.float32)),
                                  NumpyArrayToCaffe2Tensor(np.array(i, np.int32))])
            txn.put(f"{i:08d}", protos.SerializeToString())
        txn.commit()
    model = model_helper.ModelHelper(name="dbin")
    data, label = brew.db_input(model, ["data", "label"], batch_size=2, db=path,
                                db_type="minidb")
    workspace.RunNetOnce(model.param_init_net)
    workspace.CreateNet(model.net)
    workspace.RunNet(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("label"), [0, 1])
    workspace.RunNet(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("label"), [2, 3])


def test_add_weight_decay_adds_to_weight_gradients_only():
    model = model_helper.ModelHelper(name="wd")
    fc = brew.fc(model, "x", "fc", dim_in=3, dim_out=2)
    model.net.AveragedLoss(fc, "loss")
    model.AddGradientOperators(["loss"])
    brew.add_weight_decay(model, 0.5)
    decays = [op for op in model.net.Proto().op if op.type == "WeightedSum"]
    assert [list(op.input) for op in decays] == [["fc_w_grad", "ONE", "fc_w", "wd"]]
    workspace.FeedBlob("x", np.ones((2, 3), np.float32))
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    w = workspace.FetchBlob("fc_w")
    # d(mean of fc)/dw = mean over the batch of x / dim_out, plus 0.5·w
    np.testing.assert_allclose(workspace.FetchBlob("fc_w_grad"), 0.5 + 0.5 * w, rtol=1e-5)
    brew.add_weight_decay(model, 0.0)  # a zero decay adds nothing
    assert len([op for op in model.net.Proto().op if op.type == "WeightedSum"]) == 1


def test_transpose():
    model = model_helper.ModelHelper(name="tr")
    brew.transpose(model, "x", "y", axes=[1, 0])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    workspace.FeedBlob("x", x)
    workspace.RunNetOnce(model.net)
    np.testing.assert_array_equal(workspace.FetchBlob("y"), x.T)


def test_lrn_writes_its_scale_on_cpu():
    model = model_helper.ModelHelper(name="lrn")
    out = brew.lrn(model, "x", "lrn", size=3, alpha=1e-4, beta=0.75, bias=1.0)
    assert list(model.net.Proto().op[-1].output) == ["lrn", "_lrn_scale"] and str(out) == "lrn"


def test_layer_norm_scales_and_shifts():
    model = model_helper.ModelHelper(name="ln")
    out, mean, std = brew.layer_norm(model, "x", "ln", dim_in=4)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    workspace.FeedBlob("x", x)
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    ref = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(workspace.FetchBlob(out), ref, rtol=1e-4, atol=1e-5)
    assert [str(p) for p in model.params] == ["ln_scale", "ln_bias"]



def test_cnn_model_helper_builds_lenet_like_brew():
    model = cnn.CNNModelHelper(order="NCHW", name="cnn_mnist")
    conv = model.Conv("data", "conv1", dim_in=1, dim_out=2, kernel=3)
    pool = model.MaxPool(conv, "pool1", kernel=2, stride=2)
    relu = model.Relu(pool, "relu1")
    fc = model.FC(relu, "fc", dim_in=2 * 3 * 3, dim_out=3)
    softmax = model.Softmax(fc, "softmax")
    xent = model.LabelCrossEntropy([softmax, "label"], "xent")
    loss = model.AveragedLoss(xent, "loss")
    model.AddGradientOperators([loss])
    conv_op = model.net.Proto().op[0]
    assert conv_op.engine == "CUDNN"  # use_cudnn=True is CNNModelHelper's default
    assert [str(p) for p in model.params] == ["conv1_w", "conv1_b", "fc_w", "fc_b"]
    assert model.XavierInit == ("XavierFill", {}) and model.ConstantInit(2)[1] == {"value": 2}
    workspace.FeedBlob("data", np.random.rand(2, 1, 8, 8).astype(np.float32))
    workspace.FeedBlob("label", np.array([0, 2], np.int32))
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    assert workspace.FetchBlob("fc_w_grad").shape == (3, 18)
    with pytest.raises(ValueError, match="storage order"):
        cnn.CNNModelHelper(order="CHWN")


def test_modeling_modules_reexport():
    assert parameter_info.ParameterTags.WEIGHT == "WEIGHT"
    init = initializers.Initializer("ConstantFill", value=2.0)
    net = core.Net("init_mod")
    info = init.create_param("p", net, [2])
    assert isinstance(info, parameter_info.ParameterInfo)
    assert net.Proto().op[0].type == "ConstantFill"


def test_mobile_exporter_round_trips_through_predictor():
    model = model_helper.ModelHelper(name="mobile")
    fc = brew.fc(model, "data", "fc", dim_in=3, dim_out=2)
    brew.softmax(model, fc, "softmax")
    workspace.FeedBlob("data", np.zeros((1, 3), np.float32))
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    init_net, predict_net = mobile_exporter.Export(workspace, model.net, model.params)
    assert list(predict_net.external_input)[0] == "data"
    assert list(predict_net.external_output) == ["softmax"]
    assert [op.type for op in init_net.op] == ["GivenTensorFill"] * 3
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    workspace.FeedBlob("data", x)
    workspace.RunNetOnce(model.net)
    expected = workspace.FetchBlob("softmax")
    workspace.ResetWorkspace()
    p = workspace.Predictor(init_net.SerializeToString(), predict_net.SerializeToString())
    [got] = p.run([x])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
