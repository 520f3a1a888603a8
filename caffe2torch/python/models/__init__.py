"""Mirrors ``caffe2.python.models``: the model builders Caffe2 shipped there (``resnet``) and the
model-zoo models installed by ``models.download -i``.

Caffe2's downloader installed a zoo model (``python -m caffe2.python.models.download -i
squeezenet``) as the package ``caffe2.python.models.squeezenet``, whose ``init_net`` and
``predict_net`` are the parsed NetDefs. caffe2torch installs into a folder of the user's
(:func:`install_folder`: ``$CAFFE2TORCH_MODELS``, default ``~/.caffe2torch/models``) rather than
into the installed package, and that folder is on this package's search path, so Caffe2's
``from caffe2torch.python.models import squeezenet as mynet`` reads the installed model.
"""
import os

ENV_VAR = "CAFFE2TORCH_MODELS"


def install_folder() -> str:
    """Where ``download -i`` installs models: ``$CAFFE2TORCH_MODELS`` or ~/.caffe2torch/models."""
    return os.path.expanduser(os.environ.get(ENV_VAR) or os.path.join("~", ".caffe2torch", "models"))


# Installed models are subpackages found in the user's folder (a plain package-path entry, as
# pkgutil.extend_path makes; nothing is swapped in sys.modules).
__path__.append(install_folder())
