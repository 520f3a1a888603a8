"""The opt-in ``caffe2`` alias: ``caffe2.python``, ``caffe2.proto``, ... are caffe2torch's modules.

Installed only with the ``caffe2-compat`` distribution. Importing ``caffe2`` puts an import hook
in front of ``sys.meta_path`` that answers every ``caffe2.X`` with the module ``caffe2torch.X``
itself (the same object, so workspaces and registries are shared); it refuses to load when
another ``caffe2`` package is importable, rather than mix two Caffe2s in one process.
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"
_PREFIX = __name__ + "."
_TARGET = "caffe2torch"


def _other_caffe2_packages():
    """Paths of ``caffe2`` packages other than this one that Python could import."""
    here = os.path.realpath(os.path.dirname(__file__))
    found = []
    # Another distribution's modules installed into this same folder (an old PyTorch wheel's
    # caffe2/python, a real Caffe2 build): this package only ever holds __init__.py.
    found += [os.path.join(here, name) for name in ("python", "proto", "core")
              if os.path.exists(os.path.join(here, name))]
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "caffe2")
        if os.path.isdir(candidate) and os.path.realpath(candidate) != here:
            found.append(candidate)
    return found


class _AliasLoader(importlib.abc.Loader):
    """Loads ``caffe2.X`` as the already importable module ``caffe2torch.X``."""

    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        """The caffe2torch module itself: import machinery keeps its name, spec and path."""
        return importlib.import_module(self.target)

    def exec_module(self, module):
        """Nothing to run: ``create_module`` returned an imported module."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``caffe2.X`` where caffe2torch has ``caffe2torch.X``; anything else is not found."""

    def find_spec(self, fullname, path=None, target=None):
        """A spec whose loader hands out ``caffe2torch.X``, or None when caffe2torch lacks it."""
        if not fullname.startswith(_PREFIX):
            return None
        aliased = _TARGET + fullname[len(__name__):]
        found = importlib.util.find_spec(aliased)
        if found is None:
            return None
        return importlib.util.spec_from_loader(
            fullname, _AliasLoader(aliased), is_package=found.submodule_search_locations is not None)


_others = _other_caffe2_packages()
if _others:
    raise ImportError(f"caffe2-compat: another caffe2 package is importable ({', '.join(_others)}); "
                      "the caffe2torch alias will not mix with it: uninstall caffe2-compat "
                      "(pip uninstall caffe2-compat) or remove the other caffe2 from the path")
if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
del _others
