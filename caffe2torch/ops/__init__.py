"""Caffe2 operators implemented with PyTorch. Importing a family module registers its ops."""
from caffe2torch.ops import db, fill, loss, math, nn, utility

FAMILIES = [nn, math, fill, loss, utility, db]
