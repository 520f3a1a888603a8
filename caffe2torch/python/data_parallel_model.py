"""Caffe2's ``data_parallel_model``: one model replicated on several devices of one host, trained
with synchronous SGD.

Parallelize builds, for each device d, the input and forward ops under ``DeviceScope(d)`` and
``NameScope("gpu_<d>")`` (``cpu_<d>`` for CPU devices), the backward pass, then an all-reduce of
every gradient: Caffe2's Sum on the first device followed by a Copy back to the others (or, on
GPUs with ``use_nccl=True``, one NCCLAllreduce op), then each device's parameter update. The
forward builder gets ``loss_scale = 1 / len(devices)`` to scale its loss with, so the summed
gradient is the gradient of the mean loss over the whole batch: N devices with batch B train like
one device with batch N·B. The init net ends with Copies of every parameter from the first device
to the others, so all replicas start equal. Example::

    def add_input(model):      # the reader is created outside, shared by the devices
        brew.image_input(model, reader, ["data", "label"], batch_size=32, scale=256, crop=224,
                         is_test=False)
    def add_forward(model, loss_scale):
        softmax, loss = resnet.create_resnet50(model, "data", 3, 2, label="label")
        return [model.net.Scale(loss, "scaled_loss", scale=loss_scale)]
    def add_updates(model):
        optimizer.build_sgd(model, base_learning_rate=0.1)
    data_parallel_model.Parallelize(model, input_builder_fun=add_input,
                                    forward_pass_builder_fun=add_forward,
                                    optimizer_builder_fun=add_updates, devices=[0, 1],
                                    cpu_device=True)
    data_parallel_model.RunInitNet(model)
    workspace.RunNet(model.net)

Single host only: a ``rendezvous`` (Gloo/MPI across machines) raises NotImplementedError, as do
``dynamic_memory_management`` and IDEEP devices.
"""
import copy
import logging
import os
import warnings
from collections import OrderedDict

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, memonger, model_helper, scope, utils, workspace

log = logging.getLogger("data_parallel_model")

_DEFAULT_BARRIER_NET_TIMEOUT_SEC = 300
_SINGLE_HOST = ("caffe2torch's data_parallel_model runs on one host: rendezvous (multi-host "
                "Gloo/MPI training) is not supported; pass rendezvous=None")


def Parallelize_GPU(*args, **kwargs):
    """Parallelize on GPUs (``cpu_device=False``)."""
    kwargs["cpu_device"] = False
    Parallelize(*args, **kwargs)


def Parallelize_CPU(*args, **kwargs):
    """Parallelize on CPU devices (``cpu_device=True``)."""
    kwargs["cpu_device"] = True
    Parallelize(*args, **kwargs)


def Parallelize_iDeep(*args, **kwargs):
    """IDEEP (MKL-DNN) devices are C++-only: raises NotImplementedError."""
    raise NotImplementedError("IDEEP devices are not supported by caffe2torch; use "
                              "Parallelize_CPU (PyTorch picks its own CPU kernels)")


def _device_setup(model, devices, cpu_device, shared_model):
    if cpu_device:
        model._device_type, model._device_prefix = caffe2_pb2.CPU, "cpu"
        if devices is None:
            devices = list(range(os.cpu_count() or 1))
    else:
        if shared_model:
            raise ValueError("Parallelize: shared_model is only supported on CPU devices "
                             "(cpu_device=True)")
        model._device_type, model._device_prefix = caffe2_pb2.CUDA, "gpu"
        if devices is None:
            devices = list(range(workspace.NumCudaDevices()))
        if any(d >= workspace.NumCudaDevices() for d in devices):
            log.warning("** Only %d GPUs available, GPUs %s requested",
                        workspace.NumCudaDevices(), list(devices))
    devices = list(devices)
    if not devices:
        raise ValueError("Parallelize: no devices (PyTorch sees no GPU); pass devices=[...] or "
                         "use Parallelize_CPU")
    return devices


