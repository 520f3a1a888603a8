"""Caffe2's ``memonger``: fewer live blobs in the backward pass by giving gradient blobs whose
lifetimes do not overlap one shared name.

The executor runs a net's ops in order, so a blob's lifetime is exact: from the op that first
writes it to the op that last reads it. Gradient blobs (names ending ``_grad`` in the name scope,
not parameter gradients, not external inputs or outputs, never read before written) are renamed
to ``<namescope>__m<k>_shared``, each taking a name whose previous blob was last read by an
earlier op; PyTorch frees a tensor once its blob is overwritten, so memory drops with the count.
"""
import copy
import logging

log = logging.getLogger("memonger")


def _proto(net):
    return net.Proto() if hasattr(net, "Proto") else net


def share_grad_blobs(net, losses, param_grads, namescope, dont_share_blobs=None,
                     share_activations=False, blob_shapes=None):
    """A copy of ``net``'s NetDef in which gradient blobs of ``namescope`` share names."""
    if share_activations:
        raise NotImplementedError("memonger.share_grad_blobs(share_activations=True) is not "
                                  "supported: only gradient blobs are shared")
    if namescope and not namescope.endswith("/"):
        namescope += "/"
    proto = copy.deepcopy(_proto(net))
    keep = {str(b) for b in param_grads} | {str(b) for b in (dont_share_blobs or ())}
    keep |= set(proto.external_input) | set(proto.external_output)
    keep |= {str(b) for b in (losses or ())}

    def candidate(name):
        return name.endswith("_grad") and name not in keep and (
            name.startswith(namescope) or name.startswith("_" + namescope))

    first, last, read_first = {}, {}, set()
    for i, op in enumerate(proto.op):
        for name in list(op.input) + list(op.control_input):
            if candidate(name):
                if name not in first:
                    read_first.add(name)  # read before written: its value crosses runs
                first.setdefault(name, i)
                last[name] = i
        for name in op.output:
            if candidate(name):
                first.setdefault(name, i)
                last[name] = i
    blobs = sorted((b for b in first if b not in read_first), key=lambda b: (first[b], b))
    shared_end = []  # per shared name: the index of the op that last reads it
    mapping = {}
    for b in blobs:
        # a name whose last reader came strictly earlier: never one op's input and output
        k = next((j for j, end in enumerate(shared_end) if end < first[b]), len(shared_end))
        if k == len(shared_end):
            shared_end.append(-1)
        shared_end[k] = last[b]
        mapping[b] = f"{namescope}__m{k}_shared"
    for op in proto.op:
        op.input[:] = [mapping.get(n, n) for n in op.input]
        op.output[:] = [mapping.get(n, n) for n in op.output]
        op.control_input[:] = [mapping.get(n, n) for n in op.control_input]
    log.info("memonger: %d gradient blobs of %r share %d names", len(mapping), namescope,
             len(shared_end))
    return proto
