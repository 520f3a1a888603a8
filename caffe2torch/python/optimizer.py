"""Caffe2's ``optimizer``: add parameter-update ops to a model after AddGradientOperators.

Example (the MNIST tutorial)::

    model.AddGradientOperators([loss])
    optimizer.build_sgd(model, base_learning_rate=0.1, policy="step", stepsize=1, gamma=0.999)

Each ``build_*`` adds, as Caffe2 does, one shared iteration counter (``optimizer_iteration``,
an int64 on the CPU, advanced by AtomicIter under ``iteration_mutex``), one LearningRate blob per
optimizer instance and device (``SgdOptimizer_0_lr_cpu``; its ``base_lr`` is minus the rate,
since we descend), the optimizer's state blobs (``<param>_momentum``, ``_first_moment``, ...) in
the init net, and one update op per parameter, on the device of the op that creates the
parameter. The ops and their formulas are in :mod:`caffe2torch.ops.optimizer`.
"""
import collections

import numpy as np

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, scope, workspace

_OPTIMIZER_ITERATION_NAME = "optimizer_iteration"
_LEARNING_RATE_INJECTION = "lr_injection"

AuxOptimizerParams = collections.namedtuple("AuxOptimizerParams", ["local", "shared"])
_optimizer_instance_count = collections.defaultdict(int)


def _device(dev=None):
    dev = scope.CurrentDeviceScope() if dev is None else dev
    return core.DeviceOption(caffe2_pb2.CPU) if dev is None else dev


def _one(param_init_net, node_name=True):
    """The device's ONE blob (a [1] float 1.0), created once per device."""
    dev = _device()
    name = f"ONE_{dev.device_type}_{dev.cuda_gpu_id}" + (dev.node_name if node_name else "")
    if param_init_net.BlobIsDefined(name):
        return param_init_net.GetBlobRef(name)
    return param_init_net.ConstantFill([], name, shape=[1], value=1.0)


