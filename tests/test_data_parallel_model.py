"""data_parallel_model (Caffe2's data_parallel_model_test.py): replicas train like one device on
the concatenated batch; the NetDefs hold Caffe2's all-reduce and broadcast ops."""
import numpy as np
import pytest
import torch

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew, core, memonger, model_helper, optimizer, workspace
from caffe2torch.python import data_parallel_model as dpm

B = 4  # batch per device


def _forward(model, loss_scale):
    fc1 = brew.fc(model, "data", "fc1", dim_in=5, dim_out=6)
    relu = brew.relu(model, fc1, "relu1")
    fc2 = brew.fc(model, relu, "fc2", dim_in=6, dim_out=3)
    _, loss = model.net.SoftmaxWithLoss([fc2, "label"], ["softmax", "loss"])
    return [model.net.Scale(loss, "scaled_loss", scale=loss_scale)]


def _sgd(model):
    return optimizer.build_sgd(model, base_learning_rate=0.5)


def _data(steps, n):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((n, 5)).astype(np.float32),
             rng.integers(0, 3, n).astype(np.int32)) for _ in range(steps)]


def _parallel(devices, **kwargs):
    model = model_helper.ModelHelper(name=f"dpm_{len(devices)}")
    dpm.Parallelize(model, input_builder_fun=lambda m: None, forward_pass_builder_fun=_forward,
                    optimizer_builder_fun=kwargs.pop("optimizer_builder_fun", _sgd),
                    devices=devices, cpu_device=True, **kwargs)
    return model


def _feed(devices, x, y, prefix="cpu"):
    for k, d in enumerate(devices):
        workspace.FeedBlob(f"{prefix}_{d}/data", x[k * B:(k + 1) * B])
        workspace.FeedBlob(f"{prefix}_{d}/label", y[k * B:(k + 1) * B])


def _init(model, devices):
    """Feed a first batch (CreateNet needs the inputs), then RunInitNet."""
    x, y = _data(1, len(devices) * B)[0]
    _feed(devices, x, y)
    dpm.RunInitNet(model)


def _feed_and_run(model, devices, batches):
    for x, y in batches:
        _feed(devices, x, y)
        workspace.RunNet(model.net)


PARAMS = ["fc1_w", "fc1_b", "fc2_w", "fc2_b"]


@pytest.mark.parametrize("devices", [[0, 1, 2], [0, 1, 2, 3], [1, 3]])
def test_replicas_train_like_one_device_on_the_whole_batch(fresh_workspace, devices):
    n, steps = len(devices), 3
    torch.manual_seed(0)
    par = _parallel(devices)
    _init(par, devices)
    first = f"cpu_{devices[0]}/"
    init = {p: workspace.FetchBlob(first + p) for p in PARAMS}
    for d in devices[1:]:  # the init net broadcast the first device's parameters
        for p in PARAMS:
            np.testing.assert_array_equal(workspace.FetchBlob(f"cpu_{d}/{p}"), init[p])

    single = model_helper.ModelHelper(name="single")
    loss = _forward(single, 1.0)
    single.AddGradientOperators(loss)
    _sgd(single)
    workspace.RunNetOnce(single.param_init_net)
    for p in PARAMS:
        workspace.FeedBlob(p, init[p])

    batches = _data(steps, n * B)
    _feed_and_run(par, devices, batches)
    for i, (x, y) in enumerate(batches):
        workspace.FeedBlob("data", x)
        workspace.FeedBlob("label", y)
        if i == 0:
            workspace.CreateNet(single.net)  # its inputs exist now
        workspace.RunNet(single.net)
    for p in PARAMS:
        want = workspace.FetchBlob(p)
        assert not np.allclose(want, init[p])  # it trained
        for d in devices:
            np.testing.assert_allclose(workspace.FetchBlob(f"cpu_{d}/{p}"), want,
                                       rtol=1e-5, atol=1e-6)


def _ops(net):
    return [op for op in net.Proto().op]


