"""Caffe2's ``brew``: layer helpers that add ops and their parameters to a ModelHelper.

Each helper takes the model first. Its keyword arguments are merged in this order, later ones
winning: ``model.arg_scope`` (``order``, ``use_cudnn``, ``cudnn_exhaustive_search`` by default),
then the active ``brew.arg_scope`` for that helper, then the arguments of the call. Example::

    model = model_helper.ModelHelper(name="lenet")
    conv1 = brew.conv(model, "data", "conv1", dim_in=1, dim_out=20, kernel=5)
    pool1 = brew.max_pool(model, conv1, "pool1", kernel=2, stride=2)
    with brew.arg_scope([brew.fc], weight_init=("ConstantFill", {"value": 0.1})):
        pred = brew.fc(model, pool1, "pred", dim_in=20 * 12 * 12, dim_out=10)
    softmax = brew.softmax(model, pred, "softmax")

Unlike Caffe2 this is a plain module: the built-in helpers are module functions, and helpers
added with :func:`Register` are found by the module-level ``__getattr__``.
"""
import copy
import functools
import inspect
from collections.abc import Callable

from caffe2torch.python.helpers import algebra as _algebra
from caffe2torch.python.helpers import array_helpers as _array_helpers
from caffe2torch.python.helpers import control_ops as _control_ops
from caffe2torch.python.helpers import conv as _conv
from caffe2torch.python.helpers import db_input as _db_input
from caffe2torch.python.helpers import dropout as _dropout
from caffe2torch.python.helpers import fc as _fc
from caffe2torch.python.helpers import nonlinearity as _nonlinearity
from caffe2torch.python.helpers import normalization as _normalization
from caffe2torch.python.helpers import pooling as _pooling
from caffe2torch.python.helpers import tools as _tools
from caffe2torch.python.helpers import train as _train
from caffe2torch.python.helpers.arg_scope import arg_scope, get_current_scope
from caffe2torch.python.model_helper import ModelHelper

_registry = {}


def _scoped(helper, name=None):
    """``helper`` wrapped so that it receives the model's and the arg scope's kwargs."""
    name = name or helper.__name__
    params = inspect.signature(helper).parameters
    takes_any_kwarg = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    @functools.wraps(helper)
    def scope_wrapper(*args, **kwargs):
        if args and isinstance(args[0], ModelHelper):
            model = args[0]
        elif isinstance(kwargs.get("model"), ModelHelper):
            model = kwargs["model"]
        else:
            raise TypeError(f"brew.{name}: the first argument must be the model "
                            "(a model_helper.ModelHelper), or pass model=<your model>")
        new_kwargs = copy.deepcopy(model.arg_scope)
        if not takes_any_kwarg:
            new_kwargs = {k: v for k, v in new_kwargs.items() if k in params}
        new_kwargs.update(get_current_scope().get(name, {}))
        new_kwargs.update(kwargs)
        return helper(*args, **new_kwargs)

    scope_wrapper.__name__ = name
    _registry[name] = scope_wrapper
    return scope_wrapper


conv = _scoped(_conv.conv)
conv_nd = _scoped(_conv.conv_nd)
fc = _scoped(_fc.fc)
max_pool = _scoped(_pooling.max_pool)
average_pool = _scoped(_pooling.average_pool)
relu = _scoped(_nonlinearity.relu)
tanh = _scoped(_nonlinearity.tanh)
softmax = _scoped(_nonlinearity.softmax)
dropout = _scoped(_dropout.dropout)
iter = _scoped(_train.iter)  # noqa: A001 (Caffe2's name)
accuracy = _scoped(_train.accuracy)
spatial_bn = _scoped(_normalization.spatial_bn)
lrn = _scoped(_normalization.lrn)
layer_norm = _scoped(_normalization.layer_norm)
instance_norm = _scoped(_normalization.instance_norm)
sum = _scoped(_algebra.sum)  # noqa: A001 (Caffe2's name)
transpose = _scoped(_algebra.transpose)
batch_mat_mul = _scoped(_algebra.batch_mat_mul)
concat = _scoped(_array_helpers.concat)
depth_concat = _scoped(_array_helpers.depth_concat)
db_input = _scoped(_db_input.db_input)
image_input = _scoped(_tools.image_input)
add_weight_decay = _scoped(_train.add_weight_decay)
conv_transpose = _scoped(_conv.conv_transpose)
group_conv = _scoped(_conv.group_conv)
prelu = _scoped(_nonlinearity.prelu)
cond = _scoped(_control_ops.cond)
loop = _scoped(_control_ops.loop)
_registry["arg_scope"] = arg_scope


def Register(helper: Callable) -> None:
    """Make ``helper(model, ...)`` callable as ``brew.<helper.__name__>`` with arg scoping."""
    name = helper.__name__
    if name in _registry:
        raise AttributeError(f"Helper {name} already exists. Please change your helper name.")
    _scoped(helper, name)


def has_helper(helper_or_helper_name: Callable | str) -> bool:
    """True when a helper of that name (or that function's name) is registered."""
    name = helper_or_helper_name if isinstance(helper_or_helper_name, str) \
        else helper_or_helper_name.__name__
    return name in _registry


def __getattr__(name):
    try:
        return _registry[name]
    except KeyError:
        raise AttributeError(f"Helper function {name} not registered.") from None


__all__ = ["arg_scope", "conv", "conv_nd", "fc", "max_pool", "average_pool", "relu", "tanh",
           "softmax", "dropout", "iter", "accuracy", "spatial_bn", "lrn", "layer_norm",
           "instance_norm", "sum", "transpose", "batch_mat_mul", "concat", "depth_concat",
           "db_input", "image_input", "add_weight_decay", "cond", "loop", "conv_transpose", "group_conv",
           "prelu", "Register", "has_helper"]