def Parallelize(model_helper_obj, input_builder_fun, forward_pass_builder_fun,
                param_update_builder_fun=None, optimizer_builder_fun=None,
                post_sync_builder_fun=None, pre_grad_net_transformer_fun=None,
                net_transformer_fun=None, devices=None, rendezvous=None, net_type="dag",
                broadcast_computed_params=True, optimize_gradient_memory=False,
                dynamic_memory_management=False, blobs_to_keep=None, use_nccl=False,
                max_concurrent_distributed_ops=16, cpu_device=False, ideep=False,
                num_threads_per_device=4, shared_model=False, combine_spatial_bn=False,
                barrier_net_timeout_sec=_DEFAULT_BARRIER_NET_TIMEOUT_SEC):
    """Replicate the model built by the builder functions on ``devices``, with gradient
    all-reduce and initial parameter broadcast (see the module docstring)."""
    model = model_helper_obj
    if not isinstance(model, model_helper.ModelHelper):
        raise TypeError("Parallelize needs a model_helper.ModelHelper, not "
                        f"{type(model).__name__}")
    current = scope.CurrentDeviceScope()
    if current is not None and current.device_type != caffe2_pb2.CPU:
        raise ValueError(f"Parallelize must be called without a device scope, not in {current}")
    if rendezvous is not None:
        raise NotImplementedError(_SINGLE_HOST)
    if ideep:
        Parallelize_iDeep()
    if dynamic_memory_management:
        raise NotImplementedError("dynamic_memory_management (memonger.release_blobs_when_used)"
                                  " is not supported; PyTorch frees a tensor when its blob is "
                                  "overwritten")
    has_updates = param_update_builder_fun is not None or optimizer_builder_fun is not None
    if param_update_builder_fun is not None and optimizer_builder_fun is not None:
        raise ValueError("Parallelize: give only one of param_update_builder_fun and "
                         "optimizer_builder_fun")
    devices = _device_setup(model, devices, cpu_device, shared_model)
    log.info("Parallelizing model for devices: %s", devices)
    model.net.Proto().num_workers = len(devices) * num_threads_per_device
    model.net.Proto().type = net_type
    model._devices = devices
    model._rendezvous = None
    model._sync_barrier_net = None
    model._broadcast_context = None
    model._grad_names = []
    model._optimizer = None
    model._shared_model = bool(shared_model)
    model._data_parallel_model_init_nets = [model.param_init_net]
    model._data_parallel_model_nets = [model.net]
    if not has_updates and model.init_params:
        log.warning("Model %s is used for testing/validation but has init_params=True: its "
                    "init net can overwrite the trained parameters; use "
                    "ModelHelper(init_params=False)", model.name)

    # Params created before Parallelize are not data parallel.
    non_datapar_params = copy.copy(model.params)
    losses_by_device = {}
    loss_scale = 1.0 / len(devices)
    for device in devices:
        with _device_scope(model, device):
            input_builder_fun(model)
            losses = forward_pass_builder_fun(model, loss_scale)
            if has_updates:
                if not isinstance(losses, list) or not all(
                        isinstance(loss, core.BlobReference) for loss in losses):
                    raise TypeError("forward_pass_builder_fun must return a list of loss "
                                    f"BlobReferences, got {losses!r}")
            losses_by_device[device] = losses
    _ValidateParams(model.params)
    model._device_grouped_blobs = _GroupByDevice(model, devices, model.params,
                                                 non_datapar_params)
    computed = _GroupByDevice(model, devices, model.GetComputedParams(""), [])
    model._device_grouped_blobs.update(computed)
    model._param_names = list(model._device_grouped_blobs)
    model._computed_param_names = list(computed)

    if pre_grad_net_transformer_fun:
        pre_grad_net_transformer_fun(model)
    if has_updates:
        _AddGradientOperators(devices, model, losses_by_device)
    if net_transformer_fun:
        net_transformer_fun(model, len(devices), model._device_prefix, model._device_type)
    if not has_updates:
        log.info("Parameter update function not defined --> only forward")
        _InferBlobDevice(model)
        return

    if combine_spatial_bn:
        # SpatialBN statistics (and their gradients) over all the devices' batches
        _InterleaveOps(model)
        _InterDeviceBatchNormalization(model, cpu_device)
    _ValidateParams(model.params)
    param_to_grad = model.param_to_grad
    grads_ordered = [param_to_grad[p] for p in model.params if p in param_to_grad]
    non_datapar_grads = [param_to_grad[p] for p in non_datapar_params if p in param_to_grad]
    grads = _GroupByDevice(model, devices, grads_ordered, non_datapar_grads)
    model._device_grouped_blobs.update(grads)
    model._grad_names = list(grads)
    model._losses_by_gpu = losses_by_device
    _InferBlobDevice(model)

    if broadcast_computed_params:
        _BroadcastComputedParams(devices, model, use_nccl)
    if model._grad_names:
        _AllReduceBlobs(list(reversed(model._grad_names)), devices, model, model.net, use_nccl)
    else:
        log.info("NOTE: Param builder function did not create any parameters.")

    all_params = set(model.GetParams(""))
    if shared_model:
        _PruneParametersForSharing(model)
    if param_update_builder_fun is not None:
        for device in devices:
            with _device_scope(model, device):
                param_update_builder_fun(model)
    else:
        model._optimizer = optimizer_builder_fun(model)

    sync_blobs, sync_names = _ComputeBlobsToSync(model)
    model._device_grouped_blobs.update(_GroupByDevice(model, devices, sync_blobs, []))
    _InferBlobDevice(model)
    _AnalyzeOperators(model)
    model.Proto().arg.add().CopyFrom(utils.MakeArgument("first_iter_only_one_worker", 1))

    # Every replica starts from the first device's initial values.
    _SyncAllParams(devices, model, model.param_init_net, sync_names)
    if post_sync_builder_fun is not None:
        for device in devices:
            with _device_scope(model, device):
                post_sync_builder_fun(model)
    if optimize_gradient_memory:
        for device in devices:
            model.net._net = memonger.share_grad_blobs(
                model.net, losses_by_device[device], set(model.param_to_grad.values()),
                f"{model._device_prefix}_{device}/", share_activations=False)
    if shared_model:
        _RemapParameterBlobsForSharedModel(model, all_params)