def test_cpu_netdef_sums_then_copies_and_init_broadcasts(fresh_workspace):
    model = _parallel([0, 1])
    sums = [op for op in _ops(model.net) if op.type == "Sum"]
    assert [list(op.input) for op in sums][0] == ["cpu_0/fc2_b_grad", "cpu_1/fc2_b_grad"]
    assert {op.output[0] for op in sums} == {f"cpu_0/{p}_grad" for p in PARAMS}
    copies = [(op.input[0], op.output[0]) for op in _ops(model.net) if op.type == "Copy"]
    assert ("cpu_0/fc1_w_grad", "cpu_1/fc1_w_grad") in copies
    init_copies = [(op.input[0], op.output[0]) for op in _ops(model.param_init_net)
                   if op.type == "Copy"]
    assert sorted(init_copies) == sorted((f"cpu_0/{p}", f"cpu_1/{p}") for p in PARAMS)
    # the all-reduce sits between the backward pass and the updates
    types = [op.type for op in _ops(model.net)]
    assert types.index("Sum") > max(i for i, t in enumerate(types) if t.endswith("Gradient"))
    assert types.index("WeightedSum") > max(i for i, t in enumerate(types) if t == "Copy")
    assert model.GetDevices() == [0, 1] and model._device_prefix == "cpu"
    assert model.net.Proto().type == "dag" and model.net.Proto().num_workers == 8


@pytest.mark.parametrize("use_nccl", [False, True])
def test_gpu_netdef_uses_dpm_sums_or_nccl(fresh_workspace, use_nccl):
    """The GPU NetDef is built without a GPU (it is run only where CUDA is)."""
    model = model_helper.ModelHelper(name="gpu_net")
    dpm.Parallelize_GPU(model, input_builder_fun=lambda m: None,
                        forward_pass_builder_fun=_forward, optimizer_builder_fun=_sgd,
                        devices=[0, 1], use_nccl=use_nccl)
    ops = _ops(model.net)
    assert all(op.device_option.device_type == caffe2_pb2.CUDA for op in ops
               if op.type not in ("AtomicIter",))
    if use_nccl:
        nccl = [op for op in ops if op.type == "NCCLAllreduce"]
        assert len(nccl) == 4 and list(nccl[0].input) == list(nccl[0].output)
        assert list(nccl[1].control_input) == [nccl[0].input[0]]  # serialized, as Caffe2
    else:
        sums = [op for op in ops if op.type == "Sum"]
        assert sums and all(op.name == "dpm" and op.device_option.cuda_gpu_id == 0
                            for op in sums)
        copies = [op for op in ops if op.type == "Copy" and op.output[0].endswith("_grad")]
        assert all(op.device_option.cuda_gpu_id == 1 for op in copies)
    assert any(op.type == "Copy" and op.output[0] == "gpu_1/fc1_w"
               for op in _ops(model.param_init_net))


