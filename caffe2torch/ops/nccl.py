"""NCCL collectives across the GPUs of one process (Caffe2's ``contrib/nccl``), in PyTorch.

Input i lives on device i; each output goes where its input is. The ops copy tensors between
devices with ``Tensor.to`` (peer-to-peer where the GPUs allow it) rather than calling NCCL, which
gives the same values; they also run on CPU tensors (Caffe2's were CUDA-only).
"""
import torch

from caffe2torch.ops.registry import NO_GRADIENT, register_op


def _check(ctx, inputs):
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"operator {ctx.op.type} needs one tensor per device")
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) != 1 and ctx.op.type != "NCCLAllGather":
        raise ValueError(f"operator {ctx.op.type}: the inputs must have one shape, got "
                         f"{sorted(shapes)}")


def _sum_on(inputs, device):
    total = inputs[0].to(device, copy=True)
    for x in inputs[1:]:
        total += x.to(device)
    return total


@register_op("NCCLAllreduce", gradient=NO_GRADIENT, cpu_only_inputs=True)
def nccl_allreduce(ctx, inputs):
    """Output i = the sum of all inputs, on input i's device."""
    _check(ctx, inputs)
    total = _sum_on(inputs, inputs[0].device)
    return [total if k == 0 else total.to(x.device, copy=True)
            for k, x in enumerate(inputs)][:len(ctx.output_names)]


@register_op("NCCLBroadcast", gradient=NO_GRADIENT, cpu_only_inputs=True)
def nccl_broadcast(ctx, inputs):
    """Output i = input ``root`` (a rank: an input index), on input i's device."""
    _check(ctx, inputs)
    root = int(ctx.arg("root", 0))
    if not 0 <= root < len(inputs):
        raise ValueError(f"operator NCCLBroadcast: root {root} is not an input index "
                         f"(0..{len(inputs) - 1})")
    return [inputs[root].to(x.device, copy=True) for x in inputs][:len(ctx.output_names)]


@register_op("NCCLReduce", gradient=NO_GRADIENT, cpu_only_inputs=True)
def nccl_reduce(ctx, inputs):
    """Output = the sum of all inputs, on input ``root``'s device."""
    _check(ctx, inputs)
    root = int(ctx.arg("root", 0))
    return [_sum_on(inputs, inputs[root].device)]