class _device_scope:
    """DeviceScope(device) and NameScope("<prefix>_<device>") together."""

    def __init__(self, model, device):
        self._device = scope.DeviceScope(core.DeviceOption(model._device_type, device))
        self._name = scope.NameScope(f"{model._device_prefix}_{device}")

    def __enter__(self):
        self._device.__enter__()
        self._name.__enter__()

    def __exit__(self, *exc):
        self._name.__exit__(*exc)
        self._device.__exit__(*exc)


def _AddGradientOperators(devices, model, losses_by_device):
    # Each device's loss gradient (1.0) is made on that device.
    loss_grad = {}
    for device in devices:
        with scope.DeviceScope(core.DeviceOption(model._device_type, device)):
            for loss in losses_by_device[device]:
                grad = model.net.ConstantFill(loss, str(loss) + "_grad", value=1.0)
                loss_grad[str(loss)] = str(grad)
    model.AddGradientOperators(loss_grad)


# --- running ------------------------------------------------------------------------------------

def CreateNet(model, overwrite=False):
    """CreateNet each of the model's nets."""
    for net in model._data_parallel_model_nets:
        workspace.CreateNet(net[0] if isinstance(net, tuple) else net, overwrite=overwrite)


def RunInitNet(model):
    """Run the init nets once (parameters, then their broadcast), then create the nets."""
    for init_net in model._data_parallel_model_init_nets:
        workspace.RunNetOnce(init_net)
    CreateNet(model)


def RunWarmup(model):
    """BMUF warm-up: run the net ``warmup_iterations`` times, then broadcast the parameters."""
    workspace.RunNet(model.net, model._warmup_iterations)
    workspace.RunNetOnce(model._warmup_broadcast)


def RunNet(model, num_iterations):
    """Run the model's net ``num_iterations`` times (then BMUF's global update net once)."""
    for net in model._data_parallel_model_nets:
        if isinstance(net, tuple):
            workspace.RunNet(net[0].Proto().name, net[1])
        else:
            workspace.RunNet(net, num_iterations)


def Synchronize(model, timeout_sec=_DEFAULT_BARRIER_NET_TIMEOUT_SEC):
    """Deprecated in Caffe2; a single host has nothing to wait for."""
    warnings.warn("The Synchronize API has been deprecated (and one host needs no barrier)",
                  category=DeprecationWarning, stacklevel=2)


# --- blob groups and devices --------------------------------------------------------------------

def stripBlobName(param):
    """``gpu_0/conv1_w`` -> ``conv1_w`` (a GradientSlice: ``indices:values``)."""
    if isinstance(param, core.GradientSlice):
        return stripBlobName(param.indices) + ":" + stripBlobName(param.values)
    name = str(param)
    return name[name.index(scope._NAMESCOPE_SEPARATOR) + 1:]


stripParamName = stripBlobName  # Caffe2's older name


def _device_of(model, blob):
    """The device id in ``<prefix>_<id>/...``; raises if the blob is not device scoped."""
    name = str(blob)
    prefix = model._device_prefix + "_"
    head = name.split(scope._NAMESCOPE_SEPARATOR, 1)[0]
    if not head.startswith(prefix) or not head[len(prefix):].isdigit():
        raise ValueError(f"blob {name!r} was expected to have the name scope "
                         f"'{prefix}<device>/' (create parameters inside the builder functions)")
    return int(head[len(prefix):])


def _GroupByDevice(model, devices, params, non_data_params):
    """{stripped name: {device: blob}} for the data-parallel ``params``, in their order."""
    grouped = OrderedDict()
    for p in params[len(non_data_params):]:
        if isinstance(p, core.GradientSlice):
            device = _device_of(model, p.indices)
            if _device_of(model, p.values) != device:
                raise ValueError(f"GradientSlice {p}: indices and values on different devices")
        elif isinstance(p, core.BlobReference):
            device = _device_of(model, p)
        else:
            raise TypeError(f"param {p!r} is not a BlobReference or GradientSlice")
        grouped.setdefault(stripBlobName(p), {})[device] = p
    return grouped


def _ValidateParams(params):
    names = [str(p) for p in params]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Duplicate entries in params: {dupes}")


