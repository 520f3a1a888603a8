"""The tutorial's model-building functions (Caffe2 MNIST, "Caffe2 on Kubernetes"), on caffe2torch.

The functions keep the tutorial's names, blob names and op sequence; what the tutorial wrote as
literals (learning-rate policy and values, batch sizes, database paths) are arguments here.

Example::

    train, test, deploy = build_models("data/mnist-train-nchw-lmdb", "data/mnist-test-nchw-lmdb")
    workspace.RunNetOnce(train.param_init_net)
    workspace.CreateNet(train.net)
    workspace.RunNet(train.net, 200)
"""
from caffe2torch.python import brew, core, model_helper

ARG_SCOPE = {"order": "NCHW"}
LR_POLICIES = ("fixed", "step", "exp", "inv")


def AddInput(model, batch_size, db, db_type):
    """Read ``batch_size`` records per run from ``db``: returns ``data`` (float, /256) and ``label``."""
    # load the data: uint8 images [B,1,28,28] and int32 labels [B]
    data_uint8, label = model.TensorProtosDBInput(
        [], ["data_uint8", "label"], batch_size=batch_size, db=db, db_type=db_type)
    # cast the data to float
    data = model.Cast(data_uint8, "data", to=core.DataType.FLOAT)
    # scale data from [0,255] down to [0,1)
    data = model.Scale(data, data, scale=float(1. / 256))
    # the input needs no gradient: cut the backward pass here
    data = model.StopGradient(data, data)
    return data, label


def AddLeNetModel(model, data):
    """LeNet: conv 5x5/20, pool, conv 5x5/50, pool, fc 800→500, relu, fc 500→10, softmax."""
    # image 28x28 -> conv1 24x24 -> pool1 12x12
    conv1 = brew.conv(model, data, "conv1", dim_in=1, dim_out=20, kernel=5)
    pool1 = brew.max_pool(model, conv1, "pool1", kernel=2, stride=2)
    # 12x12 -> conv2 8x8 -> pool2 4x4, so fc3 sees 50 * 4 * 4 values
    conv2 = brew.conv(model, pool1, "conv2", dim_in=20, dim_out=50, kernel=5)
    pool2 = brew.max_pool(model, conv2, "pool2", kernel=2, stride=2)
    fc3 = brew.fc(model, pool2, "fc3", dim_in=50 * 4 * 4, dim_out=500)
    relu = brew.relu(model, fc3, "relu3")
    pred = brew.fc(model, relu, "pred", 500, 10)
    softmax = brew.softmax(model, pred, "softmax")
    return softmax


def AddAccuracy(model, softmax, label):
    """The fraction of the batch whose top prediction is the label: blob ``accuracy``."""
    accuracy = brew.accuracy(model, [softmax, label], "accuracy")
    return accuracy


def lr_arguments(policy, base_lr, stepsize=1, gamma=0.999, power=0.75):
    """The LearningRate op's arguments for ``policy`` (only those the policy reads)."""
    if policy not in LR_POLICIES:
        raise ValueError(f"unknown learning-rate policy {policy!r}; use one of {', '.join(LR_POLICIES)}")
    args = {"base_lr": float(base_lr), "policy": policy}
    if policy == "step":
        args.update(stepsize=int(stepsize), gamma=float(gamma))
    elif policy == "exp":
        args.update(gamma=float(gamma))
    elif policy == "inv":
        args.update(gamma=float(gamma), power=float(power))
    return args


def AddTrainingOperators(model, softmax, label, base_lr=-0.1, policy="step", stepsize=1,
                         gamma=0.999, power=0.75):
    """Loss, accuracy, gradients and the plain-SGD update ``param += LR * grad`` (LR < 0)."""
    xent = model.LabelCrossEntropy([softmax, label], "xent")
    # the average cross entropy over the batch
    loss = model.AveragedLoss(xent, "loss")
    # accuracy, to follow training
    AddAccuracy(model, softmax, label)
    # the backward pass for the loss
    model.AddGradientOperators([loss])
    # the iteration counter, then the learning rate it drives
    ITER = brew.iter(model, "iter")
    LR = model.LearningRate(ITER, "LR", **lr_arguments(policy, base_lr, stepsize, gamma, power))
    # ONE is a constant for the weighted sum of each update
    ONE = model.param_init_net.ConstantFill([], "ONE", shape=[1], value=1.0)
    for param in model.params:
        param_grad = model.param_to_grad[param]
        # param = param * 1 + grad * LR
        model.WeightedSum([param, ONE, param_grad, LR], param)


def AddBookkeepingOperators(model):
    """Print accuracy and loss, and summarize every parameter and its gradient, to files."""
    # Print writes <workspace root>/<blob>.log, one line per run
    model.Print("accuracy", [], to_file=1)
    model.Print("loss", [], to_file=1)
    # Summarize writes min, max, mean and std to <workspace root>/<blob>.summary
    for param in model.params:
        model.Summarize(param, [], to_file=1)
        model.Summarize(model.param_to_grad[param], [], to_file=1)


def build_models(train_db, test_db, db_type="lmdb", train_batch_size=64, test_batch_size=100,
                 base_lr=-0.1, lr_policy="step", stepsize=1, gamma=0.999, power=0.75,
                 device_option=None):
    """The tutorial's train, test and deploy ModelHelpers (sharing parameter names).

    ``device_option`` (e.g. ``core.DeviceOption(caffe2_pb2.CUDA, 0)``) puts every op on that
    device; None keeps Caffe2's default, the CPU.
    """
    with core.DeviceScope(device_option):
        train_model = model_helper.ModelHelper(name="mnist_train", arg_scope=ARG_SCOPE)
        data, label = AddInput(train_model, batch_size=train_batch_size, db=str(train_db),
                               db_type=db_type)
        softmax = AddLeNetModel(train_model, data)
        AddTrainingOperators(train_model, softmax, label, base_lr=base_lr, policy=lr_policy,
                             stepsize=stepsize, gamma=gamma, power=power)
        AddBookkeepingOperators(train_model)

        # the test model reads the test set and reuses the trained parameters (init_params=False)
        test_model = model_helper.ModelHelper(name="mnist_test", arg_scope=ARG_SCOPE,
                                              init_params=False)
        data, label = AddInput(test_model, batch_size=test_batch_size, db=str(test_db),
                               db_type=db_type)
        softmax = AddLeNetModel(test_model, data)
        AddAccuracy(test_model, softmax, label)

        # the deploy model reads a fed "data" blob and only predicts
        deploy_model = model_helper.ModelHelper(name="mnist_deploy", arg_scope=ARG_SCOPE,
                                                init_params=False)
        AddLeNetModel(deploy_model, "data")
    return train_model, test_model, deploy_model
