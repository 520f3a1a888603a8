"""ModelHelper: its nets, arg scope, parameters, gradients, data input and model.Op passthrough."""
import logging
from pathlib import Path

import numpy as np
import pytest

from caffe2torch.python import brew, core, model_helper, workspace
from caffe2torch.python.model_helper import ModelHelper, ParameterTags

ARTIFACTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "caffe2-artifacts"
MNIST_NHWC = str(ARTIFACTS / "mnist-test-nhwc-minidb")
FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


pytestmark = pytest.mark.usefixtures("fresh_workspace")


def op_types(net):
    return [op.type for op in net.Proto().op]


def test_nets_names_and_default_arg_scope():
    model = ModelHelper(name="mh_defaults")
    assert model.name == "mh_defaults" and model.get_name() == "mh_defaults"
    assert model.net.Name() == "mh_defaults"
    assert model.param_init_net.Name() == "mh_defaults_init"
    assert model.arg_scope == {"order": "NCHW", "use_cudnn": True, "cudnn_exhaustive_search": False}
    assert model.init_params is True
    assert model.params == [] and model.weights == [] and model.biases == []
    assert model.param_to_grad == {}
    assert model.Proto() is model.net.Proto() and model.InitProto() is model.param_init_net.Proto()


def test_user_arg_scope_updates_the_defaults():
    model = ModelHelper(name="mh_scope", arg_scope={"order": "NHWC", "use_cudnn": False})
    assert model.arg_scope == {"order": "NHWC", "use_cudnn": False,
                               "cudnn_exhaustive_search": False}


def test_second_model_of_a_name_gets_unique_nets():
    ModelHelper(name="mh_twice")
    second = ModelHelper(name="mh_twice")
    assert second.net.Name() == "mh_twice_1"
    assert second.param_init_net.Name() == "mh_twice_init_1"


def test_default_name_is_model():
    assert ModelHelper().name == "model"


def test_op_passthrough_adds_to_net(caplog):
    model = ModelHelper(name="mh_passthrough")
    with caplog.at_level(logging.WARNING, logger="caffe2torch"):
        y = model.Relu(["x"], "y")
    assert str(y) == "y" and op_types(model.net) == ["Relu"]
    assert op_types(model.param_init_net) == []
    # Relu is not on Caffe2's known list: a warning, as in Caffe2.
    assert "does not recognize: Relu" in caplog.text


def test_known_op_passthrough_does_not_warn(caplog):
    model = ModelHelper(name="mh_known")
    with caplog.at_level(logging.WARNING, logger="caffe2torch"):
        model.Softmax(["x"], "y")
        model.StopGradient("y", "y")
    assert caplog.text == ""
    assert op_types(model.net) == ["Softmax", "StopGradient"]


def test_not_allowed_unknown_op_raises():
    model = ModelHelper(name="mh_strict", allow_not_known_ops=False)
    with pytest.raises(AttributeError, match="Relu is not known to be safe"):
        model.Relu(["x"], "y")


def test_unregistered_op_raises_attribute_error():
    model = ModelHelper(name="mh_unknown")
    with pytest.raises(AttributeError, match="NotAnOp is not a registered operator"):
        model.NotAnOp(["x"], "y")
    with pytest.raises(AttributeError):
        model._private_thing  # noqa: B018


def test_brew_parameters_in_creation_order_with_tags():
    model = ModelHelper(name="mh_params")
    brew.conv(model, "data", "conv1", dim_in=1, dim_out=2, kernel=3)
    brew.fc(model, "conv1", "pred", dim_in=8, dim_out=4)
    assert [str(p) for p in model.params] == ["conv1_w", "conv1_b", "pred_w", "pred_b"]
    assert [str(p) for p in model.weights] == ["conv1_w", "pred_w"]
    assert [str(p) for p in model.biases] == ["conv1_b", "pred_b"]
    assert all(isinstance(p, core.BlobReference) for p in model.params)
    info = model.get_param_info(model.params[0])
    assert info.shape == [2, 1, 3, 3] and info.name == "conv1_w"


def test_get_params_by_name_scope():
    model = ModelHelper(name="mh_namescope")
    with core.NameScope("tower0"):
        brew.fc(model, "x", "fc", dim_in=3, dim_out=2)
        assert [str(p) for p in model.GetParams()] == ["tower0/fc_w", "tower0/fc_b"]
    brew.fc(model, "x", "fc", dim_in=3, dim_out=2)
    assert [str(p) for p in model.GetParams("tower0")] == ["tower0/fc_w", "tower0/fc_b"]
    assert [str(p) for p in model.GetParams("tower0/")] == ["tower0/fc_w", "tower0/fc_b"]
    assert model.GetParams("tower1") == []
    assert [str(p) for p in model.GetParams()] == ["tower0/fc_w", "tower0/fc_b", "fc_w", "fc_b"]
    assert model.GetParams(top_scope=True) == model.params