def _InferBlobDevice(model):
    """blob -> DeviceOption of the first op that reads or writes it (Iter's counter: CPU)."""
    mapping = {}

    def map_ops(proto):
        for op in proto.op:
            option = op.device_option
            if op.type == "Iter":
                option = caffe2_pb2.DeviceOption()
                option.device_type = caffe2_pb2.CPU
            for b in list(op.input) + list(op.output):
                mapping.setdefault(b, option)
    map_ops(model.param_init_net.Proto())
    map_ops(model.net.Proto())
    model._blob_to_device = mapping


def _IsGPUBlob(model, blob_name):
    option = model._blob_to_device.get(blob_name)
    if option is None:
        option = model._blob_to_device.get(
            f"{model._device_prefix}_{model._devices[0]}/{blob_name}")
    if option is None:
        return model._device_type == caffe2_pb2.CUDA
    return option.device_type in (caffe2_pb2.CUDA, caffe2_pb2.HIP)


def _AnalyzeOperators(model):
    """Each GPU op may only touch blobs of its own device's name scope (Copies and Sums aside)."""
    for op in model.Proto().op:
        if "NCCL" in op.type or "Copy" in op.type or "Concat" in op.type:
            continue
        if op.type == "Sum" and op.name == "dpm":
            continue
        if op.device_option.device_type not in (caffe2_pb2.CUDA, caffe2_pb2.HIP):
            continue
        namescope = f"{model._device_prefix}_{op.device_option.cuda_gpu_id}/"
        for blob in list(op.input) + list(op.output):
            if blob.startswith(model._device_prefix + "_") and not blob.startswith(namescope):
                raise ValueError(f"Blob {blob} of op {op.type} should have namescope "
                                 f"{namescope}")


def _ComputeBlobsToSync(model):
    """The device-scoped outputs of the init net (sorted by device, name) and their names."""
    if model._shared_model:
        blobs = [str(p) for p in model.GetComputedParams("")]
        names = {stripBlobName(b) for b in blobs}
    else:
        blobs, names = [], set()
        for op in model.param_init_net.Proto().op:
            outs = [o for o in op.output if o.startswith(model._device_prefix + "_")]
            names.update(stripBlobName(o) for o in outs)
            blobs.extend(outs)
        missing = set(model._param_names) - names
        if missing:
            raise ValueError(f"Some params not instantiated in param init net: {sorted(missing)}")
    blobs = sorted(set(blobs), key=lambda b: (_device_of(model, b), b))
    return [core.BlobReference(b) for b in blobs], sorted(names)


# --- SpatialBN across devices (combine_spatial_bn) ----------------------------------------------

def _InterleaveOps(model):
    """Reorder the net so the devices' j-th ops sit together (like shuffling decks of cards),
    which lets each SpatialBN wait for the statistics of all devices."""
    ops = list(model.net.Proto().op)
    per_device = {d: [] for d in model._devices}
    for op in ops:
        per_device[op.device_option.cuda_gpu_id].append(op)
    count = len(ops) // len(model._devices)
    if any(len(v) != count for v in per_device.values()) or count * len(model._devices) != len(ops):
        raise ValueError("combine_spatial_bn: the devices' nets differ in length; build every "
                         "device's ops in the builder functions")
    new_ops = []
    for j in range(count):
        kinds = {per_device[d][j].type for d in model._devices}
        if len(kinds) != 1:
            raise ValueError(f"combine_spatial_bn: op {j} differs across devices: {sorted(kinds)}")
        new_ops.extend(per_device[d][j] for d in model._devices)
    del model.net.Proto().op[:]
    model.net.Proto().op.extend(new_ops)


