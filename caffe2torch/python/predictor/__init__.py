"""Caffe2's predictor export: a trained net and its weights in one DB file (see
:mod:`caffe2torch.python.predictor.predictor_exporter`)."""
