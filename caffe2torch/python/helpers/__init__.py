"""brew's helper functions, one module per family (Caffe2's ``caffe2/python/helpers``).

Each helper takes the model first and adds ops to ``model.net`` (and parameters to
``model.param_init_net``); call them through :mod:`caffe2torch.python.brew`, which merges the
model's and the ``brew.arg_scope`` keyword arguments into every call.
"""