def _InterDeviceBatchNormalization(model, cpu_device):
    """Each run of SpatialBN ops (one per device) gets ChannelStats sums combined on the first
    device (CPU) or on the host (GPU, through copies); each SpatialBNGradient run gets its
    ChannelBackpropStats summed the same way (Caffe2's _CPU/_GPUInterDeviceBatchNormalization)."""
    num_devices = len(model._devices)
    new_ops, pending, kind = [], [], None

    def reduce(param, blobs, results):
        """Sum ``blobs`` (one per device) and copy the sum into ``results``."""
        if cpu_device:
            combined = f"cpu_0/{param}_combined"
            out = [core.CreateOperator("Sum", blobs, combined)]
            return out + [core.CreateOperator("Copy", combined, r) for r in results]
        host = core.DeviceOption(caffe2_pb2.CPU)
        copies = [f"cpu_0/{param}_gpu_{d}_copy" for d in model._devices]
        out = [core.CreateOperator("CopyGPUToCPU", b, c,
                                   device_option=core.DeviceOption(model._device_type, d))
               for b, c, d in zip(blobs, copies, model._devices)]
        out.append(core.CreateOperator("Sum", copies, f"cpu_0/{param}_combined",
                                       device_option=host))
        return out + [core.CreateOperator("CopyCPUToGPU", f"cpu_0/{param}_combined", r,
                                          device_option=core.DeviceOption(model._device_type, d))
                      for r, d in zip(results, model._devices)]

    def flush():
        if kind == "SpatialBN":
            first = pending[0].input[0]
            sums, sumsq, stats = [], [], []
            for op in pending:
                name = op.input[0]
                stats.append(core.CreateOperator("ChannelStats", name,
                                                 [name + "_sums", name + "_sumsq"],
                                                 device_option=op.device_option))
                sums.append(name + "_sums")
                sumsq.append(name + "_sumsq")
            new_ops.extend(stats)
            if cpu_device:  # every device reads the first device's combined sums
                sums_to = [first + "_sums_combined"] * num_devices
                sumsq_to = [first + "_sumsq_combined"] * num_devices
                new_ops.append(core.CreateOperator("Sum", sums, sums_to[0]))
                new_ops.append(core.CreateOperator("Sum", sumsq, sumsq_to[0]))
            else:  # summed on the host, copied back to each GPU
                stem = stripBlobName(first)
                sums_to = [f"gpu_{d}/{stem}_sums_combined" for d in model._devices]
                sumsq_to = [f"gpu_{d}/{stem}_sumsq_combined" for d in model._devices]
                new_ops.extend(reduce(stem + "_sums", sums, sums_to)
                               + reduce(stem + "_sumsq", sumsq, sumsq_to))
            for op, a, b in zip(pending, sums_to, sumsq_to):
                op.input.extend([a, b])
                op.arg.add().CopyFrom(utils.MakeArgument("num_batches", num_devices))
        else:
            stats, scale_grads, bias_grads = [], [], []
            for op in pending:
                stats.append(core.CreateOperator(
                    "ChannelBackpropStats", [op.input[0], op.input[3], op.input[4], op.input[2]],
                    [op.output[1], op.output[2]], device_option=op.device_option))
                scale_grads.append(op.output[1])
                bias_grads.append(op.output[2])
            new_ops.extend(stats + reduce(stripBlobName(scale_grads[0]), scale_grads,
                                          scale_grads)
                           + reduce(stripBlobName(bias_grads[0]), bias_grads, bias_grads))
            for op in pending:
                op.arg.add().CopyFrom(utils.MakeArgument("num_batches", num_devices))
                op.input.extend([op.output[1], op.output[2]])
        new_ops.extend(pending)

    for op in list(model.net.Proto().op):
        if op.type in ("SpatialBN", "SpatialBNGradient") and \
                any(a.name == "is_test" and a.i for a in op.arg):
            op_kind = None  # test-mode SpatialBN uses its running statistics
        else:
            op_kind = op.type if op.type in ("SpatialBN", "SpatialBNGradient") else None
        if op_kind != kind or (op_kind and len(pending) == num_devices):
            if kind:
                flush()
            pending, kind = [], op_kind
        if op_kind:
            pending.append(op)
        else:
            new_ops.append(op)
    if kind:
        flush()
    del model.net.Proto().op[:]
    model.net.Proto().op.extend(new_ops)


# --- collectives --------------------------------------------------------------------------------

def _Broadcast(devices, model, net, param, use_nccl=False):
    """Copy the first device's ``param`` to the other devices (or one NCCLBroadcast)."""
    group = model._device_grouped_blobs[param]
    master = devices[0]
    if use_nccl and _IsGPUBlob(model, param):
        with scope.DeviceScope(core.DeviceOption(model._device_type, master)):
            # root is a rank (the first blob), not a device id
            net.NCCLBroadcast(list(group.values()), list(group.values()), root=0)
        return
    for device in devices[1:]:
        option = (core.DeviceOption(model._device_type, device) if _IsGPUBlob(model, param)
                  else core.DeviceOption(caffe2_pb2.CPU, 0))
        with scope.DeviceScope(option):
            net.Copy(group[master], group[device])


def _AllReduce(devices, model, net, param, use_nccl=False, control_input=None):
    """Sum ``param`` over the devices into the first one (a tree for 4, 8, 16), broadcast."""
    group = list(model._device_grouped_blobs[param].values())
    if model._device_type == caffe2_pb2.CUDA and use_nccl:
        model.net.NCCLAllreduce(group, group, control_input=control_input)
        return
    peer = workspace.GetGpuPeerAccessPattern() if model._device_type == caffe2_pb2.CUDA else None

    def sum_n(*indices):
        devs = [model._devices[i] for i in indices]
        blobs = [group[i] for i in indices]
        with scope.DeviceScope(core.DeviceOption(model._device_type, devs[0])):
            for i, other in enumerate(devs[1:], 1):
                if peer is not None and peer.size and not peer[devs[0], other]:
                    blobs[i] = net.Copy(blobs[i], f"gpu_{devs[0]}/{param}_gpu{other}_copy")
            net.Sum(blobs, [blobs[0]], name="dpm")

    n = len(devices)
    if n in (4, 8, 16):  # Caffe2's pairwise trees
        step = 1
        while step < n:
            for j in range(0, n, 2 * step):
                sum_n(j, j + step)
            step *= 2
    else:
        sum_n(*range(n))
    _Broadcast(devices, model, net, param)


