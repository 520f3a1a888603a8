"""Command-line tools that Caffe2 shipped as binaries (``python -m caffe2torch.binaries.<tool>``)."""