@pytest.mark.skipif(workspace.NumCudaDevices() < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("devices,use_nccl", [([0], False), ([0, 1], False), ([0, 1], True)])
def test_gpu_replicas_train_alike(fresh_workspace, devices, use_nccl):
    if len(devices) > workspace.NumCudaDevices():
        pytest.skip(f"needs {len(devices)} CUDA GPUs")
    n = len(devices)
    model = model_helper.ModelHelper(name="gpu_train")
    dpm.Parallelize_GPU(model, input_builder_fun=lambda m: None,
                        forward_pass_builder_fun=_forward, optimizer_builder_fun=_sgd,
                        devices=devices, use_nccl=use_nccl)
    batches = _data(2, n * B)
    for d in range(n):
        x, y = batches[0]
        workspace.FeedBlob(f"gpu_{d}/data", x[d * B:(d + 1) * B],
                           core.DeviceOption(caffe2_pb2.CUDA, d))
        workspace.FeedBlob(f"gpu_{d}/label", y[d * B:(d + 1) * B],
                           core.DeviceOption(caffe2_pb2.CUDA, d))
    dpm.RunInitNet(model)
    for x, y in batches:
        for d in range(n):
            workspace.FeedBlob(f"gpu_{d}/data", x[d * B:(d + 1) * B],
                               core.DeviceOption(caffe2_pb2.CUDA, d))
            workspace.FeedBlob(f"gpu_{d}/label", y[d * B:(d + 1) * B],
                               core.DeviceOption(caffe2_pb2.CUDA, d))
        workspace.RunNet(model.net)
    for p in PARAMS:
        np.testing.assert_allclose(workspace.FetchBlob(f"gpu_0/{p}"),
                                   workspace.FetchBlob(f"gpu_{n - 1}/{p}"), rtol=1e-6)


def test_nccl_ops_on_cpu_tensors(fresh_workspace):
    xs = [np.full((2, 3), float(i + 1), np.float32) for i in range(3)]
    for i, x in enumerate(xs):
        workspace.FeedBlob(f"x{i}", x)
    names = [f"x{i}" for i in range(3)]
    workspace.RunOperatorOnce(core.CreateOperator("NCCLAllreduce", names, names))
    for n in names:
        np.testing.assert_array_equal(workspace.FetchBlob(n), np.full((2, 3), 6.0))
    workspace.FeedBlob("x1", xs[1])
    workspace.RunOperatorOnce(core.CreateOperator("NCCLBroadcast", names, names, root=1))
    for n in names:
        np.testing.assert_array_equal(workspace.FetchBlob(n), xs[1])
    workspace.RunOperatorOnce(core.CreateOperator("NCCLReduce", names, ["r"]))
    np.testing.assert_array_equal(workspace.FetchBlob("r"), np.full((2, 3), 6.0))
    assert registry.get_schema("NCCLAllreduce").cpu_only_inputs  # inputs stay on their GPUs


def test_param_update_builder_and_test_model(fresh_workspace):
    """The tutorial's pattern: per-device update ops, then a forward-only test model."""
    def update(model):
        brew.add_weight_decay(model, 1e-4)
        it = brew.iter(model, "iter")
        lr = model.net.LearningRate([it], "lr", base_lr=0.1, policy="step", stepsize=1,
                                    gamma=0.5)
        for param in model.GetParams():
            grad = model.param_to_grad[param]
            mom = model.param_init_net.ConstantFill([param], param + "_momentum", value=0.0)
            model.net.MomentumSGDUpdate([grad, mom, lr, param], [grad, mom, param],
                                        momentum=0.9, nesterov=1)
    train = model_helper.ModelHelper(name="train")
    dpm.Parallelize_CPU(train, input_builder_fun=lambda m: None,
                        forward_pass_builder_fun=_forward, param_update_builder_fun=update,
                        devices=[0, 1])
    _init(train, [0, 1])
    _feed_and_run(train, [0, 1], _data(2, 2 * B))
    for p in PARAMS + ["fc1_w_momentum"]:
        np.testing.assert_array_equal(workspace.FetchBlob(f"cpu_0/{p}"),
                                      workspace.FetchBlob(f"cpu_1/{p}"))
    assert dpm.GetLearningRateBlobNames(train) == ["cpu_0/lr", "cpu_1/lr"]

    test = model_helper.ModelHelper(name="test", init_params=False)
    dpm.Parallelize_CPU(test, input_builder_fun=lambda m: None,
                        forward_pass_builder_fun=_forward, param_update_builder_fun=None,
                        devices=[0, 1])
    assert not any(op.type.endswith("Gradient") for op in _ops(test.net))
    workspace.CreateNet(test.net)
    workspace.RunNet(test.net)
    assert workspace.FetchBlob("cpu_1/softmax").shape == (B, 3)


def test_checkpoint_params_and_finalize(fresh_workspace):
    model = _parallel([0, 1])
    _init(model, [0, 1])
    names = {str(b) for b in dpm.GetCheckpointParams(model)}
    assert {f"cpu_0/{p}" for p in PARAMS} <= names and not any(n.startswith("cpu_1") for n in names)
    assert "optimizer_iteration" in names or any("iteration" in n for n in names)
    workspace.FeedBlob("cpu_0/fc1_w", np.ones((6, 5), np.float32))
    dpm.FinalizeAfterCheckpoint(model)
    np.testing.assert_array_equal(workspace.FetchBlob("cpu_1/fc1_w"), np.ones((6, 5)))
    assert dpm.GetLearningRateBlobNames(model) == [model._optimizer.get_cpu_blob_name("lr")]


def test_shared_model_keeps_one_copy_of_the_parameters(fresh_workspace):
    model = _parallel([0, 1], shared_model=True)
    _init(model, [0, 1])
    assert not any(op.output[0].startswith("cpu_1/fc") for op in _ops(model.param_init_net))
    assert "cpu_1/fc1_w" not in {n for op in _ops(model.net) for n in op.input}
    assert "cpu_0/fc1_w" in {n for op in _ops(model.net) if "cpu_1/data" in op.input
                             for n in op.input}
    before = workspace.FetchBlob("cpu_0/fc1_w")
    _feed_and_run(model, [0, 1], _data(1, 2 * B))
    assert not np.allclose(workspace.FetchBlob("cpu_0/fc1_w"), before)


def test_optimize_gradient_memory_shares_names_and_changes_nothing(fresh_workspace):
    results = []
    for share in (False, True):
        workspace.ResetWorkspace()
        torch.manual_seed(1)
        model = _parallel([0, 1], optimize_gradient_memory=share)
        _init(model, [0, 1])
        _feed_and_run(model, [0, 1], _data(2, 2 * B))
        results.append({p: workspace.FetchBlob(f"cpu_1/{p}") for p in PARAMS})
        blobs = {n for op in _ops(model.net) for n in list(op.input) + list(op.output)}
        if share:
            assert any("__m0_shared" in n for n in blobs) and "cpu_0/relu1_grad" not in blobs
            assert "cpu_0/fc1_w_grad" in blobs  # parameter gradients are never shared
    for p in PARAMS:
        np.testing.assert_array_equal(results[0][p], results[1][p])


def test_memonger_never_shares_within_one_op():
    net = core.Net("m")
    net.Relu("a_grad", "b_grad")
    net.Relu("b_grad", "c_grad")
    net.Relu("c_grad", "d_grad")
    net.Relu("d_grad", "e")
    out = memonger.share_grad_blobs(net, [], set(), "")
    pairs = [(op.input[0], op.output[0]) for op in out.op]
    # a_grad is read before written (kept); b_grad lives over ops 0-1, c_grad 1-2, d_grad 2-3:
    # d_grad takes b_grad's name, c_grad cannot (op 1 reads b_grad and writes c_grad)
    assert pairs == [("a_grad", "__m0_shared"), ("__m0_shared", "__m1_shared"),
                     ("__m1_shared", "__m0_shared"), ("__m0_shared", "e")]


def test_bmuf_averages_the_replicas(fresh_workspace):
    def update(model):
        lr = model.param_init_net.ConstantFill([], "lr", shape=[1], value=-0.1)
        one = model.param_init_net.ConstantFill([], "one", shape=[1], value=1.0)
        for param in model.GetParams():
            model.net.WeightedSum([param, one, model.param_to_grad[param], lr], param)
    model = model_helper.ModelHelper(name="bmuf")
    dpm.Parallelize_CPU_BMUF(model, lambda m: None, _forward, update, devices=[0, 1],
                             block_learning_rate=1.0, block_momentum=0.0)
    _init(model, [0, 1])
    workspace.FeedBlob("cpu_1/fc1_w", workspace.FetchBlob("cpu_0/fc1_w"))
    start = workspace.FetchBlob("cpu_0/fc1_w")
    for x, y in _data(1, 2 * B):
        for d in range(2):
            workspace.FeedBlob(f"cpu_{d}/data", x[d * B:(d + 1) * B])
            workspace.FeedBlob(f"cpu_{d}/label", y[d * B:(d + 1) * B])
    workspace.RunNet(model.net, 2)
    local = [workspace.FetchBlob(f"cpu_{d}/fc1_w") for d in range(2)]
    assert not np.allclose(local[0], local[1])
    workspace.RunNet(model._global_model_param_updates_net.Proto().name)
    want = (local[0] + local[1]) / 2  # block momentum 0, block lr 1: the average
    for d in range(2):
        np.testing.assert_allclose(workspace.FetchBlob(f"cpu_{d}/fc1_w"), want, rtol=1e-5)
    assert not np.allclose(want, start)


@pytest.mark.parametrize("kwargs,error,why", [
    ({"rendezvous": {"num_shards": 2}}, NotImplementedError, "one host"),
    ({"ideep": True}, NotImplementedError, "IDEEP"),
    ({"param_update_builder_fun": lambda m: None}, ValueError, "only one of"),
])
def test_unsupported_and_bad_arguments(kwargs, error, why):
    model = model_helper.ModelHelper(name="bad")
    with pytest.raises(error, match=why):
        dpm.Parallelize(model, lambda m: None, _forward, optimizer_builder_fun=_sgd,
                        devices=[0], cpu_device=True, **kwargs)


def test_forward_builder_must_return_losses():
    model = model_helper.ModelHelper(name="noloss")
    with pytest.raises(TypeError, match="list of loss BlobReferences"):
        dpm.Parallelize_CPU(model, lambda m: None, lambda m, s: "loss",
                            optimizer_builder_fun=_sgd, devices=[0])


def test_convert_net_for_device_and_strip_names():
    net = core.Net("plain")
    net.Relu("x", "y")
    out = dpm.ConvertNetForDevice(net, core.DeviceOption(caffe2_pb2.CPU, 2))
    assert list(out.Proto().op[0].input) == ["cpu_2/x"]
    assert dpm.stripBlobName("gpu_0/conv1_w") == "conv1_w"
    with pytest.raises(RuntimeError, match="not parallelized"):
        model_helper.ModelHelper(name="plain").GetDevices()


def _bn_forward(model, loss_scale):
    conv = brew.conv(model, "data", "conv", dim_in=2, dim_out=3, kernel=3, pad=1)
    bn = brew.spatial_bn(model, conv, "bn", 3, epsilon=1e-3, momentum=0.5, is_test=False)
    relu = brew.relu(model, bn, "relu")
    bn2 = brew.spatial_bn(model, relu, "bn2", 3, is_test=False)  # two SpatialBNs in a row
    pool = brew.average_pool(model, bn2, "pool", global_pooling=True)
    fc = brew.fc(model, pool, "fc", dim_in=3, dim_out=2)
    _, loss = model.net.SoftmaxWithLoss([fc, "label"], ["softmax", "loss"])
    return [model.net.Scale(loss, "scaled_loss", scale=loss_scale)]


def test_combine_spatial_bn_trains_like_one_device(fresh_workspace):
    """With combine_spatial_bn, SpatialBN sees the statistics of all devices' batches: two
    devices train exactly like one device on both batches (without it they do not)."""
    rng = np.random.default_rng(2)
    batches = [(rng.standard_normal((2 * B, 2, 5, 5)).astype(np.float32),
                rng.integers(0, 2, 2 * B).astype(np.int32)) for _ in range(2)]
    params = ["conv_w", "bn_s", "bn_b", "bn2_s", "fc_w", "bn_rm", "bn_riv"]
    results = {}
    for combine in (True, False):
        workspace.ResetWorkspace()
        model = model_helper.ModelHelper(name=f"bn_{combine}")
        dpm.Parallelize(model, lambda m: None, _bn_forward, optimizer_builder_fun=_sgd,
                        devices=[0, 1], cpu_device=True, combine_spatial_bn=combine)
        if combine:
            types = [op.type for op in model.net.Proto().op]
            assert types.count("ChannelStats") == 4 and types.count("ChannelBackpropStats") == 4
        _feed([0, 1], *batches[0])
        torch.manual_seed(3)  # the same initial parameters in both runs
        dpm.RunInitNet(model)
        init = {p: workspace.FetchBlob("cpu_0/" + p) for p in params}
        _feed_and_run(model, [0, 1], batches)
        results[combine] = {p: workspace.FetchBlob("cpu_1/" + p) for p in params}
        np.testing.assert_allclose(workspace.FetchBlob("cpu_0/bn_s"),
                                   results[combine]["bn_s"], rtol=1e-6)
    single = model_helper.ModelHelper(name="bn_single")
    single.AddGradientOperators(_bn_forward(single, 1.0))
    _sgd(single)
    workspace.RunNetOnce(single.param_init_net)
    for p in params:
        workspace.FeedBlob(p, init[p])
    for i, (x, y) in enumerate(batches):
        workspace.FeedBlob("data", x)
        workspace.FeedBlob("label", y)
        if i == 0:
            workspace.CreateNet(single.net)
        workspace.RunNet(single.net)
    for p in params:
        np.testing.assert_allclose(results[True][p], workspace.FetchBlob(p), rtol=1e-4,
                                   atol=1e-5)
    assert not np.allclose(results[False]["conv_w"], workspace.FetchBlob("conv_w"), atol=1e-5)


def test_image_input_pipeline_on_two_devices(fresh_workspace):
    """The Multi-GPU tutorial's pipeline, small: a shared LMDB reader, brew.image_input and
    StopGradient per device, a conv net, MomentumSGD updates, accuracy per device."""
    import io
    from PIL import Image
    from caffe2torch.db import open_db

    rng = np.random.default_rng(0)
    path = str(fresh_workspace / "images")
    with open_db("lmdb", path, "new") as db:
        txn = db.new_transaction()
        for i in range(8):
            label = i % 2
            img = np.full((12, 14, 3), 40 if label else 200, np.uint8)
            img += rng.integers(0, 30, img.shape, dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG")
            protos = caffe2_pb2.TensorProtos()
            p = protos.protos.add()
            p.data_type = caffe2_pb2.TensorProto.STRING
            p.string_data.append(buf.getvalue())
            p = protos.protos.add()
            p.data_type = caffe2_pb2.TensorProto.INT32
            p.int32_data.append(label)
            txn.put(b"%08d" % i, protos.SerializeToString())
        txn.commit()
    model = model_helper.ModelHelper(name="images")
    reader = model.CreateDB("reader", db=path, db_type="lmdb")

    def add_input(m):
        data, _ = brew.image_input(m, reader, ["data", "label"], batch_size=2, mean=128.,
                                   std=128., scale=10, crop=8, is_test=False, mirror=1)
        m.net.StopGradient(data, data)

    def add_forward(m, loss_scale):
        conv = brew.conv(m, "data", "conv", 3, 4, kernel=3)
        pool = brew.average_pool(m, brew.relu(m, conv, "relu"), "pool", global_pooling=True)
        softmax, loss = m.net.SoftmaxWithLoss([brew.fc(m, pool, "fc", 4, 2), "label"],
                                              ["softmax", "loss"])
        brew.accuracy(m, [softmax, "label"], "accuracy")
        return [m.net.Scale(loss, "scaled_loss", scale=loss_scale)]

    def add_updates(m):
        lr = m.param_init_net.ConstantFill([], "lr", shape=[1], value=0.1)  # param -= lr·g
        for param in m.GetParams():
            mom = m.param_init_net.ConstantFill([param], param + "_momentum", value=0.0)
            m.net.MomentumSGDUpdate([m.param_to_grad[param], mom, lr, param],
                                    [m.param_to_grad[param], mom, param], momentum=0.9)

    torch.manual_seed(0)
    dpm.Parallelize_CPU(model, input_builder_fun=add_input, forward_pass_builder_fun=add_forward,
                        param_update_builder_fun=add_updates, devices=[0, 1],
                        optimize_gradient_memory=True)
    workspace.RunNetOnce(model.param_init_net)
    workspace.CreateNet(model.net)
    labels = []
    for _ in range(20):
        workspace.RunNet(model.net)
        labels.append([workspace.FetchBlob(f"cpu_{d}/label").tolist() for d in range(2)])
    assert workspace.FetchBlob("cpu_0/data").shape == (2, 3, 8, 8)
    assert labels[0] == [[0, 1], [0, 1]] and len({str(x) for x in labels}) == 1
    np.testing.assert_array_equal(workspace.FetchBlob("cpu_0/conv_w"),
                                  workspace.FetchBlob("cpu_1/conv_w"))
    assert [float(workspace.FetchBlob(f"cpu_{d}/accuracy")) for d in range(2)] == [1.0, 1.0]


def test_extract_predictor_net_from_a_test_model(fresh_workspace):
    test = model_helper.ModelHelper(name="extract", init_params=False)

    def forward(m, loss_scale):
        fc = brew.fc(m, "data", "fc1", dim_in=5, dim_out=3)
        brew.softmax(m, fc, "softmax")
        return []
    dpm.Parallelize_CPU(test, lambda m: None, forward, devices=[0, 1])
    net, params = dpm.ExtractPredictorNet(test, ["data"], ["softmax"],
                                          core.DeviceOption(caffe2_pb2.CPU, 0))
    assert [op.type for op in net.Proto().op] == ["FC", "Softmax"]
    assert list(net.Proto().op[0].input) == ["data", "cpu_0/fc1_w", "cpu_0/fc1_b"]
    assert list(net.Proto().op[1].output) == ["softmax"]
    assert params == ["cpu_0/fc1_b", "cpu_0/fc1_w"]
    train = _parallel([0, 1])
    with pytest.raises(ValueError, match="is_test=0"):
        brew.spatial_bn(train, "cpu_0/fc2", "cpu_0/bn", 3, is_test=False)
        model_helper.ExtractPredictorNet(train.net.Proto(), ["cpu_0/fc2"], ["cpu_0/bn"])


def test_gpu_device_type_names():
    assert workspace.GpuDeviceType == caffe2_pb2.CUDA
    assert core.IsGPUDeviceType(caffe2_pb2.CUDA) and core.IsGPUDeviceType(caffe2_pb2.HIP)
    assert not core.IsGPUDeviceType(caffe2_pb2.CPU)