class Optimizer:
    """Adds the update ops of one parameter: ``optimizer(net, param_init_net, param, grad)``."""

    def __init__(self):
        self._aux_params = AuxOptimizerParams(local=[], shared=[])
        self._instance_num = _optimizer_instance_count[type(self).__name__]
        _optimizer_instance_count[type(self).__name__] += 1
        self._lr_multiplier = None
        self._lr_multiplier_on_gpu = False
        self._local_lr_multiplier = None  # per parameter (Lars), set and cleared by _run

    def __call__(self, net, param_init_net, param, grad=None):
        from caffe2torch.python.model_helper import ParameterInfo
        if grad is None:
            if not isinstance(param, ParameterInfo) or param.grad is None:
                raise ValueError("an optimizer needs a ParameterInfo with its grad set, or "
                                 "(param, grad)")
        else:
            if isinstance(param, str):
                param = core.BlobReference(param)
            param = ParameterInfo(param_id=None, param=param, grad=grad)
        self._run(net, param_init_net, param)

    def _run(self, net, param_init_net, param_info):
        raise NotImplementedError(f"{type(self).__name__} does not implement _run")

    def get_cpu_blob_name(self, base_str, node_name=""):
        """``<Class>_<instance>_<base><node>_cpu``."""
        return f"{type(self).__name__}_{self._instance_num}_{base_str}{node_name}_cpu"

    def get_gpu_blob_name(self, base_str, gpu_id, node_name):
        """``<Class>_<instance>_<base><node>_gpu<id>``."""
        return f"{type(self).__name__}_{self._instance_num}_{base_str}{node_name}_gpu{gpu_id}"

    def make_unique_blob_name(self, base_str):
        """A blob name unique to this optimizer instance and the current device."""
        current = scope.CurrentDeviceScope()
        if current is None:
            return self.get_cpu_blob_name(base_str)
        if current.device_type == caffe2_pb2.CUDA:
            return self.get_gpu_blob_name(base_str, current.cuda_gpu_id, current.node_name)
        return self.get_cpu_blob_name(base_str, current.node_name)

    def build_lr(self, net, param_init_net, base_learning_rate, learning_rate_blob=None,
                 policy="fixed", iter_val=0, **kwargs):
        """The LearningRate blob (base_lr = −base_learning_rate) and the iteration counter."""
        if learning_rate_blob is None:
            learning_rate_blob = self.make_unique_blob_name("lr")
        if not param_init_net.BlobIsDefined(_OPTIMIZER_ITERATION_NAME):
            with core.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
                iteration = param_init_net.ConstantFill(
                    [], _OPTIMIZER_ITERATION_NAME, shape=[1], value=iter_val,
                    dtype=core.DataType.INT64)
                mutex = param_init_net.CreateMutex([], ["iteration_mutex"])
                net.AtomicIter([mutex, iteration], [iteration])
        else:
            iteration = param_init_net.GetBlobRef(_OPTIMIZER_ITERATION_NAME)
        if not net.BlobIsDefined(learning_rate_blob):
            # We minimize, so we descend: the rate is negative.
            lr = net.LearningRate([iteration], learning_rate_blob, base_lr=-base_learning_rate,
                                  policy=policy, **kwargs)
        else:
            lr = net.GetBlobRef(learning_rate_blob)
        if self._lr_multiplier is not None:
            multiplier = net.Copy(self._lr_multiplier, self.make_unique_blob_name("lr_multiplier"))
            lr = net.Mul([lr, multiplier], self.make_unique_blob_name("scaled_lr"), broadcast=1)
        if self._local_lr_multiplier is not None:
            lr = net.Mul([lr, self._local_lr_multiplier],
                         self.make_unique_blob_name("local_scaled_lr"), broadcast=1)
        return lr, iteration

    def _add_local_lr_multiplier(self, local_lr_multiplier, is_gpu_blob=False):
        """Scale the rate of the parameter being built by this blob too (Lars's factor)."""
        self._local_lr_multiplier = local_lr_multiplier

    def _clear_local_lr_multiplier(self):
        self._local_lr_multiplier = None

    def create_lars_inputs(self, param_init_net, weight_decay, trust, lr_max):
        """The weight_decay, trust and lr_max blobs of the Lars op ([1] floats)."""
        wd = param_init_net.ConstantFill([], "weight_decay", shape=[1], value=weight_decay)
        trust = param_init_net.ConstantFill([], "trust", shape=[1], value=trust)
        lr_max = param_init_net.ConstantFill([], "lr_max", shape=[1], value=lr_max)
        return wd, trust, lr_max

    def _add_lars(self, net, param_init_net, param, grad, lars):
        """With ``lars`` (an offset >= 0): the rate of ``param`` is scaled by Lars's factor."""
        self._clear_local_lr_multiplier()
        if lars is None or isinstance(grad, core.GradientSlice):
            return  # Caffe2 has no LARS for sparse gradients
        if lars < 0:
            raise ValueError(f"Lars offset must be nonnegative, got {lars}")
        wd, trust, lr_max = self.create_lars_inputs(param_init_net, 0.0, 1.0,
                                                    float(np.finfo(np.float32).max))
        factor = net.Lars([param, grad, wd, trust, lr_max],
                          self.make_unique_blob_name(str(param) + "_lars"), offset=lars,
                          lr_min=0.0)
        self._add_local_lr_multiplier(factor)

    def add_lr_multiplier(self, lr_multiplier, is_gpu_blob=False):
        """Scale the learning rate by the blob ``lr_multiplier``."""
        self._lr_multiplier = lr_multiplier
        self._lr_multiplier_on_gpu = is_gpu_blob

    @staticmethod
    def dedup(net, sparse_dedup_aggregator, grad):
        """The sparse gradient, its repeated indices merged when an aggregator is named."""
        if not isinstance(grad, core.GradientSlice):
            raise TypeError("dedup takes a core.GradientSlice")
        if sparse_dedup_aggregator:
            return net.DeduplicateGradientSlices(grad, aggregator=sparse_dedup_aggregator)
        return grad

    def get_auxiliary_parameters(self):
        """AuxOptimizerParams(local=[per-parameter state], shared=[e.g. the iteration])."""
        return self._aux_params

    def scale_learning_rate(self, *args, **kwargs):
        """Multiply the base learning rate (each optimizer says how)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement scale_learning_rate")


class SgdOptimizer(Optimizer):
    """Plain SGD (WeightedSum), or with ``momentum`` > 0 MomentumSGDUpdate (nesterov by default)."""

    def __init__(self, base_learning_rate=0.01, policy="fixed", momentum=0.0, nesterov=1,
                 lars=None, sparse_dedup_aggregator=None, **kwargs):
        super().__init__()
        self.base_learning_rate = base_learning_rate
        self.policy = policy
        self.momentum = momentum
        self.nesterov = nesterov
        self.lars = lars
        self.sparse_dedup_aggregator = sparse_dedup_aggregator
        self.init_kwargs = kwargs

    def _run(self, net, param_init_net, param_info):
        param, grad = param_info.blob, param_info.grad
        if self.base_learning_rate == 0:
            return
        if self.base_learning_rate < 0:
            raise ValueError(f"SgdOptimizer: base_learning_rate must be > 0, got "
                             f"{self.base_learning_rate}")
        self._add_lars(net, param_init_net, param, grad, self.lars)
        # WeightedSum adds lr·grad, so its lr is negative; MomentumSGDUpdate subtracts.
        lr_sign = -1 if self.momentum else 1
        lr, _ = self.build_lr(net, param_init_net, self.base_learning_rate * lr_sign,
                              policy=self.policy, **self.init_kwargs)
        one = _one(param_init_net)
        self._aux_params.shared.append(one)
        if self.momentum > 0:
            momentum_data = param_init_net.ConstantFill(param, str(param) + "_momentum",
                                                        value=0.0)
            self._aux_params.local.append(momentum_data)
        if isinstance(grad, core.GradientSlice):
            grad = self.dedup(net, self.sparse_dedup_aggregator, grad)
            if self.momentum > 0:
                net.SparseMomentumSGDUpdate(
                    [grad.values, momentum_data, lr, param, grad.indices],
                    [grad.values, momentum_data, param], momentum=self.momentum,
                    nesterov=self.nesterov)
            else:
                net.ScatterWeightedSum([param, one, grad.indices, grad.values, lr], param)
        elif self.momentum > 0:
            net.MomentumSGDUpdate([grad, momentum_data, lr, param], [grad, momentum_data, param],
                                  momentum=self.momentum, nesterov=self.nesterov)
        else:
            net.WeightedSum([param, one, grad, lr], param)

    def scale_learning_rate(self, scale):
        """Multiply base_learning_rate by ``scale``."""
        self.base_learning_rate *= scale


class MultiPrecisionSgdOptimizer(SgdOptimizer):
    """SGD for float16 parameters that keep a float32 copy (``param_info.blob_copy``)."""

    def __init__(self, base_learning_rate=0.1, momentum=0.0, policy="fixed", nesterov=1,
                 sparse_dedup_aggregator=None, **kwargs):
        super().__init__(base_learning_rate=base_learning_rate, policy=policy, momentum=momentum,
                         nesterov=nesterov, sparse_dedup_aggregator=sparse_dedup_aggregator,
                         **kwargs)

    def _run(self, net, param_init_net, param_info):
        copies = getattr(param_info, "blob_copy", None)
        param_fp32 = copies.get(core.DataType.FLOAT) if copies else None
        if param_fp32 is None:  # a plain float32 parameter: ordinary SGD
            return SgdOptimizer._run(self, net, param_init_net, param_info)
        param, grad = param_info.blob, param_info.grad
        if self.base_learning_rate == 0:
            return
        self._clear_local_lr_multiplier()
        if isinstance(grad, core.GradientSlice):
            raise ValueError("MultiPrecisionSgdOptimizer does not support sparse gradients")
        lr, _ = self.build_lr(net, param_init_net, -self.base_learning_rate, policy=self.policy,
                              **self.init_kwargs)
        momentum_data = param_init_net.ConstantFill(param_fp32, str(param) + "_momentum",
                                                    value=0.0)
        self._aux_params.local.append(momentum_data)
        grad_fp32 = net.HalfToFloat(grad, str(grad) + "_fp32")
        net.MomentumSGDUpdate([grad_fp32, momentum_data, lr, param_fp32],
                              [grad_fp32, momentum_data, param_fp32], momentum=self.momentum,
                              nesterov=self.nesterov)
        net.FloatToHalf(param_fp32, param)


class FP16SgdOptimizer(SgdOptimizer):
    """Momentum SGD on float16 parameters in place (FP16MomentumSGDUpdate), weight decay built in.

    A parameter with a float32 ``blob_copy`` (or named ``spatbn``) is updated in float32 with
    FP32MomentumSGDUpdate, as Caffe2 does.
    """

    def __init__(self, base_learning_rate=0.1, momentum=0.0, policy="fixed", nesterov=1,
                 weight_decay=0.0001, sparse_dedup_aggregator=None, **kwargs):
        super().__init__(base_learning_rate=base_learning_rate, policy=policy, momentum=momentum,
                         nesterov=nesterov, sparse_dedup_aggregator=sparse_dedup_aggregator,
                         **kwargs)
        self.weight_decay = weight_decay

    def _run(self, net, param_init_net, param_info, fp32_update=False):
        copies = getattr(param_info, "blob_copy", None)
        if "spatbn" in str(param_info.blob):
            fp32_update = True  # cuDNN's SpatialBN keeps float32 parameters
        if fp32_update or copies is None:
            fp32_update, param = True, param_info.blob
            param_fp32 = param
        elif core.DataType.FLOAT in copies:
            param, param_fp32 = param_info.blob, copies[core.DataType.FLOAT]
        elif core.DataType.FLOAT16 in copies:
            param, param_fp32 = copies[core.DataType.FLOAT16], param_info.blob
        else:
            raise ValueError(f"FP16SgdOptimizer: parameter {param_info.name} has neither a "
                             "FLOAT nor a FLOAT16 blob_copy")
        grad = param_info.grad
        if self.base_learning_rate == 0:
            return
        if self.base_learning_rate < 0:
            raise ValueError(f"FP16SgdOptimizer: base_learning_rate must be > 0, got "
                             f"{self.base_learning_rate}")
        if isinstance(grad, core.GradientSlice):
            raise ValueError("FP16SgdOptimizer does not support sparse gradients")
        lr, _ = self.build_lr(net, param_init_net, -self.base_learning_rate, policy=self.policy,
                              **self.init_kwargs)
        momentum_fp32 = param_init_net.ConstantFill(param_fp32, str(param) + "_momentum_fp32",
                                                    value=0.0)
        momentum = param_init_net.FloatToHalf(momentum_fp32, str(param) + "_momentum")
        self._aux_params.local.append(momentum)
        if fp32_update:
            net.FP32MomentumSGDUpdate([grad, momentum_fp32, lr, param],
                                      [grad, momentum_fp32, param], momentum=self.momentum,
                                      nesterov=self.nesterov, weight_decay=self.weight_decay)
        else:
            net.FP16MomentumSGDUpdate([grad, momentum, lr, param], [grad, momentum, param],
                                      momentum=self.momentum, nesterov=self.nesterov,
                                      weight_decay=self.weight_decay)


class WeightDecayBuilder(Optimizer):
    """grad += weight_decay · param (L2 regularization), before the optimizer's update."""

    def __init__(self, weight_decay):
        super().__init__()
        self.weight_decay = weight_decay

    def _run(self, net, param_init_net, param_info):
        dev = _device()
        one = _one(param_init_net, node_name=False)
        wd_name = f"wd_{dev.device_type}_{dev.cuda_gpu_id}"
        wd = param_init_net.GetBlobRef(wd_name) if param_init_net.BlobIsDefined(wd_name) else \
            param_init_net.ConstantFill([], wd_name, shape=[1], value=self.weight_decay)
        if isinstance(param_info.grad, core.GradientSlice):
            raise ValueError("weight decay does not support sparse gradients")
        net.WeightedSum([param_info.grad, one, param_info.blob, wd], param_info.grad)


