"""caffe2torch: Caffe2's Python API and file formats, executed by PyTorch."""
__version__ = "0.1.0"
