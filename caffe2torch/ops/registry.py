"""The operator registry: one entry per Caffe2 op type, forward and gradient maker side by side.

A forward is ``fn(ctx, inputs) -> list of outputs``: pure PyTorch on tensors, with the op's parsed
arguments in ``ctx.args`` (see :class:`OpContext`). A gradient maker is a pure proto function
``maker(op, g_output) -> (grad_ops, g_input)`` (Caffe2's shape): it emits OperatorDefs and never
touches tensors. Ops that must not be differentiated register ``gradient=NO_GRADIENT``.
"""
import contextlib
import difflib
import threading
from collections.abc import Callable

NO_GRADIENT = "NO_GRADIENT"

_REGION = threading.local()


@contextlib.contextmanager
def tracing_region():
    """While a "compiled" net's region is traced (make_fx, then inductor): ops may emit
    caffe2torch's own opaque torch ops (``torch.ops.caffe2torch.*``). Other tracing (torch.export,
    ONNX export) sees only ATen ops."""
    before = getattr(_REGION, "on", False)
    _REGION.on = True
    try:
        yield
    finally:
        _REGION.on = before


def in_traced_region() -> bool:
    """True inside :func:`tracing_region`."""
    return getattr(_REGION, "on", False)

_REGISTRY = {}

# Ops that torch.export cannot trace although they have neither flag, and why (one line each).
_OPTIMIZER = "it updates parameters in place (an optimizer op: export the predict net, not training)"

NOT_TRACEABLE = {
    "CreateMutex": "it makes a mutex object, not a tensor",
    "GivenTensorStringFill": "it makes a string tensor, which torch cannot hold",
    "XavierFill": "it draws random numbers at run time (a predict net reads fixed weights)",
    "MSRAFill": "it draws random numbers at run time (a predict net reads fixed weights)",
    "GaussianFill": "it draws random numbers at run time (a predict net reads fixed weights)",
    "UniformFill": "it draws random numbers at run time (a predict net reads fixed weights)",
    "UniformIntFill": "it draws random numbers at run time (a predict net reads fixed weights)",
    "Float16UniformFill": "it draws random numbers at run time (a predict net reads fixed "
                          "weights)",
    # Training ops that read tensor values in Python.
    "LearningRate": "it computes the rate from the iteration counter's value (data-dependent)",
    # Optimizer updates: training ops that overwrite parameters in place (export the predict net).
    "Adagrad": _OPTIMIZER,
    "Adam": _OPTIMIZER,
    "FP16MomentumSGDUpdate": _OPTIMIZER,
    "FP32MomentumSGDUpdate": _OPTIMIZER,
    "Ftrl": _OPTIMIZER,
    "MomentumSGD": _OPTIMIZER,
    "MomentumSGDUpdate": _OPTIMIZER,
    "RmsProp": _OPTIMIZER,
    "RowWiseSparseAdagrad": _OPTIMIZER,
    "ScatterAssign": _OPTIMIZER,
    "ScatterWeightedSum": _OPTIMIZER,
    "SparseAdagrad": _OPTIMIZER,
    "SparseAdam": _OPTIMIZER,
    "SparseFtrl": _OPTIMIZER,
    "SparseMomentumSGDUpdate": _OPTIMIZER,
    # Detection ops whose loops run over values read in Python.
    "BBoxTransform": "it loops over the images in Python, reading im_info and the RoIs' image "
                     "indices (data-dependent)",
}