class AdagradOptimizer(Optimizer):
    """Adagrad: h = decay·h + g²; w −= α·g/(√h + ε)."""

    def __init__(self, alpha=0.01, epsilon=1e-4, decay=1, policy="fixed",
                 sparse_dedup_aggregator=None, rowWise=False, engine="", lars=None, **kwargs):
        super().__init__()
        self.lars = lars
        self.alpha = alpha
        self.epsilon = epsilon
        self.decay = decay
        self.policy = policy
        self.sparse_dedup_aggregator = sparse_dedup_aggregator
        self.rowWise = rowWise
        self.engine = engine
        self.init_kwargs = kwargs

    def _run(self, net, param_init_net, param_info):
        param, grad = param_info.blob, param_info.grad
        if self.alpha <= 0:
            return
        if self.rowWise and not isinstance(grad, core.GradientSlice):
            raise ValueError(f"AdagradOptimizer(rowWise=True) updates sparse gradients only (as "
                             f"Caffe2); {param}'s gradient is dense: use rowWise=False for it")
        self._add_lars(net, param_init_net, param, grad, self.lars)
        lr, _ = self.build_lr(net, param_init_net, self.alpha, policy=self.policy,
                              **self.init_kwargs)
        if self.rowWise:
            squared_sum = _row_moment(param_init_net, param)
        else:
            squared_sum = param_init_net.ConstantFill([param], str(param) + "_squared_sum",
                                                      value=0.0)
        self._aux_params.local.append(squared_sum)
        if isinstance(grad, core.GradientSlice):
            if self.decay != 1:
                raise ValueError("SparseAdagrad has no decay: use decay=1 with sparse gradients")
            grad = self.dedup(net, self.sparse_dedup_aggregator, grad)
            op = net.RowWiseSparseAdagrad if self.rowWise else net.SparseAdagrad
            op([param, squared_sum, grad.indices, grad.values, lr],
               [param, squared_sum], epsilon=self.epsilon, engine=self.engine)
        else:
            net.Adagrad([param, squared_sum, grad, lr], [param, squared_sum],
                        epsilon=self.epsilon, decay=float(self.decay), engine=self.engine)

    def scale_learning_rate(self, scale):
        """Multiply alpha by ``scale``."""
        self.alpha *= scale


