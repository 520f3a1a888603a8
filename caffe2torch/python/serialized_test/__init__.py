"""Caffe2's ``serialized_test``: the base class its operator tests derive from."""