class OpSchema:
    """What the registry knows about one op type."""

    __slots__ = ("type", "forward", "gradient", "setup", "family", "doc", "cpu_only_inputs",
                 "data_dependent", "side_effects")

    def __init__(self, op_type, forward, gradient, setup, family, doc, cpu_only_inputs,
                 data_dependent=False, side_effects=False):
        self.type = op_type
        self.forward = forward
        self.gradient = gradient
        self.setup = setup
        self.family = family
        self.doc = doc
        self.cpu_only_inputs = cpu_only_inputs
        # Output sizes that depend on input values (not only on input shapes), e.g. NMS.
        self.data_dependent = data_dependent
        # The op reads or writes something outside its blobs: files, DBs, queues, counters.
        self.side_effects = side_effects

    @property
    def differentiable(self) -> bool:
        """True when AddGradientOperators can backpropagate through this op."""
        return self.gradient is not None and self.gradient != NO_GRADIENT

    @property
    def is_gradient_op(self):
        """True for the gradient op of another op (``ReluGradient``), not for ``StopGradient``."""
        return self.type.endswith("Gradient") and self.type[:-len("Gradient")] in _REGISTRY

    @property
    def untraceable_reason(self):
        """Why torch.export cannot trace this op (flags, gradient op, NOT_TRACEABLE), or None."""
        if self.side_effects:
            return "it has side effects (files, DBs, counters or the log)"
        if self.data_dependent:
            return "its output sizes depend on the input values (data-dependent)"
        if self.is_gradient_op:
            return "it is a gradient op (export the predict net, not the training net)"
        return NOT_TRACEABLE.get(self.type)

    @property
    def traceable(self):
        """True when a net with this op can be exported (torch.export, ONNX)."""
        return self.untraceable_reason is None


