"""Caffe2's ``modeling`` package: parameter initializers and parameter info."""
