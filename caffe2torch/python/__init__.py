"""Mirrors ``caffe2.python``: core, workspace, model_helper, brew, scope, net_drawer, visualize, utils."""