def register_op(op_type, gradient=None, setup=None, cpu_only_inputs=False, data_dependent=False,
                side_effects=False):
    """Decorator: register ``fn`` as the forward of Caffe2 op ``op_type``.

    ``gradient``: a gradient maker, ``NO_GRADIENT``, or None (the op has no gradient yet; asking
    for one raises). ``setup(ctx)`` runs once when a net is prepared (open files, parse args).
    ``cpu_only_inputs``: inputs stay where they are (e.g. the CPU iteration counter).
    ``data_dependent``: output sizes depend on input values, not only shapes (export needs this).
    ``side_effects``: the op touches state outside its blobs (files, DBs, queues, counters).
    """

    def deco(fn):
        if op_type in _REGISTRY:
            raise ValueError(f"operator {op_type!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        family = fn.__module__.rsplit(".", 1)[-1]
        _REGISTRY[op_type] = OpSchema(op_type, fn, gradient, setup, family,
                                      doc[0] if doc else "", cpu_only_inputs,
                                      data_dependent, side_effects)
        return fn

    return deco


def register_gradient(op_type: str, maker: Callable) -> None:
    """Attach a gradient maker to an already registered op (for gradient-only op types)."""
    get_schema(op_type).gradient = maker


def is_registered(op_type: str) -> bool:
    """True when ``op_type`` can be run."""
    _load_families()
    return op_type in _REGISTRY


def get_schema(op_type: str) -> OpSchema:
    """The schema of ``op_type``; an unknown name raises an error that names it."""
    _load_families()
    try:
        return _REGISTRY[op_type]
    except KeyError:
        close = difflib.get_close_matches(op_type, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownOperatorError(
            f"unknown operator type {op_type!r}: caffe2torch does not implement it.{hint}"
        ) from None


def registered_ops() -> list[str]:
    """All registered op types, sorted."""
    _load_families()
    return sorted(_REGISTRY)


def all_schemas() -> list[OpSchema]:
    """All schemas, sorted by op type."""
    _load_families()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


class UnknownOperatorError(KeyError):
    """Raised for an op type that is not registered."""

    def __str__(self):
        return self.args[0]


_loaded = False
_load_error = []  # the family import failure, raised again by every later lookup


def _load_families():
    global _loaded
    if _load_error:
        # Never answer from a half-loaded registry ("unknown operator CreateDB" would mislead).
        raise _load_error[0].__class__(str(_load_error[0])) from _load_error[0]
    if not _loaded:
        _loaded = True
        from caffe2torch.ops import load_families
        try:
            load_families()
        except ImportError as exc:
            _load_error.append(exc)
            raise


class OpContext:
    """Everything an op's forward may know besides its input tensors; built once per CreateNet.

    ``args``: the op's arguments as Python values (int, float, bytes→str, lists, NetDef).
    ``device``: the torch.device the op runs on (from its DeviceOption, else the net's, else CPU).
    ``op``: the OperatorDef. ``input_names`` / ``output_names``: blob names.
    ``root_folder``: the workspace root (base of Print/Summarize files and relative Save/Load paths).
    ``workspace``: the Workspace, only for the few ops that create blobs by name (Load load_all).
    ``state``: per-op scratch space, e.g. files opened by the schema's ``setup``.
    ``generator``: a torch.Generator seeded from DeviceOption.random_seed, or None (global RNG).
    ``lazy_outputs``: indices of outputs that no op of the net reads; an op may return a
    :meth:`defer` value there, computed only if someone fetches it (e.g. the data gradient of a
    first convolution, which Caffe2 writes but training never reads).
    """

    __slots__ = ("op", "args", "device", "input_names", "output_names", "workspace", "state",
                 "generator", "inplace", "lazy_outputs", "mutated_blobs")

    def __init__(self, op, args, device, workspace, generator=None):
        self.op = op
        self.args = args
        self.device = device
        self.input_names = list(op.input)
        self.output_names = list(op.output)
        self.workspace = workspace
        self.state = {}
        self.generator = generator
        # output index -> input index it overwrites (Caffe2's in-place, e.g. Relu(x, x)).
        self.inplace = {o: self.input_names.index(n) for o, n in enumerate(self.output_names)
                        if n in self.input_names}
        self.lazy_outputs = frozenset()
        self.mutated_blobs = frozenset()  # blobs that ops of the net overwrite in place

    def defer(self, fn, inputs):
        """A :class:`Deferred` ``fn(*inputs)``; inputs that the net updates in place are copied."""
        frozen = [x.clone() if name in self.mutated_blobs else x
                  for name, x in zip(self.input_names, inputs)]
        return Deferred(fn, frozen)

    @property
    def root_folder(self):
        """The workspace root folder."""
        return self.workspace.root_folder

    def arg(self, name, default=None):
        """The argument ``name``, or ``default`` when the op does not set it."""
        return self.args.get(name, default)

    def require(self, name):
        """The argument ``name``; raise a clear error when the op lacks it."""
        try:
            return self.args[name]
        except KeyError:
            raise ValueError(f"operator {self.op.type} needs argument {name!r}") from None


class Deferred:
    """A blob value computed when first read (FetchBlob, or an op of another net)."""

    __slots__ = ("_fn", "_inputs", "_versions")

    def __init__(self, fn, inputs):
        self._fn = fn
        self._inputs = inputs
        self._versions = [x._version for x in inputs]

    def resolve(self):
        """Compute the value; inputs changed in place since the op ran make this an error."""
        if any(x._version != v for x, v in zip(self._inputs, self._versions)):
            raise RuntimeError("a deferred blob's inputs were modified in place after the op that "
                               "wrote it ran; fetch it before modifying them")
        return self._fn(*self._inputs)


def grad_name(name: str) -> str:
    """Caffe2's gradient blob name for ``name``."""
    return f"{name}_grad"


def gradient_op(fwd, op_type, inputs, outputs, copy_args=True, **args):
    """A gradient OperatorDef for forward op ``fwd``: Caffe2 copies its args, device and engine."""
    from caffe2torch.proto import caffe2_pb2
    from caffe2torch.python.utils import MakeArgument

    g = caffe2_pb2.OperatorDef()
    g.type = op_type
    g.name = ""
    g.input.extend(str(i) for i in inputs)
    g.output.extend(str(o) for o in outputs)
    if copy_args:
        g.arg.extend(a for a in fwd.arg if a.name not in args)
    for key, value in args.items():
        g.arg.add().CopyFrom(MakeArgument(key, value))
    if fwd.HasField("device_option"):
        g.device_option.CopyFrom(fwd.device_option)
    if fwd.engine:
        g.engine = fwd.engine
    g.is_gradient_op = True
    return g