def _row_moment(param_init_net, param):
    """``<param>_avg_squared_sum``: zeros, one per row of the parameter (RowWiseSparseAdagrad's)."""
    shapes, _ = workspace.InferShapesAndTypes([param_init_net])
    name = str(param) + "_avg_squared_sum"
    if str(param) in shapes:
        return param_init_net.ConstantFill([], name, shape=[shapes[str(param)][0]], value=0.0)
    shape = param_init_net.Shape(param, str(param) + "_shape")
    num_rows = param_init_net.Slice([shape], str(shape) + "_numrows", starts=[0], ends=[1])
    return param_init_net.ConstantFill(num_rows, name, input_as_shape=1, value=0.0)


class FtrlOptimizer(Optimizer):
    """FTRL-proximal; its state ``<param>_ftrl_nz`` holds n and z per weight."""

    def __init__(self, alpha=0.01, beta=1e-4, lambda1=0, lambda2=0,
                 sparse_dedup_aggregator=None, engine=""):
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.sparse_dedup_aggregator = sparse_dedup_aggregator
        self.engine = engine

    def _run(self, net, param_init_net, param_info):
        param, grad = param_info.blob, param_info.grad
        if self.alpha <= 0:
            return
        nz = param_init_net.ConstantFill([param], str(param) + "_ftrl_nz", extra_shape=[2],
                                         value=0.0)
        self._aux_params.local.append(nz)
        args = dict(engine=self.engine, alpha=self.alpha, beta=self.beta, lambda1=self.lambda1,
                    lambda2=self.lambda2)
        if isinstance(grad, core.GradientSlice):
            grad = self.dedup(net, self.sparse_dedup_aggregator, grad)
            net.SparseFtrl([param, nz, grad.indices, grad.values], [param, nz], **args)
        else:
            net.Ftrl([param, nz, grad], [param, nz], **args)

    def scale_learning_rate(self, scale):
        """Multiply alpha by ``scale``."""
        self.alpha *= scale


