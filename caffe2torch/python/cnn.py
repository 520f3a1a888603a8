"""Caffe2's deprecated ``cnn.CNNModelHelper``: a ModelHelper whose methods call brew's helpers.

Example (the early MNIST tutorial)::

    model = cnn.CNNModelHelper(order="NCHW", name="mnist_train")
    conv1 = model.Conv("data", "conv1", dim_in=1, dim_out=20, kernel=5)
    pool1 = model.MaxPool(conv1, "pool1", kernel=2, stride=2)
"""
import logging

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import brew
from caffe2torch.python.model_helper import ModelHelper

log = logging.getLogger("caffe2torch")


class CNNModelHelper(ModelHelper):
    """ModelHelper with ``order``/``use_cudnn`` defaults and Conv/FC/... methods (deprecated)."""

    def __init__(self, order="NCHW", name=None, use_cudnn=True, cudnn_exhaustive_search=False,
                 ws_nbytes_limit=None, init_params=True, skip_sparse_optim=False,
                 param_model=None):
        log.warning("[====DEPRECATE WARNING====]: you are creating an object from "
                    "CNNModelHelper class which will be deprecated soon. Please use "
                    "ModelHelper object with brew module.")
        if order not in ("NHWC", "NCHW"):
            raise ValueError(f"Cannot understand the CNN storage order {order}.")
        cnn_arg_scope = {"order": order, "use_cudnn": use_cudnn,
                         "cudnn_exhaustive_search": cudnn_exhaustive_search}
        if ws_nbytes_limit:
            cnn_arg_scope["ws_nbytes_limit"] = ws_nbytes_limit
        super().__init__(skip_sparse_optim=skip_sparse_optim,
                         name="CNN" if name is None else name, init_params=init_params,
                         param_model=param_model, arg_scope=cnn_arg_scope)
        self.order = order
        self.use_cudnn = use_cudnn
        self.cudnn_exhaustive_search = cudnn_exhaustive_search
        self.ws_nbytes_limit = ws_nbytes_limit

    def _conv_kwargs(self):
        kwargs = dict(use_cudnn=self.use_cudnn, order=self.order,
                      cudnn_exhaustive_search=self.cudnn_exhaustive_search)
        if self.ws_nbytes_limit:
            kwargs["ws_nbytes_limit"] = self.ws_nbytes_limit
        return kwargs

    def Conv(self, *args, **kwargs):
        """brew.conv."""
        return brew.conv(self, *args, **{**self._conv_kwargs(), **kwargs})

    def ConvNd(self, *args, **kwargs):
        """brew.conv_nd."""
        return brew.conv_nd(self, *args, **{**self._conv_kwargs(), **kwargs})

    def FC(self, *args, **kwargs):
        """brew.fc."""
        return brew.fc(self, *args, **kwargs)

    def Dropout(self, *args, **kwargs):
        """brew.dropout."""
        return brew.dropout(self, *args, **{"order": self.order, "use_cudnn": self.use_cudnn,
                                            **kwargs})

    def LRN(self, *args, **kwargs):
        """brew.lrn."""
        return brew.lrn(self, *args, **{"order": self.order, "use_cudnn": self.use_cudnn,
                                        **kwargs})

    def Softmax(self, *args, **kwargs):
        """brew.softmax."""
        return brew.softmax(self, *args, **{"use_cudnn": self.use_cudnn, **kwargs})

    def SpatialBN(self, *args, **kwargs):
        """brew.spatial_bn."""
        return brew.spatial_bn(self, *args, **{"order": self.order, **kwargs})

    def InstanceNorm(self, *args, **kwargs):
        """brew.instance_norm."""
        return brew.instance_norm(self, *args, **{"order": self.order, **kwargs})

    def Relu(self, *args, **kwargs):
        """brew.relu."""
        return brew.relu(self, *args, **{"order": self.order, "use_cudnn": self.use_cudnn,
                                         **kwargs})

    def Tanh(self, *args, **kwargs):
        """brew.tanh."""
        return brew.tanh(self, *args, **{"order": self.order, "use_cudnn": self.use_cudnn,
                                         **kwargs})

    def Concat(self, *args, **kwargs):
        """brew.concat."""
        return brew.concat(self, *args, **{"order": self.order, **kwargs})

    def DepthConcat(self, *args, **kwargs):
        """The deprecated name of Concat."""
        print("DepthConcat is deprecated. use Concat instead.")
        return self.Concat(*args, **kwargs)

    def Sum(self, *args, **kwargs):
        """brew.sum."""
        return brew.sum(self, *args, **kwargs)

    def Transpose(self, *args, **kwargs):
        """brew.transpose."""
        return brew.transpose(self, *args, **{"use_cudnn": self.use_cudnn, **kwargs})

    def Iter(self, *args, **kwargs):
        """brew.iter."""
        return brew.iter(self, *args, **kwargs)

    def Accuracy(self, *args, **kwargs):
        """brew.accuracy."""
        return brew.accuracy(self, *args, **kwargs)

    def MaxPool(self, *args, **kwargs):
        """brew.max_pool."""
        return brew.max_pool(self, *args, **{"use_cudnn": self.use_cudnn, "order": self.order,
                                             **kwargs})

    def AveragePool(self, *args, **kwargs):
        """brew.average_pool."""
        return brew.average_pool(self, *args, **{"use_cudnn": self.use_cudnn,
                                                 "order": self.order, **kwargs})

    def AddWeightDecay(self, weight_decay):
        """brew.add_weight_decay."""
        return brew.add_weight_decay(self, weight_decay)

    def PadImage(self, blob_in, blob_out, **kwargs):
        """The PadImage op."""
        return self.net.PadImage(blob_in, blob_out, **kwargs)

    @property
    def XavierInit(self):
        """("XavierFill", {})."""
        return ("XavierFill", {})

    def ConstantInit(self, value):
        """("ConstantFill", {"value": value})."""
        return ("ConstantFill", dict(value=value))

    @property
    def MSRAInit(self):
        """("MSRAFill", {})."""
        return ("MSRAFill", {})

    @property
    def ZeroInit(self):
        """("ConstantFill", {})."""
        return ("ConstantFill", {})

    @property
    def CPU(self):
        """A CPU DeviceOption."""
        return caffe2_pb2.DeviceOption(device_type=caffe2_pb2.CPU)

    @property
    def GPU(self, gpu_id=0):
        """A CUDA DeviceOption for GPU 0."""
        return caffe2_pb2.DeviceOption(device_type=caffe2_pb2.CUDA, cuda_gpu_id=gpu_id)
