"""Caffe2 operators implemented with PyTorch. Importing a family module registers its ops.

The registry imports the families (and so torch) on its first lookup, so that code which only
builds protos or reads databases (``core``, ``workspace.ResetWorkspace``) starts without torch.
"""
import importlib

FAMILY_NAMES = ("nn", "math", "fill", "loss", "utility", "db")


def load_families():
    """Import every op family module (registering its ops); returns the modules."""
    return [importlib.import_module(f"caffe2torch.ops.{name}") for name in FAMILY_NAMES]
