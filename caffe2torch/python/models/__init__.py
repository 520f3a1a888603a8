"""Model builders Caffe2 shipped in ``caffe2.python.models`` (ResNet/ResNeXt)."""
