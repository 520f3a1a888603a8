"""caffe2torch.python.models.resnet (Caffe2's resnet_test.py): the NetDefs Caffe2 builds, and
that they run forward and backward."""
import numpy as np
import pytest

from caffe2torch.python import core, model_helper, workspace
from caffe2torch.python.models import resnet


def _types(model):
    return [op.type for op in model.net.Proto().op]


def test_resnet50_netdef_matches_caffe2s_layout():
    model = model_helper.ModelHelper(name="resnet50")
    softmax, loss = resnet.create_resnet50(model, "data", num_input_channels=3, num_labels=2,
                                           label="label")
    types = _types(model)
    assert (str(softmax), str(loss)) == ("softmax", "loss")
    assert types.count("Conv") == 53 and types.count("SpatialBN") == 53
    assert types.count("Sum") == 16 and types[-1] == "SoftmaxWithLoss"
    assert len(model.params) == 53 * 2 + 53 * 2 + 2  # conv w+b, bn scale+bias, fc w+b
    names = {str(p) for p in model.params}
    assert {"conv1_w", "comp_0_conv_1_w", "shortcut_projection_0_w",
            "comp_15_spatbn_3_s", "last_out_L2_w"} <= names
    pool = next(op for op in model.net.Proto().op if op.type == "AveragePool")
    assert any(a.name == "global_pooling" and a.i == 1 for a in pool.arg)
    assert resnet.create_resnet50(model_helper.ModelHelper(name="nl"), "data", 3, 10,
                                  no_loss=True) == "last_out_L10"


@pytest.mark.parametrize("builder", ["resnet50", "resnet_32x32"])
def test_resnets_train_a_step(fresh_workspace, builder):
    model = model_helper.ModelHelper(name=builder)
    rng = np.random.default_rng(0)
    if builder == "resnet50":
        _, loss = resnet.create_resnet50(model, "data", 3, 2, label="label")
        workspace.FeedBlob("data", rng.standard_normal((2, 3, 64, 64)).astype(np.float32))
    else:
        softmax = resnet.create_resnet_32x32(model, "data", 3, num_groups=1, num_labels=2)
        loss = model.AveragedLoss(model.LabelCrossEntropy([softmax, "label"], "xent"), "loss")
        workspace.FeedBlob("data", rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    workspace.FeedBlob("label", np.array([0, 1], np.int32))
    model.AddGradientOperators([loss])
    workspace.RunNetOnce(model.param_init_net)
    workspace.RunNetOnce(model.net)
    assert workspace.FetchBlob("softmax").shape == (2, 2)
    grad = workspace.FetchBlob(str(model.param_to_grad[model.params[0]]))
    assert grad.shape == workspace.FetchBlob(str(model.params[0])).shape
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_gradients_of_a_scoped_loss_blob_are_not_scoped_twice(fresh_workspace):
    """AddGradientOperators([loss]) inside the NameScope that made ``loss`` (Caffe2 keeps the
    BlobReference as given; the Multi-GPU tutorial's single-device part does this)."""
    model = model_helper.ModelHelper(name="scoped")
    with core.NameScope("imonaboat"):
        workspace.FeedBlob("imonaboat/x", np.ones((2, 3), np.float32))
        loss = model.net.AveragedLoss(model.net.Relu("x", "y"), "loss")
        grads = model.AddGradientOperators([loss])
    fill = model.net.Proto().op[2]
    assert fill.type == "ConstantFill" and list(fill.input) == ["imonaboat/loss"]
    workspace.RunNetOnce(model.net)
    assert workspace.FetchBlob(str(grads["imonaboat/x"])).shape == (2, 3)