def _AllReduceBlobs(blob_names, devices, model, net, use_nccl):
    """All-reduce each blob group: GPU Sum/Copy or NCCL; CPU Sum then Copy; slices gathered."""
    if len(devices) == 1:
        return
    master_option = core.DeviceOption(model._device_type, devices[0])
    last_out = None
    concatenated = set()
    for name in blob_names:
        group = list(model._device_grouped_blobs[name].values())
        if len(group) == 1:
            continue
        if len(group) != len(devices):
            raise ValueError(f"Each device of {devices} should have a copy of {name}")
        if isinstance(group[0], core.GradientSlice):
            with scope.DeviceScope(master_option):
                _GatherSlices(model, net, devices, name, concatenated)
        elif _IsGPUBlob(model, name):
            with scope.DeviceScope(master_option):
                _AllReduce(devices, model, net, name, use_nccl, last_out)
                last_out = group[0]  # serializes the NCCL ops, as in Caffe2
        else:
            with scope.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
                net.Sum(group, [group[0]])  # Caffe2's "poor man's allreduce"
                if not model._shared_model:
                    _Broadcast(devices, model, net, name)


def _GatherSlices(model, net, devices, name, concatenated):
    """Sparse gradients: every device gets all devices' indices and values (Concat + Copy)."""
    grouped = model._device_grouped_blobs[name]
    group = list(grouped.values())
    master_ns = f"{model._device_prefix}_{devices[0]}"
    if not any(str(g.indices) in concatenated for g in group):
        idx, _ = net.Concat([g.indices for g in group],
                            [f"{master_ns}/{name}_index_concat",
                             f"{master_ns}/{name}_index_splitinfo"],
                            axis=0, name="note:data_parallel_model")
        for device, g in grouped.items():
            with scope.DeviceScope(core.DeviceOption(model._device_type, device)):
                net.Copy(idx, g.indices)
            concatenated.add(str(g.indices))
    val, _ = net.Concat([g.values for g in group],
                        [f"{master_ns}/{name}_val_concat", f"{master_ns}/{name}_val_splitinfo"],
                        axis=0, name="note:data_parallel_model")
    for device, g in grouped.items():
        with scope.DeviceScope(core.DeviceOption(model._device_type, device)):
            net.Copy(val, g.values)


def _BroadcastComputedParams(devices, model, use_nccl=False):
    # Caffe2 copies rather than averages (its NCCL all-reduce was prone to deadlock).
    if len(devices) == 1:
        return
    for name in model._computed_param_names:
        _Broadcast(devices, model, model.net, name, use_nccl)


def _SyncAllParams(devices, model, net, unique_param_names):
    for name in sorted(unique_param_names):
        _Broadcast(devices, model, net, name)


def AddBlobSync(model, blobs, net=None):
    """Copy the first device's ``blobs`` (unprefixed names) to the other devices in ``net``."""
    if not blobs:
        return
    net = model.net if net is None else net
    for b in blobs:
        if b.startswith(model._device_prefix):
            raise ValueError(f"Provide unprefixed blob name: {b}")
        model._device_grouped_blobs[b] = {
            d: core.BlobReference(f"{model._device_prefix}_{d}/{b}") for d in model._devices}
    _SyncAllParams(model._devices, model, net, set(blobs))


def AddDistributedBlobSync(model, blobs):
    """Across machines only: nothing to do on one host."""
    if model._rendezvous is not None:
        raise NotImplementedError(_SINGLE_HOST)


# --- shared model (CPU) -------------------------------------------------------------------------

def _PruneParametersForSharing(model):
    """Keep only the first device's parameters, so only they get update ops."""
    master_prefix = f"{model._device_prefix}_{model._devices[0]}/"
    model.params = model.GetParams(master_prefix)
    kept = set(model.params)
    model.param_to_grad = {p: g for p, g in model.param_to_grad.items() if p in kept}
    model.weights = [w for w in model.weights if w in kept]
    model.biases = [b for b in model.biases if b in kept]


def _RemapParameterBlobsForSharedModel(model, all_params):
    """Every device reads the first device's parameters; the others' copies are not made."""
    master_prefix = f"{model._device_prefix}_{model._devices[0]}/"
    all_names = {str(p) for p in all_params}
    master = {str(p) for p in model.GetParams("")}

    def modify(net):
        ops = []
        for op in net.Proto().op:
            if any(o in all_names and o not in master for o in op.output):
                continue
            for j, name in enumerate(op.input):
                if name in all_names and name not in master:
                    op.input[j] = master_prefix + stripBlobName(name)
            ops.append(op)
        del net.Proto().op[:]
        net.Proto().op.extend(ops)
    modify(model.param_init_net)
    modify(model.net)


