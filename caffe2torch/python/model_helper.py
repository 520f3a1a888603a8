"""Caffe2's ``ModelHelper``: a training net, its parameter-init net and the parameters they share.

Also the small parameter machinery brew's helpers use (Caffe2's ``modeling.parameter_info`` and
``modeling.initializers``): :class:`ParameterTags`, :class:`ParameterInfo`, :class:`Initializer`,
:class:`ExternalInitializer` and :func:`update_initializer`.
"""
import logging

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, scope

log = logging.getLogger("caffe2torch")

# Ops Caffe2's ModelHelper creates without a warning (its ``_known_working_ops``); any other
# registered op still works through ``model.Op(...)`` but logs a warning, as in Caffe2.
KNOWN_WORKING_OPS = (
    "Accuracy", "Adam", "Add", "Adagrad", "SparseAdagrad", "AveragedLoss", "Cast", "Checkpoint",
    "ConstantFill", "Copy", "CopyGPUToCPU", "CopyCPUToGPU", "DequeueBlobs", "EnsureCPUOutput",
    "ExpandDims", "Flatten", "FlattenToVec", "LabelCrossEntropy", "LearningRate", "MakeTwoClass",
    "MatMul", "NCCLAllreduce", "NHWC2NCHW", "PackSegments", "Print", "PRelu", "ReduceFrontSum",
    "Scale", "ScatterWeightedSum", "Sigmoid", "SortedSegmentSum", "Snapshot", "Softmax",
    "SoftmaxWithLoss", "SquaredL2Distance", "Squeeze", "StopGradient", "Summarize", "Tanh",
    "Transpose", "UnpackSegments", "WeightedSum", "YellowFin",
)


class ParameterTags:
    """Tags a parameter can carry (Caffe2's ``parameter_info.ParameterTags``)."""

    BIAS = "BIAS"
    WEIGHT = "WEIGHT"
    COMPUTED_PARAM = "COMPUTED_PARAM"


class ParameterInfo:
    """What a model knows about one parameter: its blob, shape and (once built) gradient."""

    def __init__(self, param_id, param, key=None, shape=None, length=None, grad=None,
                 blob_copy=None):
        self.param_id = param_id
        self.name = str(param)
        self.blob = param
        self.key = key
        self.shape = shape
        self.size = None if shape is None else _prod(shape)
        self.length = max(1, length if length is not None else 1)
        self.grad = grad
        # {core.DataType.FLOAT: the float32 master copy} of a float16 parameter (or FLOAT16).
        self.blob_copy = blob_copy

    def __str__(self):
        return self.name

    def __repr__(self):
        return f"ParameterInfo({self.name!r}, shape={self.shape}, grad={self.grad!r})"


def _prod(shape):
    out = 1
    for d in shape:
        out *= int(d)
    return out


class Initializer:
    """Creates a parameter with one fill op in the init net, e.g. ``Initializer("XavierFill")``."""

    def __init__(self, operator_name=None, **kwargs):
        self.operator_name = operator_name
        self.operator_kwargs = kwargs

    def update(self, operator_name, kwargs):
        """Set the fill op once (Caffe2 forbids overwriting it)."""
        if self.operator_name is not None:
            raise ValueError(f"this Initializer already uses {self.operator_name}; "
                             "create a new Initializer instead of overwriting it")
        self.operator_name = operator_name
        self.operator_kwargs = kwargs

    def create_param(self, param_name, init_net, shape):
        """Add ``<operator_name>([], param_name, shape=shape, **kwargs)`` to ``init_net``."""
        param = getattr(init_net, self.operator_name)([], param_name, shape=shape,
                                                      **self.operator_kwargs)
        return ParameterInfo(param_id=None, param=param, shape=shape)


class ExternalInitializer:
    """A parameter initialized elsewhere (e.g. by the train model): no op, just the name."""

    def create_param(self, param_name, init_net, shape):
        """A ParameterInfo for ``param_name`` without adding any op."""
        return ParameterInfo(param_id=None, param=core.BlobReference(str(param_name), init_net),
                             shape=shape)


def update_initializer(initializer_class, operator_name_and_kwargs, default_operator_name_and_kwargs):
    """An Initializer from a class and an ``("Op", {kwargs})`` pair, falling back to the default."""
    name, kwargs = operator_name_and_kwargs or default_operator_name_and_kwargs
    cls = initializer_class if initializer_class is not None else Initializer
    return cls(name, **kwargs)


