"""``python -m caffe2torch.convert``: the caffe2torch-convert command."""
import sys

from caffe2torch.convert.cli import main

sys.exit(main())
