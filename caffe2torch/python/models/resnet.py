"""ResNets and ResNeXts built with brew (Caffe2's ``caffe2.python.models.resnet``).

"Deep Residual Learning for Image Recognition" (He et al. 2015) and "Aggregated Residual
Transformations for Deep Neural Networks" (Xie et al. 2016). Blob names follow Caffe2's
(``conv1``, ``comp_<k>_conv_<i>``, ``comp_<k>_spatbn_<i>``, ``shortcut_projection_<k>``,
``final_avg``, ``last_out_L<labels>``, ``softmax``, ``loss``), so Caffe2's checkpoints load.
"""
import logging

from caffe2torch.python import brew

log = logging.getLogger("resnext_builder")

# blocks per stage for each depth
RESNEXT_BLOCK_CONFIG = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
                        101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3)}
RESNEXT_STRIDES = [1, 2, 2, 2]


class ResNetBuilder:
    """Adds residual components to ``model``, starting from blob ``prev_blob``."""

    def __init__(self, model, prev_blob, no_bias, is_test, bn_epsilon=1e-5, bn_momentum=0.9):
        self.model = model
        self.comp_count = 0  # components added so far
        self.comp_idx = 0  # layers within the current component
        self.prev_blob = prev_blob
        self.is_test = is_test
        self.bn_epsilon = bn_epsilon
        self.bn_momentum = bn_momentum
        self.no_bias = 1 if no_bias else 0

    def add_conv(self, in_filters, out_filters, kernel, stride=1, group=1, pad=0):
        """An MSRA-initialized convolution after the previous blob."""
        self.comp_idx += 1
        self.prev_blob = brew.conv(
            self.model, self.prev_blob, f"comp_{self.comp_count}_conv_{self.comp_idx}",
            in_filters, out_filters, weight_init=("MSRAFill", {}), kernel=kernel,
            stride=stride, group=group, pad=pad, no_bias=self.no_bias)
        return self.prev_blob

    def add_relu(self):
        """An in-place Relu."""
        self.prev_blob = brew.relu(self.model, self.prev_blob, self.prev_blob)
        return self.prev_blob

    def add_spatial_bn(self, num_filters):
        """A SpatialBN with the builder's epsilon and momentum."""
        self.prev_blob = brew.spatial_bn(
            self.model, self.prev_blob, f"comp_{self.comp_count}_spatbn_{self.comp_idx}",
            num_filters, epsilon=self.bn_epsilon, momentum=self.bn_momentum,
            is_test=self.is_test)
        return self.prev_blob

    def _shortcut(self, blob, in_filters, out_filters, stride, epsilon, momentum,
                  spatial_batch_norm):
        blob = brew.conv(self.model, blob, f"shortcut_projection_{self.comp_count}", in_filters,
                         out_filters, weight_init=("MSRAFill", {}), kernel=1, stride=stride,
                         no_bias=self.no_bias)
        if spatial_batch_norm:
            kwargs = {"momentum": momentum} if momentum is not None else {}
            blob = brew.spatial_bn(self.model, blob,
                                   f"shortcut_projection_{self.comp_count}_spatbn",
                                   out_filters, epsilon=epsilon, is_test=self.is_test, **kwargs)
        return blob

    def _close(self, shortcut_blob, last_conv):
        self.prev_blob = brew.sum(self.model, [shortcut_blob, last_conv],
                                  f"comp_{self.comp_count}_sum_{self.comp_idx}")
        self.comp_idx += 1
        self.add_relu()
        self.comp_count += 1

    def add_bottleneck(self, input_filters, base_filters, output_filters, stride=1, group=1,
                       spatial_batch_norm=True):
        """1x1, 3x3 (grouped, strided), 1x1 convolutions plus the shortcut (He et al. Fig. 3)."""
        self.comp_idx = 0
        shortcut_blob = self.prev_blob
        self.add_conv(input_filters, base_filters, kernel=1)
        if spatial_batch_norm:
            self.add_spatial_bn(base_filters)
        self.add_relu()
        self.add_conv(base_filters, base_filters, kernel=3, stride=stride, group=group, pad=1)
        if spatial_batch_norm:
            self.add_spatial_bn(base_filters)
        self.add_relu()
        last_conv = self.add_conv(base_filters, output_filters, kernel=1)
        if spatial_batch_norm:
            last_conv = self.add_spatial_bn(output_filters)
        if output_filters != input_filters:  # the stage changes: project the shortcut
            shortcut_blob = self._shortcut(shortcut_blob, input_filters, output_filters, stride,
                                           self.bn_epsilon, self.bn_momentum,
                                           spatial_batch_norm)
        self._close(shortcut_blob, last_conv)
        return output_filters

    def add_simple_block(self, input_filters, num_filters, down_sampling=False,
                         spatial_batch_norm=True):
        """Two 3x3 convolutions plus the shortcut (the 32x32 ResNet's block)."""
        self.comp_idx = 0
        shortcut_blob = self.prev_blob
        stride = 2 if down_sampling else 1
        self.add_conv(input_filters, num_filters, kernel=3, stride=stride, pad=1)
        if spatial_batch_norm:
            self.add_spatial_bn(num_filters)
        self.add_relu()
        last_conv = self.add_conv(num_filters, num_filters, kernel=3, pad=1)
        if spatial_batch_norm:
            last_conv = self.add_spatial_bn(num_filters)
        if num_filters != input_filters:
            # Caffe2 uses epsilon 1e-3 and SpatialBN's default momentum here
            shortcut_blob = self._shortcut(shortcut_blob, input_filters, num_filters, stride,
                                           1e-3, None, spatial_batch_norm)
        self._close(shortcut_blob, last_conv)