class ModelHelper:
    """A training/test/deploy model: ``net``, ``param_init_net`` and the parameters they share.

    Example::

        model = model_helper.ModelHelper(name="mnist_train", arg_scope={"order": "NCHW"})
        data, label = model.TensorProtosDBInput([], ["data_uint8", "label"], batch_size=64,
                                                db="mnist-train-nchw-lmdb", db_type="lmdb")
        fc = brew.fc(model, data, "fc", dim_in=784, dim_out=10)   # creates fc_w, fc_b
        softmax = brew.softmax(model, fc, "softmax")
        xent = model.LabelCrossEntropy([softmax, label], "xent")  # same as model.net.LabelCrossEntropy
        loss = model.AveragedLoss(xent, "loss")
        model.AddGradientOperators([loss])                        # fills model.param_to_grad
        workspace.RunNetOnce(model.param_init_net)
        workspace.CreateNet(model.net)
        workspace.RunNet(model.net, 10)
    """

    def __init__(self, name=None, init_params=True, allow_not_known_ops=True,
                 skip_sparse_optim=False, param_model=None, arg_scope=None):
        self.name = name or "model"
        self.net = core.Net(self.name)
        if param_model is not None:
            self.param_init_net = param_model.param_init_net
            self.param_to_grad = param_model.param_to_grad
            self.params = param_model.params
            self._parameters_info = param_model._parameters_info
            self._computed_params = param_model._computed_params
        else:
            self.param_init_net = core.Net(self.name + "_init")
            self.param_to_grad = {}
            self.params = []
            self._parameters_info = {}
            self._computed_params = []
        self.grad_map = {}
        self.gradient_ops_added = False
        self.init_params = init_params
        self.allow_not_known_ops = allow_not_known_ops
        self.skip_sparse_optim = skip_sparse_optim
        self.weights = []
        self.biases = []
        self._arg_scope = {"order": "NCHW", "use_cudnn": True, "cudnn_exhaustive_search": False}
        if arg_scope is not None:
            self._arg_scope.update(arg_scope)

    @property
    def arg_scope(self):
        """Default keyword arguments brew passes to every helper called on this model."""
        return self._arg_scope

    def get_name(self) -> str:
        """The model name."""
        return self.name

    def Proto(self) -> caffe2_pb2.NetDef:
        """The main net's NetDef."""
        return self.net.Proto()

    def InitProto(self) -> caffe2_pb2.NetDef:
        """The parameter-init net's NetDef."""
        return self.param_init_net.Proto()

    def GetDevices(self):
        """The devices data_parallel_model.Parallelize replicated this model on."""
        devices = getattr(self, "_devices", None)
        if not devices:
            raise RuntimeError(f"model {self.name!r} is not parallelized: use "
                               "data_parallel_model.Parallelize to run it on several devices")
        return devices

    def RunAllOnGPU(self, *args, **kwargs):
        """Run both nets on a GPU (see core.Net.RunAllOnGPU)."""
        self.param_init_net.RunAllOnGPU(*args, **kwargs)
        self.net.RunAllOnGPU(*args, **kwargs)

    # -- parameters -------------------------------------------------------------------------
    @staticmethod
    def _normalize_tags(tags):
        tags = tags or []
        return set(tags) if isinstance(tags, (list, tuple, set)) else {tags}

    def create_param(self, param_name: str, shape: list[int], initializer,
                     tags=None) -> core.BlobReference:
        """Create parameter ``param_name`` (name-scoped when a string) with ``initializer``.

        Asking twice for the same name returns the existing blob (the shapes must agree).
        """
        if isinstance(param_name, core.BlobReference):
            param_name = str(param_name)
        elif isinstance(param_name, str):
            param_name = core.ScopedName(param_name)
        else:
            raise TypeError(f"param_name must be a string or BlobReference, not "
                            f"{type(param_name).__name__}")
        if param_name in self._parameters_info:
            existing = self._parameters_info[param_name]
            if existing.shape is not None and shape is not None and list(existing.shape) != list(shape):
                raise ValueError(f"parameter {param_name!r} already exists with shape "
                                 f"{list(existing.shape)}, not {list(shape)}")
            return existing.blob
        info = initializer.create_param(param_name=core.BlobReference(param_name),
                                        init_net=self.param_init_net, shape=shape)
        self._parameters_info[param_name] = info
        self.AddParameter(info.blob, tags)
        return info.blob

    def get_param_info(self, param):
        """The ParameterInfo of ``param`` (a BlobReference or name), or None."""
        return self._parameters_info.get(str(param))

    def AddParameter(self, param, tags=None):
        """Register an existing blob as a parameter (or, tagged COMPUTED_PARAM, a computed one)."""
        if not isinstance(param, core.BlobReference):
            raise TypeError(f"parameter {param!r} must be a BlobReference; "
                            "wrap a name with core.BlobReference(name)")
        tags = self._normalize_tags(tags)
        if ParameterTags.COMPUTED_PARAM in tags:
            self._computed_params.append(param)
        else:
            self.params.append(param)
        if ParameterTags.WEIGHT in tags:
            self.weights.append(param)
        if ParameterTags.BIAS in tags:
            self.biases.append(param)

    @staticmethod
    def _normalize_namescope(namescope):
        if namescope is None:
            return scope.CurrentNameScope()
        if namescope == "" or namescope.endswith("/"):
            return namescope
        return namescope + "/"

    def GetParams(self, namescope: str | None = None,
                  top_scope: bool = False) -> list[core.BlobReference]:
        """The parameters under ``namescope`` (default: the current name scope)."""
        namescope = self._normalize_namescope(namescope)
        if namescope == "":
            return self.params[:]
        return [p for p in self.params if p.GetNameScope().startswith(namescope)]

    def GetComputedParams(self, namescope: str | None = None) -> list[core.BlobReference]:
        """Computed (not gradient-trained) parameters under ``namescope``."""
        namescope = self._normalize_namescope(namescope)
        if namescope == "":
            return self._computed_params[:]
        return [p for p in self._computed_params if p.GetNameScope().startswith(namescope)]

    def GetAllParams(self, namescope: str | None = None) -> list[core.BlobReference]:
        """Trained plus computed parameters under ``namescope``."""
        return self.GetParams(namescope) + self.GetComputedParams(namescope)

    def GetCompleteNet(self):
        """param_init_net followed by net, as one net (init ops marked in debug_info)."""
        net = self.param_init_net.Clone(self.name + "_complete_net", keep_schema=True)
        for op in net.Proto().op:
            op.debug_info = op.debug_info + "/param_init_net"
        net.AppendNet(self.net)
        if self.net.Proto().HasField("type"):
            net.Proto().type = self.net.Proto().type
        return net

    def ConstructInitTrainNetfromNet(self, net):
        """Split a GetCompleteNet net back into param_init_net and net."""
        init_ids = [i for i, op in enumerate(net.Proto().op)
                    if op.debug_info.endswith("/param_init_net")]
        train_ids = [i for i in range(len(net.Proto().op)) if i not in set(init_ids)]
        self.param_init_net = net.Clone(net.Name() + "/generated_param_init_net",
                                        op_id_mask=init_ids, update_external_list=True)
        self.net = net.Clone(net.Name() + "/generated_net", op_id_mask=train_ids,
                             update_external_list=True)

    def _Validate(self) -> list[str]:
        """The names of parameters added more than once, sorted (Caffe2's check)."""
        names = [str(p) for p in self.params]
        return sorted({n for n in names if names.count(n) > 1})

    def Validate(self) -> None:
        """Raise when a parameter was added twice."""
        dupes = self._Validate()
        if dupes:
            raise ValueError(f"model {self.name!r} has duplicate params: {dupes}; each helper "
                             "call needs its own output name")

    # -- gradients --------------------------------------------------------------------------
    def AddGradientOperators(self, *args, **kwargs):
        """Append the backward pass to ``net`` (once); fills ``param_to_grad``, returns grad_map."""
        if self.gradient_ops_added:
            raise RuntimeError(f"AddGradientOperators was already called on model {self.name!r}; "
                               "it can run only once per model")
        self.Validate()
        self.gradient_ops_added = True
        self.grad_map = self.net.AddGradientOperators(*args, **kwargs)
        self.param_to_grad = self.get_param_to_grad(self.params)
        for param, grad in self.param_to_grad.items():
            info = self.get_param_info(param)
            if info is not None:
                info.grad = grad
            else:
                self._parameters_info[str(param)] = ParameterInfo(param_id=None, param=param,
                                                                  grad=grad)
        return self.grad_map

    def get_param_to_grad(self, params):
        """{param: gradient blob} for those ``params`` that have a gradient."""
        if not self.gradient_ops_added:
            raise RuntimeError("call model.AddGradientOperators(...) first")
        return {p: self.grad_map[str(p)] for p in params if str(p) in self.grad_map}

    def GetOptimizationParamInfo(self, params=None):
        """ParameterInfo of each parameter that has a gradient (all, or those in ``params``)."""
        param_to_grad = self.get_param_to_grad(params) if params else self.param_to_grad
        return [self.get_param_info(p) for p in param_to_grad]

    # -- data input -------------------------------------------------------------------------
    def CreateDB(self, blob_out: str, db: str, db_type: str, **kwargs) -> core.BlobReference:
        """Add ``CreateDB([], blob_out, db=db, db_type=db_type)`` to the init net."""
        return self.param_init_net.CreateDB([], blob_out, db=db, db_type=db_type, **kwargs)

    def TensorProtosDBInput(self, unused_blob_in, blob_out, batch_size, db, db_type, **kwargs):
        """Read batches from ``db``: CreateDB "dbreader_<db>" in the init net, the reader in net."""
        if len(unused_blob_in) != 0:
            raise ValueError("model.TensorProtosDBInput creates its own reader: pass [] as its first "
                             "argument (use model.net.TensorProtosDBInput to read from your own)")
        dbreader = self.param_init_net.CreateDB([], "dbreader_" + db, db=db, db_type=db_type,
                                                **kwargs)
        return self.net.TensorProtosDBInput(dbreader, blob_out, batch_size=batch_size)

    # -- model.Op(...) == model.net.Op(...) -------------------------------------------------
    def __getattr__(self, op_type):
        if op_type.startswith("_"):
            raise AttributeError(op_type)
        method = getattr(self.net, op_type)  # an unregistered op raises, naming close ones
        if op_type not in KNOWN_WORKING_OPS:
            if not self.allow_not_known_ops:
                raise AttributeError(f"Operator {op_type} is not known to be safe")
            log.warning("You are creating an op that the ModelHelper does not recognize: %s.",
                        op_type)
        return method

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(KNOWN_WORKING_OPS))