class AdamOptimizer(Optimizer):
    """Adam with Caffe2's bias correction (t = iteration + 1)."""

    def __init__(self, alpha=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8, policy="fixed",
                 sparse_dedup_aggregator=None, rowWise=False, engine="", **kwargs):
        super().__init__()
        self.alpha = alpha
        self.beta1 = beta1
        self.beta2 = beta2
        self.epsilon = epsilon
        self.policy = policy
        self.sparse_dedup_aggregator = sparse_dedup_aggregator
        self.rowWise = rowWise
        self.engine = engine
        self.init_kwargs = kwargs

    def _run(self, net, param_init_net, param_info):
        param, grad = param_info.blob, param_info.grad
        if self.alpha <= 0:
            return
        if self.rowWise:
            raise NotImplementedError("AdamOptimizer(rowWise=True) needs RowWiseSparseAdam, "
                                      "which caffe2torch does not have")
        lr, iteration = self.build_lr(net, param_init_net, self.alpha, policy=self.policy,
                                      **self.init_kwargs)
        m1 = param_init_net.ConstantFill([param], str(param) + "_first_moment", value=0.0)
        m2 = param_init_net.ConstantFill([param], str(param) + "_second_moment", value=0.0)
        self._aux_params.shared.append(iteration)
        self._aux_params.local.extend([m1, m2])
        args = dict(beta1=self.beta1, beta2=self.beta2, epsilon=self.epsilon)
        if isinstance(grad, core.GradientSlice):
            grad = self.dedup(net, self.sparse_dedup_aggregator, grad)
            net.SparseAdam([param, m1, m2, grad.indices, grad.values, lr, iteration],
                           [param, m1, m2], **args)
        else:
            net.Adam([param, m1, m2, grad, lr, iteration], [param, m1, m2], **args)

    def scale_learning_rate(self, scale):
        """Multiply alpha by ``scale``."""
        self.alpha *= scale


