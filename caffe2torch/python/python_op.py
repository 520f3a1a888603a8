"""The functions behind Caffe2's ``Python`` ops: ``core.CreatePythonOperator`` and
``Net.Python(f, grad_f)`` register them here and put the token in the op's ``token`` argument.

``f(inputs, outputs)`` (or ``f(inputs, outputs, workspace)`` with ``pass_workspace``) gets the
op's blobs as :class:`caffe2torch.ops.python_ops.PythonTensor` objects: ``x.data`` (a numpy
array), ``x.shape``; on outputs ``y.feed(array)`` or ``y.reshape(shape)`` then ``y.data[...] = ``.
``grad_f`` gets (inputs + outputs + output gradients) and writes the input gradients. As in
Caffe2, the functions live in this process only: a NetDef holding a Python op runs where it was
built.
"""
import itertools
import threading

_lock = threading.Lock()
_counter = itertools.count()
_FUNCTIONS = {}  # token -> {"forward": f, "gradient": grad_f, "pass_workspace": bool}


def register(f, grad_f=None, python_func_type=None, pass_workspace=False):
    """Register ``f`` (and ``grad_f``); returns the op's token. Caffe2's _RegisterPythonImpl."""
    if python_func_type:
        obj = python_func_type(f)
        f, grad_f = obj.forward, getattr(obj, "backward", None)
    # (builder, args, kwargs) is Caffe2's builder form: each op instance calls the builder once
    # when it is created (a net prepared again, a task instance), and keeps the function.
    if not (callable(f) or _is_builder(f)):
        raise TypeError(f"a Python op needs a callable f(inputs, outputs) or a (builder, args, "
                        f"kwargs) tuple, got {type(f).__name__}")
    with _lock:
        token = f"python_op_{next(_counter)}"
        _FUNCTIONS[token] = {"forward": f, "gradient": grad_f, "pass_workspace": pass_workspace}
    return token


def _is_builder(f):
    return isinstance(f, tuple) and len(f) == 3 and callable(f[0])


def instantiate(token, which):
    """The function of one op instance: the registered one, or a new one from its builder."""
    fn, _ = lookup(token, which)
    return fn[0](*fn[1], **fn[2]) if _is_builder(fn) else fn


def lookup(token, which):
    """(function or builder tuple, pass_workspace) for ``token``; which: forward/gradient."""
    entry = _FUNCTIONS.get(token)
    if entry is None:
        raise RuntimeError(f"Python op token {token!r} is not registered in this process; a "
                           "Python op only runs in the process that created it")
    fn = entry[which]
    if fn is None:
        raise RuntimeError(f"Python op {token!r} has no gradient function; pass grad_f to "
                           "Net.Python(f, grad_f) or CreatePythonOperator")
    return fn, entry["pass_workspace"]