# --- checkpoints, learning rates, predictor -----------------------------------------------------

def GetCheckpointParams(model):
    """The blobs a complete checkpoint needs: the first device's synced blobs and the counters."""
    blobs, _ = _ComputeBlobsToSync(model)
    first = f"{model._device_prefix}_{model._devices[0]}/"
    result = {b for b in blobs if str(b).startswith(first)}
    for op in model.net.Proto().op:
        if op.type in ("Iter", "AtomicIter") and \
                not op.output[0].startswith(model._device_prefix + "_"):
            result.add(core.BlobReference(op.output[0]))
    return result


def FinalizeAfterCheckpoint(model, blobs=None, cpu_mode=False):
    """After loading a checkpoint into the first device: copy those blobs to the others."""
    if not hasattr(model, "_checkpoint_net"):
        if blobs is None:
            _, names = _ComputeBlobsToSync(model)
        else:
            names = [stripBlobName(b) for b in blobs]
        devices = model.GetDevices()
        for name in names:
            if name not in model._device_grouped_blobs:
                model._device_grouped_blobs[name] = {
                    d: core.BlobReference(f"{model._device_prefix}_{d}/{name}") for d in devices}
        model._checkpoint_net = core.Net("checkpoint_sync_net")
        if not cpu_mode and model._device_type == caffe2_pb2.CUDA:
            model._checkpoint_net.RunAllOnGPU()
        _SyncAllParams(devices, model, model._checkpoint_net, names)
        workspace.CreateNet(model._checkpoint_net)
    log.info("Run checkpoint net")
    workspace.RunNet(model._checkpoint_net.Proto().name)


def GetLearningRateBlobNames(model):
    """The learning-rate blobs: the optimizer's (one on CPU, one per GPU) or LearningRate's."""
    if model._optimizer is not None:
        if model._device_type == caffe2_pb2.CPU:
            return [model._optimizer.get_cpu_blob_name("lr")]
        return [model._optimizer.get_gpu_blob_name("lr", d, "") for d in model._devices]
    return [op.output[0] for op in model.net.Proto().op if op.type == "LearningRate"]


def ConvertNetForDevice(net, device=None):
    """A copy of ``net`` with every blob in ``<prefix>_<id>/`` and every op on ``device``."""
    mnet = copy.deepcopy(net)
    device = scope.CurrentDeviceScope() if device is None else device
    if device is None:
        device = core.DeviceOption(caffe2_pb2.CPU, 0)
    prefix = "gpu" if device.device_type in (caffe2_pb2.CUDA, caffe2_pb2.HIP) else "cpu"
    namescope = f"{prefix}_{device.cuda_gpu_id}/"
    proto = mnet.Proto()
    for op in proto.op:
        if "RecurrentNetwork" in op.type:
            raise NotImplementedError("RecurrentNetwork conversion not yet supported")
        op.input[:] = [namescope + b for b in op.input]
        op.output[:] = [namescope + b for b in op.output]
        op.control_input[:] = [namescope + b for b in op.control_input]
        op.device_option.CopyFrom(device)
    proto.external_input[:] = [namescope + b for b in proto.external_input]
    proto.external_output[:] = [namescope + b for b in proto.external_output]
    return mnet


def ExtractPredictorNet(model, inputs, outputs, device):
    """(predict net, params) of the first device's copy, with the device prefix dropped from
    ``inputs`` and ``outputs``; build it from a test model (is_test ops)."""
    prefix = f"{model._device_prefix}_{model._devices[0]}/"
    prefixed_in = [prefix + str(b) for b in inputs]
    prefixed_out = [prefix + str(b) for b in outputs]
    return model_helper.ExtractPredictorNet(
        net_proto=model.net.Proto(), input_blobs=prefixed_in, output_blobs=prefixed_out,
        device=device, renames=dict(zip(prefixed_in + prefixed_out,
                                        [str(b) for b in list(inputs) + list(outputs)])))


def GetDevices(model):
    """The devices ``model`` was parallelized on."""
    return model.GetDevices()


# --- BMUF ---------------------------------------------------------------------------------------

def Parallelize_GPU_BMUF(*args, **kwargs):
    """Parallelize_BMUF on GPUs."""
    kwargs["cpu_device"] = False
    Parallelize_BMUF(*args, **kwargs)


def Parallelize_CPU_BMUF(*args, **kwargs):
    """Parallelize_BMUF on CPU devices."""
    kwargs["cpu_device"] = True
    Parallelize_BMUF(*args, **kwargs)