class RmsPropOptimizer(Optimizer):
    """RMSProp: RmsProp computes the step, MomentumSGDUpdate applies it (Caffe2's pairing)."""

    def __init__(self, alpha=0.01, decay=0.9, momentum=0.0, epsilon=1e-5, policy="fixed",
                 engine="", **kwargs):
        super().__init__()
        self.alpha = alpha
        self.decay = decay
        self.momentum = momentum
        self.epsilon = epsilon
        self.policy = policy
        self.engine = engine
        self.init_kwargs = kwargs

    def _run(self, net, param_init_net, param_info):
        param, grad = param_info.blob, param_info.grad
        if self.alpha <= 0:
            raise ValueError(f"RmsPropOptimizer: alpha must be > 0, got {self.alpha}")
        if isinstance(grad, core.GradientSlice):
            raise ValueError("RmsPropOptimizer does not support sparse gradients")
        one = _one(param_init_net, node_name=False)
        lr, _ = self.build_lr(net, param_init_net, -self.alpha, policy=self.policy,
                              **self.init_kwargs)
        grad_o = param_init_net.ConstantFill([param], str(param) + "_grad_o", value=0.0)
        ms = param_init_net.ConstantFill([param], str(param) + "_mean_squares", value=0.0)
        mom = param_init_net.ConstantFill([param], str(param) + "_momentum", value=0.0)
        self._aux_params.local.extend([ms, mom])
        net.RmsProp([grad, ms, mom, one], [grad_o, ms, mom], decay=self.decay,
                    momentum=self.momentum, epsilon=self.epsilon, engine=self.engine)
        net.MomentumSGDUpdate([grad_o, mom, lr, param], [grad_o, mom, param])

    def scale_learning_rate(self, scale):
        """Multiply alpha by ``scale``."""
        self.alpha *= scale


