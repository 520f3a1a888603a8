"""Caffe2 operators implemented with PyTorch. Importing a family module registers its ops.

Every module of this package except the registry is an op family (one file per family). The
registry imports the families (and so torch) on its first lookup, so that code which only builds
protos or reads databases (``core``, ``workspace.ResetWorkspace``) starts without torch.
"""
import importlib
import pkgutil

# The original families first (their order is docs/ops.md's); families added later follow by name.
_FIRST = ("nn", "math", "fill", "loss", "utility", "db")
_NOT_FAMILIES = {"registry"}


def _family_names():
    found = {m.name for m in pkgutil.iter_modules(__path__)
             if not m.name.startswith("_") and m.name not in _NOT_FAMILIES and not m.ispkg}
    return tuple(n for n in _FIRST if n in found) + tuple(sorted(found - set(_FIRST)))


FAMILY_NAMES = _family_names()


class FamilyImportError(ImportError):
    """An op family module failed to import; the registry then answers every lookup with it."""


def load_families():
    """Import every op family module (registering its ops); returns the modules."""
    modules = []
    for name in FAMILY_NAMES:
        try:
            modules.append(importlib.import_module(f"caffe2torch.ops.{name}"))
        except Exception as exc:
            raise FamilyImportError(
                f"op family caffe2torch.ops.{name} failed to import ({type(exc).__name__}: "
                f"{exc}); no operator can be looked up until it imports") from exc
    return modules