def create_resnet_32x32(model, data, num_input_channels, num_groups, num_labels, is_test=False):
    """The CIFAR-size ResNet of He et al. section 4.2 (``num_groups`` is the paper's n)."""
    brew.conv(model, data, "conv1", num_input_channels, 16, kernel=3, stride=1)
    brew.spatial_bn(model, "conv1", "conv1_spatbn", 16, epsilon=1e-3, is_test=is_test)
    brew.relu(model, "conv1_spatbn", "relu1")
    filters = [16, 32, 64]
    builder = ResNetBuilder(model, "relu1", no_bias=0, is_test=is_test)
    prev_filters = 16
    for group_idx in range(3):
        for block_idx in range(2 * num_groups):
            builder.add_simple_block(prev_filters if block_idx == 0 else filters[group_idx],
                                     filters[group_idx],
                                     down_sampling=block_idx == 0 and group_idx > 0)
        prev_filters = filters[group_idx]
    brew.average_pool(model, builder.prev_blob, "final_avg", kernel=8, stride=1)
    brew.fc(model, "final_avg", "last_out", 64, num_labels)
    return brew.softmax(model, "last_out", "softmax")


def create_resnext(model, data, num_input_channels, num_labels, num_layers, num_groups,
                   num_width_per_group, label=None, is_test=False, no_loss=False, no_bias=1,
                   conv1_kernel=7, conv1_stride=2, final_avg_kernel=7, log=None,
                   bn_epsilon=1e-5, bn_momentum=0.9):
    """A ResNeXt-<num_layers> (<num_groups>x<num_width_per_group>d); with ``label`` returns
    (softmax, loss) from SoftmaxWithLoss, else the softmax (or the logits with no_loss)."""
    if num_layers not in RESNEXT_BLOCK_CONFIG:
        raise ValueError(f"{num_layers}-layer is invalid for resnext config: use one of "
                         f"{sorted(RESNEXT_BLOCK_CONFIG)}")
    num_blocks = RESNEXT_BLOCK_CONFIG[num_layers]
    num_filters = [64, 64, 128, 256, 512] if num_layers in (18, 34) else \
        [64, 256, 512, 1024, 2048]
    conv = brew.conv(model, data, "conv1", num_input_channels, num_filters[0],
                     weight_init=("MSRAFill", {}), kernel=conv1_kernel, stride=conv1_stride,
                     pad=3, no_bias=no_bias)
    bn = brew.spatial_bn(model, conv, "conv1_spatbn_relu", num_filters[0], epsilon=bn_epsilon,
                         momentum=bn_momentum, is_test=is_test)
    relu = brew.relu(model, bn, bn)
    pool = brew.max_pool(model, relu, "pool1", kernel=3, stride=2, pad=1)
    # Caffe2 builds the blocks with these fixed values, whatever bn_epsilon/bn_momentum say.
    builder = ResNetBuilder(model, pool, no_bias=no_bias, is_test=is_test, bn_epsilon=1e-5,
                            bn_momentum=0.9)
    inner_dim = num_groups * num_width_per_group
    for stage in range(4):
        dim_in = num_filters[stage]
        for block in range(num_blocks[stage]):
            dim_in = builder.add_bottleneck(dim_in, inner_dim, num_filters[stage + 1],
                                            stride=RESNEXT_STRIDES[stage] if block == 0 else 1,
                                            group=num_groups)
        inner_dim *= 2
    final_avg = brew.average_pool(model, builder.prev_blob, "final_avg",
                                  kernel=final_avg_kernel, stride=1, global_pooling=True)
    last_out = brew.fc(model, final_avg, f"last_out_L{num_labels}", num_filters[-1], num_labels)
    if no_loss:
        return last_out
    if label is not None:
        softmax, loss = model.SoftmaxWithLoss([last_out, label], ["softmax", "loss"])
        return softmax, loss
    return brew.softmax(model, last_out, "softmax")


def create_resnet50(model, data, num_input_channels, num_labels, label=None, is_test=False,
                    no_loss=False, no_bias=0, conv1_kernel=7, conv1_stride=2,
                    final_avg_kernel=7):
    """ResNet-50: ResNeXt-50 with one group of width 64 (Caffe2's definition)."""
    return create_resnext(model, data, num_input_channels, num_labels, num_layers=50,
                          num_groups=1, num_width_per_group=64, label=label, is_test=is_test,
                          no_loss=no_loss, no_bias=no_bias, conv1_kernel=conv1_kernel,
                          conv1_stride=conv1_stride, final_avg_kernel=final_avg_kernel)
