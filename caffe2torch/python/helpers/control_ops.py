"""``brew.cond`` and ``brew.loop``: If / While ops over the nets of other models (Caffe2's
``helpers/control_ops.py``). ``external_blobs`` are the blobs the branch or loop nets share with
the model; every other blob they write is local to them."""


def _io(nets, external_blobs):
    external = [str(b) for b in external_blobs]
    read, written = [], []
    for net in nets:
        for op in net.Proto().op:
            read += [n for n in op.input if n in external and n not in read]
            written += [n for n in op.output if n in external and n not in written]
    return read, written


def cond(model, cond_blob, external_blobs, then_model, else_model=None):
    """If ``cond_blob``: run then_model.net, else else_model.net."""
    nets = [then_model.net] + ([else_model.net] if else_model is not None else [])
    read, written = _io(nets, external_blobs)
    args = {"then_net": then_model.net.Proto()}
    if else_model is not None:
        args["else_net"] = else_model.net.Proto()
    cond_blob = str(cond_blob)
    inputs = [cond_blob] + [b for b in read if b != cond_blob]
    # A blob one branch leaves as it was is also an input: its gradient passes through there.
    branches = [then_model.net] + ([else_model.net] if else_model is not None else [None])
    inputs += [b for b in written if b not in inputs
               and any(not _io([n], [b])[1] if n is not None else True for n in branches)]
    return model.net.If(inputs, written, **args)


def loop(model, cond_blob, external_blobs, loop_model, cond_model=None):
    """While ``cond_blob`` (recomputed by cond_model.net first, if given): run loop_model.net."""
    nets = [loop_model.net] + ([cond_model.net] if cond_model is not None else [])
    read, written = _io(nets, external_blobs)
    args = {"loop_net": loop_model.net.Proto()}
    if cond_model is not None:
        args["cond_net"] = cond_model.net.Proto()
    cond_blob = str(cond_blob)
    return model.net.While([cond_blob] + [b for b in read if b != cond_blob], written, **args)
