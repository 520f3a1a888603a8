"""Caffe2 operators implemented with PyTorch. Importing a family module registers its ops."""
import importlib

_FAMILY_MODULES = ("nn", "math", "fill", "loss", "utility", "db")

FAMILIES = []
for _name in _FAMILY_MODULES:
    try:
        FAMILIES.append(importlib.import_module(f"caffe2torch.ops.{_name}"))
    except ModuleNotFoundError as exc:  # a family not written yet
        if exc.name != f"caffe2torch.ops.{_name}":
            raise