def Parallelize_BMUF(model_helper_obj, input_builder_fun, forward_pass_builder_fun,
                     param_update_builder_fun, block_learning_rate=1.0, block_momentum=None,
                     devices=None, rendezvous=None, net_type="dag", master_device=None,
                     use_nccl=False, nesterov=False, optimize_gradient_memory=False,
                     reset_momentum_sgd=False, warmup_iterations=None,
                     max_concurrent_distributed_ops=4, add_blobs_to_sync=None,
                     num_threads_per_device=4, cpu_device=False,
                     barrier_net_timeout_sec=_DEFAULT_BARRIER_NET_TIMEOUT_SEC):
    """Blockwise model-update filtering: each device trains alone for some iterations (net),
    then ``_global_model_param_updates_net`` averages the replicas with block momentum."""
    model = model_helper_obj
    if rendezvous is not None:
        raise NotImplementedError(_SINGLE_HOST)
    devices = _device_setup(model, devices, cpu_device, False)
    master_device = devices[0] if master_device is None else master_device
    model._devices = devices
    model._rendezvous = None
    model._sync_barrier_net = None
    model._broadcast_context = None
    model._shared_model = False
    model._optimizer = None
    master_opt = core.DeviceOption(model._device_type, master_device)
    num_devices = len(devices)
    loss_scale = 1.0 / num_devices
    if block_momentum is None:
        block_momentum = 1.0 - 1.0 / num_devices
    num_workers = num_threads_per_device * num_devices
    model.net.Proto().num_workers = num_workers
    model.net.Proto().type = net_type
    model._global_model_init_net = core.Net("global_model_init")
    model._global_model_param_updates_net = core.Net("global_model")
    for net in (model._global_model_init_net, model._global_model_param_updates_net):
        net.Proto().type = net_type
        net.Proto().num_workers = num_workers

    non_datapar_params = copy.copy(model.params)
    model._losses_by_gpu = {}
    for device in devices:
        with _device_scope(model, device):
            input_builder_fun(model)
            model._losses_by_gpu[device] = forward_pass_builder_fun(model, loss_scale)
    _ValidateParams(model.params)
    model._device_grouped_blobs = _GroupByDevice(model, devices, model.params,
                                                 non_datapar_params)
    model._param_names = list(model._device_grouped_blobs)
    _AddGradientOperators(devices, model, model._losses_by_gpu)
    _ValidateParams(model.params)
    _InferBlobDevice(model)
    for device in devices:
        with _device_scope(model, device):
            param_update_builder_fun(model)
    names = list(model._device_grouped_blobs)
    init, update = model._global_model_init_net, model._global_model_param_updates_net

    def v(p):
        return f"{p}_v"

    def g(p):
        return f"{p}_g"

    def v_prev(p):
        return f"{p}_prev"

    if warmup_iterations is not None:
        model._warmup_iterations = warmup_iterations
        model._warmup_broadcast = core.Net("warmup-broadcast")
        model._warmup_broadcast.Proto().type = net_type
        _SyncAllParams(devices, model, model._warmup_broadcast, names)
        for name in names:
            param = model._device_grouped_blobs[name][master_device]
            with scope.DeviceScope(master_opt):
                model._warmup_broadcast.Copy(param, g(param))
    for name in names:  # step 0: momentum and the global model on the master device
        param = model._device_grouped_blobs[name][master_device]
        with scope.DeviceScope(master_opt):
            init.ConstantFill(param, v(param), value=0.0)
            init.Copy(param, g(param))
            if nesterov:
                init.ConstantFill(param, v_prev(param), value=0.0)
    # step 2: the replicas' sum, on every device
    _AllReduceBlobs(names, devices, model, update, use_nccl)
    for name in names:  # step 3: block momentum update of the global model
        param = model._device_grouped_blobs[name][master_device]
        with scope.DeviceScope(master_opt):
            update.Scale(param, param, scale=1.0 / num_devices)
            update.Sub([param, g(param)], param)
            update.Scale(param, param, scale=block_learning_rate)
            update.Scale(v(param), v(param), scale=block_momentum)
            update.Add([v(param), param], v(param))
            update.Add([g(param), v(param)], g(param))
            if nesterov:
                update.Sub([v(param), v_prev(param)], v_prev(param))
                update.Scale(v_prev(param), v_prev(param), scale=block_momentum)
                update.Sub([g(param), v_prev(param)], g(param))
                update.Copy(v(param), v_prev(param))
            update.Copy(g(param), param)
    _SyncAllParams(devices, model, update, names)
    if add_blobs_to_sync is not None:
        AddBlobSync(model, add_blobs_to_sync, net=update)
    if reset_momentum_sgd:
        for op in [op for op in model.net.Proto().op if op.type == "MomentumSGDUpdate"]:
            with scope.DeviceScope(op.device_option):
                update.ConstantFill([op.input[1]], op.input[1], value=0.0)
    if optimize_gradient_memory:
        for device in devices:
            model.net._net = memonger.share_grad_blobs(
                model.net, model._losses_by_gpu[device], set(model.param_to_grad.values()),
                f"{model._device_prefix}_{device}/", share_activations=False)
    model._data_parallel_model_init_nets = [model.param_init_net, init]
    model._data_parallel_model_nets = [model.net, (update, 1)]