def _get_param_to_device(model):
    devices = core.InferBlobDevices(model.net)
    devices.update(core.InferBlobDevices(model.param_init_net))
    return devices


def get_param_device(param_name, grad, param_to_device=None, default_device=None):
    """The DeviceOption of the op that creates the parameter (or its gradient)."""
    param_to_device = param_to_device or {}
    device = param_to_device.get(param_name, default_device)
    if param_name not in param_to_device:
        if isinstance(grad, core.GradientSlice):
            device = param_to_device.get(str(grad.values),
                                         param_to_device.get(str(grad.indices), device))
        else:
            device = param_to_device.get(str(grad), device)
    if device is None:
        raise ValueError(f"Cannot infer device for {param_name}: no op creates it")
    return device


def get_lr_injection():
    """The current lr_injection multiplier (build with allow_lr_injection=True)."""
    return workspace.FetchBlob(_LEARNING_RATE_INJECTION)


def set_lr_injection(lr_injection_value):
    """Set the lr_injection multiplier of every learning rate."""
    workspace.FeedBlob(_LEARNING_RATE_INJECTION,
                       np.array([float(lr_injection_value)], dtype=np.float32))


def _calc_norm_ratio(model, params, name_scope, param_to_device, max_gradient_norm):
    """clip_norm / max(global gradient norm, clip_norm): the rate multiplier of max_gradient_norm."""
    with core.NameScope(name_scope):
        squared_sums = []
        for i, info in enumerate(params):
            device = get_param_device(str(info.blob), info.grad, param_to_device)
            with core.DeviceScope(device):
                grad = info.grad.values if isinstance(info.grad, core.GradientSlice) \
                    else info.grad
                squared = model.net.SumSqrElements(grad, f"grad_{i}_squared_sum")
                squared_sums.append(model.net.EnsureCPUOutput(squared))
        with core.DeviceScope(core.DeviceOption(caffe2_pb2.CPU)):
            full = model.net.Sum(squared_sums, "grad_squared_full_sum")
            global_norm = model.net.Pow(full, "global_norm", exponent=0.5)
            clip_norm = model.param_init_net.ConstantFill([], "clip_norm", shape=[],
                                                          value=float(max_gradient_norm))
            max_norm = model.net.Max([global_norm, clip_norm], "max_norm")
            return model.net.Div([clip_norm, max_norm], "norm_ratio")


