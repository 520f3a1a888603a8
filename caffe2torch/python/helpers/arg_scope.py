"""``brew.arg_scope``: default keyword arguments for chosen helpers inside a ``with`` block."""
import contextlib
import copy
import threading

_local = threading.local()


def get_current_scope():
    """{helper name: {kwarg: value}} of the active arg scopes (thread-local)."""
    if not hasattr(_local, "current_scope"):
        _local.current_scope = {}
    return _local.current_scope


@contextlib.contextmanager
def arg_scope(single_helper_or_list, **kwargs):
    """Give ``kwargs`` to every call of the helper(s) inside the block; explicit kwargs win.

    Example: ``with brew.arg_scope([brew.conv, brew.fc], WeightInitializer=...)``.
    """
    helpers = single_helper_or_list
    if not isinstance(helpers, (list, tuple)):
        helpers = [helpers]
    for helper in helpers:
        if not callable(helper):
            raise TypeError(f"arg_scope takes brew helper functions (e.g. brew.conv), not {helper!r}")
    old_scope = copy.deepcopy(get_current_scope())
    current = get_current_scope()
    for helper in helpers:
        current.setdefault(helper.__name__, {}).update(kwargs)
    try:
        yield
    finally:
        _local.current_scope = old_scope
