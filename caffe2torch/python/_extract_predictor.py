"""Caffe2's ``model_helper.ExtractPredictorNet``: the prediction part of a (test) model's net."""
import logging

from caffe2torch.python import core

log = logging.getLogger("caffe2torch")


def ExtractPredictorNet(net_proto, input_blobs, output_blobs, device=None, renames=None,
                        disabled_inputs=None):
    """(predict net, parameter names): the ops from the first reader of ``input_blobs`` to the
    last writer of ``output_blobs`` whose inputs are known, optionally moved to ``device`` and
    with blobs renamed by ``renames``; ops with ``is_test=0`` raise (extract from a test model).
    """
    predict_net = core.Net(net_proto.name + "_predict")
    proto = predict_net.Proto()
    orig_inputs, orig_outputs = set(net_proto.external_input), set(net_proto.external_output)
    input_blobs = {str(b) for b in input_blobs}
    output_blobs = {str(b) for b in output_blobs}
    known = orig_inputs | input_blobs
    if disabled_inputs is not None:
        known -= set(disabled_inputs)
    renames = renames or {}
    external_inputs, external_outputs = set(input_blobs), set(output_blobs)
    ops = list(net_proto.op)
    starts = [j for j, op in enumerate(ops)
              if input_blobs & set(op.input) and op.type != "StopGradient"]
    ends = [j for j, op in enumerate(ops) if output_blobs & set(op.output)]
    if not starts:
        raise ValueError(f"No ops with input={sorted(input_blobs)}")
    if not ends:
        raise ValueError(f"No ops with output={sorted(output_blobs)}")
    for op in ops[min(starts):max(ends) + 1]:
        if not known.issuperset(op.input):
            log.debug("Op %s had unknown inputs: %s", op.type, set(op.input) - known)
            continue
        op = type(op).FromString(op.SerializeToString())
        if device is not None:
            op.device_option.device_type = device.device_type
            op.device_option.cuda_gpu_id = device.cuda_gpu_id
        if any(a.name == "is_test" and a.i == 0 for a in op.arg):
            raise ValueError(f"An operator had is_test=0, did you try to extract a predictor "
                             f"from a train model (instead of test model)? Op was: {op.type} "
                             f"{list(op.input)} -> {list(op.output)}")
        proto.op.extend([op])
        known.update(op.output)
        external_inputs.update(set(op.input) & orig_inputs)
        external_outputs.update(set(op.output) & orig_outputs)
    proto.external_input.extend(sorted(renames.get(b, b) for b in external_inputs))
    proto.external_output.extend(sorted(renames.get(b, b) for b in external_outputs))
    for op in proto.op:
        op.input[:] = [renames.get(b, b) for b in op.input]
        op.output[:] = [renames.get(b, b) for b in op.output]
    renamed_inputs = {renames.get(b, b) for b in input_blobs}
    return predict_net, sorted(set(proto.external_input) - renamed_inputs)