def ExtractPredictorNet(net_proto, input_blobs, output_blobs, device=None, renames=None,
                        disabled_inputs=None):
    """(predict net, blobs to export) cut from a training/test NetDef (Caffe2's helper).

    Keeps the ops between the first that reads an input blob and the last that writes an
    output blob whose inputs are all available (the net's external inputs and ``input_blobs``,
    less ``disabled_inputs``): data readers, losses and gradients drop out. ``renames`` renames
    blobs; ``device`` (a DeviceOption) is set on every op. An op with ``is_test=0`` is refused.
    """
    renames = dict(renames or {})
    inputs = {str(b) for b in input_blobs}
    outputs = {str(b) for b in output_blobs}
    orig_inputs, orig_outputs = set(net_proto.external_input), set(net_proto.external_output)
    known = (orig_inputs | inputs) - set(disabled_inputs or [])
    ops = list(net_proto.op)
    readers = [k for k, op in enumerate(ops) if inputs & set(op.input)
               and op.type != "StopGradient"]
    writers = [k for k, op in enumerate(ops) if outputs & set(op.output)]
    if not readers:
        raise ValueError(f"ExtractPredictorNet: no op reads the inputs {sorted(inputs)}")
    if not writers:
        raise ValueError(f"ExtractPredictorNet: no op writes the outputs {sorted(outputs)}")
    net = core.Net(net_proto.name + "_predict")
    proto = net.Proto()
    ext_in, ext_out = set(inputs), set(outputs)
    for op in ops[min(readers):max(writers) + 1]:
        if not known.issuperset(op.input):
            continue
        if any(a.name == "is_test" and a.i == 0 for a in op.arg):
            raise ValueError(f"ExtractPredictorNet: op {op.type} has is_test=0; extract the "
                             "predictor from a test model (is_test=1), not a training one")
        kept = caffe2_pb2.OperatorDef()
        kept.CopyFrom(op)
        if device is not None:
            kept.device_option.CopyFrom(device)
        proto.op.append(kept)
        known.update(op.output)
        ext_in |= set(op.input) & orig_inputs
        ext_out |= set(op.output) & orig_outputs

    def rename(names):
        return [renames.get(n, n) for n in names]
    proto.external_input.extend(rename(sorted(ext_in)))
    proto.external_output.extend(rename(sorted(ext_out)))
    for op in proto.op:
        op.input[:] = rename(op.input)
        op.output[:] = rename(op.output)
    renamed_inputs = set(rename(sorted(inputs)))
    return net, sorted(set(proto.external_input) - renamed_inputs)