def test_create_param_reuses_and_checks_shape():
    model = ModelHelper(name="mh_create")
    init = model_helper.Initializer("ConstantFill", value=2.0)
    w = model.create_param("w", shape=[2, 3], initializer=init, tags=ParameterTags.WEIGHT)
    assert model.create_param("w", shape=[2, 3], initializer=init) is w
    assert op_types(model.param_init_net) == ["ConstantFill"]
    with pytest.raises(ValueError, match="already exists with shape"):
        model.create_param("w", shape=[3, 3], initializer=init)
    model.create_param("rm", shape=[3], initializer=init, tags=ParameterTags.COMPUTED_PARAM)
    assert [str(p) for p in model.params] == ["w"]
    assert [str(p) for p in model.GetComputedParams()] == ["rm"]
    assert [str(p) for p in model.GetAllParams()] == ["w", "rm"]
    workspace.RunNetOnce(model.param_init_net)
    np.testing.assert_array_equal(workspace.FetchBlob("w"), np.full((2, 3), 2.0, np.float32))


def test_external_initializer_adds_no_op():
    model = ModelHelper(name="mh_external")
    p = model.create_param("shared_w", shape=[4], initializer=model_helper.ExternalInitializer())
    assert str(p) == "shared_w" and model.params == [p]
    assert op_types(model.param_init_net) == []


def test_validate_rejects_duplicate_params():
    model = ModelHelper(name="mh_dupes")
    model.AddParameter(core.BlobReference("w"))
    model.AddParameter(core.BlobReference("w"))
    with pytest.raises(ValueError, match=r"duplicate params: \['w'\]"):
        model.Validate()
    with pytest.raises(TypeError, match="BlobReference"):
        model.AddParameter("not_a_reference")


def _tiny_classifier(name):
    model = ModelHelper(name=name)
    fc = brew.fc(model, "data", "fc", dim_in=4, dim_out=3)
    softmax = brew.softmax(model, fc, "softmax")
    xent = model.LabelCrossEntropy([softmax, "label"], "xent")
    loss = model.AveragedLoss(xent, "loss")
    return model, loss


def test_add_gradient_operators_once_fills_param_to_grad():
    model, loss = _tiny_classifier("mh_grads")
    grad_map = model.AddGradientOperators([loss])
    assert grad_map is model.grad_map
    assert {str(k): str(v) for k, v in model.param_to_grad.items()} == {
        "fc_w": "fc_w_grad", "fc_b": "fc_b_grad"}
    assert str(grad_map["fc"]) == "fc_grad"
    assert model.get_param_info("fc_w").grad == model.param_to_grad[model.params[0]]
    with pytest.raises(RuntimeError, match="only once"):
        model.AddGradientOperators([loss])

    workspace.FeedBlob("data", np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32))
    workspace.FeedBlob("label", np.array([0, 1, 2, 0, 1], np.int32))
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    assert workspace.FetchBlob("fc_w_grad").shape == (3, 4)
    assert workspace.FetchBlob("fc_b_grad").shape == (3,)


def test_param_to_grad_needs_gradients_first():
    model, _ = _tiny_classifier("mh_no_grads")
    with pytest.raises(RuntimeError, match="AddGradientOperators"):
        model.get_param_to_grad(model.params)


def test_tensor_protos_db_input_layout_and_reading():
    model = ModelHelper(name="mh_input")
    data, label = model.TensorProtosDBInput([], ["data_uint8", "label"], batch_size=4,
                                            db=MNIST_NHWC, db_type="minidb")
    assert (str(data), str(label)) == ("data_uint8", "label")
    (create,) = model.param_init_net.Proto().op
    assert create.type == "CreateDB" and list(create.output) == ["dbreader_" + MNIST_NHWC]
    assert [(a.name, a.s.decode()) for a in create.arg] == [("db", MNIST_NHWC),
                                                          ("db_type", "minidb")]
    (read,) = model.net.Proto().op
    assert read.type == "TensorProtosDBInput"
    assert list(read.input) == ["dbreader_" + MNIST_NHWC]
    assert list(read.output) == ["data_uint8", "label"]
    assert [(a.name, a.i) for a in read.arg] == [("batch_size", 4)]

    workspace.RunNetOnce(model.param_init_net)
    workspace.CreateNet(model.net)
    workspace.RunNet(model.net, 2)
    images, labels = workspace.FetchBlob("data_uint8"), workspace.FetchBlob("label")
    assert images.dtype == np.uint8 and images.shape == (4, 28, 28, 1)
    assert labels.dtype == np.int32 and labels.tolist() == FIRST_LABELS[4:8]


def test_tensor_protos_db_input_rejects_a_reader():
    model = ModelHelper(name="mh_input_bad")
    with pytest.raises(ValueError, match="pass \\[\\]"):
        model.TensorProtosDBInput(["reader"], ["data"], batch_size=1, db="x", db_type="minidb")


def test_param_model_shares_parameters():
    train = ModelHelper(name="mh_train_shared")
    brew.fc(train, "data", "fc", dim_in=2, dim_out=2)
    test = ModelHelper(name="mh_test_shared", param_model=train)
    assert test.params is train.params and test.param_init_net is train.param_init_net