def _build(model, optimizer, weights_only=False, use_param_info_optim=True,
           max_gradient_norm=None, allow_lr_injection=False, **_unused):
    param_to_device = _get_param_to_device(model)
    model.Validate()
    params = [info for info in model.GetOptimizationParamInfo()
              if not weights_only or info.blob in model.weights]
    lr_multiplier = None
    if max_gradient_norm is not None:
        lr_multiplier = _calc_norm_ratio(model, params, "norm_clipped_grad_update",
                                         param_to_device, max_gradient_norm)
    if allow_lr_injection:
        if not model.param_init_net.BlobIsDefined(_LEARNING_RATE_INJECTION):
            injection = model.param_init_net.ConstantFill([], _LEARNING_RATE_INJECTION,
                                                          shape=[1], value=1.0)
        else:
            injection = model.param_init_net.GetBlobRef(_LEARNING_RATE_INJECTION)
        lr_multiplier = injection if lr_multiplier is None else model.net.Mul(
            [lr_multiplier, injection], "lr_multiplier", broadcast=1)
    if lr_multiplier is not None:
        optimizer.add_lr_multiplier(lr_multiplier)
    for info in params:
        device = get_param_device(str(info.blob), info.grad, param_to_device)
        with core.DeviceScope(device):
            own = getattr(info, "optimizer", None)
            if own is not None and use_param_info_optim:
                own(model.net, model.param_init_net, info)
            else:
                optimizer(model.net, model.param_init_net, info)
    return optimizer


def add_weight_decay(model, weight_decay):
    """Add weight_decay · w to the gradient of every weight (L2 regularization)."""
    _build(model, WeightDecayBuilder(weight_decay=weight_decay), weights_only=True,
           use_param_info_optim=False)


def build_sgd(model, base_learning_rate, max_gradient_norm=None, clip_using_lr_multiplier=False,
              allow_lr_injection=False, **kwargs):
    """SGD (momentum=... for MomentumSGDUpdate) on every parameter with a gradient."""
    return _build(model, SgdOptimizer(base_learning_rate, **kwargs),
                  max_gradient_norm=max_gradient_norm, allow_lr_injection=allow_lr_injection)


def build_multi_precision_sgd(model, base_learning_rate, max_gradient_norm=None,
                              allow_lr_injection=False, **kwargs):
    """SGD that updates float32 copies of float16 parameters (plain SGD for float32 ones)."""
    return _build(model, MultiPrecisionSgdOptimizer(base_learning_rate, **kwargs),
                  max_gradient_norm=max_gradient_norm, allow_lr_injection=allow_lr_injection)


def build_fp16_sgd(model, base_learning_rate, **kwargs):
    """Momentum SGD with weight decay on float16 parameters (FP16MomentumSGDUpdate)."""
    return _build(model, FP16SgdOptimizer(base_learning_rate, **kwargs))


def build_ftrl(model, engine="SIMD", **kwargs):
    """FTRL on every parameter (``engine`` is recorded; there is one implementation)."""
    return _build(model, FtrlOptimizer(engine=engine, **kwargs))


def build_adagrad(model, base_learning_rate, parameters=None, max_gradient_norm=None,
                  clip_using_lr_multiplier=False, allow_lr_injection=False, **kwargs):
    """Adagrad with alpha = base_learning_rate."""
    return _build(model, AdagradOptimizer(alpha=base_learning_rate, **kwargs),
                  max_gradient_norm=max_gradient_norm, allow_lr_injection=allow_lr_injection)


def build_adam(model, base_learning_rate, max_gradient_norm=None, clip_using_lr_multiplier=False,
               allow_lr_injection=False, **kwargs):
    """Adam with alpha = base_learning_rate."""
    return _build(model, AdamOptimizer(alpha=base_learning_rate, **kwargs),
                  max_gradient_norm=max_gradient_norm, allow_lr_injection=allow_lr_injection)


def build_rms_prop(model, base_learning_rate, max_gradient_norm=None,
                   clip_using_lr_multiplier=False, allow_lr_injection=False, **kwargs):
    """RMSProp with alpha = base_learning_rate."""
    return _build(model, RmsPropOptimizer(alpha=base_learning_rate, **kwargs),
                  max_gradient_norm=max_gradient_norm, allow_lr_injection=allow_lr_injection)
