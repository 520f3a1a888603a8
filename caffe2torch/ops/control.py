"""Control flow: ``If`` (then_net / else_net) and ``While`` (loop_net, optional cond_net).

The nets in the arguments run in a block scope over the op's workspace: a write to a blob that
exists outside the block updates it, a blob first written inside the block is local and gone
when the op ends. These are the block rules of Caffe2's NetBuilder and ``brew.cond``/``loop``
(which Caffe2 realizes with extra Do/CreateScope ops); a bare Caffe2 ``If`` would leave the
branch's new blobs in the workspace. The condition is a one-element bool (or number) tensor.

Gradients (Caffe2's ``control_ops_grad``): ``IfGradient`` runs the backward pass of the branch
the forward took, over the blobs that branch left (kept by the forward If, as Caffe2 keeps the
Do op's workspace); the other branch's inputs get zero gradients. ``WhileGradient`` walks the
iterations backwards: the forward While snapshots the blobs it writes at the start of each
iteration (only when a WhileGradient is in a prepared net), and each backward iteration
recomputes the body from its snapshot and backpropagates through it, carrying the gradients of
the loop's state to the previous iteration. Random ops in a loop body draw again there.
"""
import collections.abc
import hashlib

import torch

from caffe2torch.ops.registry import NO_GRADIENT, grad_name, gradient_op, register_op


class _BlockBlobs(collections.abc.MutableMapping):
    """Blobs of a block: reads see the outer blobs; writes go outside unless the name is new."""

    def __init__(self, outer, private=False):
        self.outer = outer
        self.local = {}
        # A gradient block writes nothing outside: its op returns what it computed.
        self.private = private

    def __getitem__(self, key):
        if key in self.local:
            return self.local[key]
        return self.outer[key]

    def __setitem__(self, key, value):
        if self.private or key in self.local or key not in self.outer:
            self.local[key] = value
        else:
            self.outer[key] = value

    def __delitem__(self, key):
        if key in self.local:
            del self.local[key]
        else:
            del self.outer[key]

    def __iter__(self):
        yield from self.local
        yield from (k for k in self.outer if k not in self.local)

    def __len__(self):
        return len(self.local) + sum(1 for k in self.outer if k not in self.local)

    def __contains__(self, key):
        return key in self.local or key in self.outer


class _Block:
    """A workspace view for the nets of one control op (what PreparedNet needs)."""

    def __init__(self, workspace, private=False):
        self.blobs = _BlockBlobs(workspace.blobs, private)
        self.nets = {}
        self.root_folder = workspace.root_folder
        self.root_folder_name = getattr(workspace, "root_folder_name", workspace.root_folder)


class _Nets(dict):
    """The op's prepared nets by argument name; closed with the outer net."""

    def close(self):
        """Release what the nets' ops opened."""
        for net in self.values():
            net.close()


def _net(ctx, name):
    """A PreparedNet for argument ``name`` (prepared at first use, when its inputs exist)."""
    nets = ctx.state.setdefault("nets", _Nets())
    if name not in nets:
        from caffe2torch.python.executor import PreparedNet
        block = ctx.state.setdefault("block", _Block(ctx.workspace))
        nets[name] = PreparedNet(ctx.arg(name), block)
    return nets[name]


def _truth(ctx, value):
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"operator {ctx.op.type}: condition {ctx.input_names[0]!r} must be a "
                         "tensor of one value")
    return bool(value.reshape(()).item())


def _outputs(ctx):
    # The nets wrote their outputs into the workspace already; the op reports them as they are.
    return [ctx.workspace.blobs.get(n) for n in ctx.output_names]


def _if_grad_maker(op, g_output):
    """IfGradient(cond, dY..., blobs read) -> dX...: the taken branch's backward net."""
    return _if_grad(op, g_output)


def _while_grad_maker(op, g_output):
    """WhileGradient(dY..., blobs read) -> dX...: the body's backward, iterations reversed."""
    return _while_grad(op, g_output)


def _control_setup(*required):
    def setup(ctx):
        for name in required:
            ctx.require(name)
        ctx.state["block"] = _Block(ctx.workspace)
    return setup


@register_op("If", gradient=_if_grad_maker, setup=_control_setup("then_net"),
             cpu_only_inputs=True, side_effects=True)
def if_op(ctx, inputs):
    """Run then_net if the condition holds, else else_net (when given), in a block scope."""
    local = ctx.state["block"].blobs.local
    local.clear()
    taken = _truth(ctx, inputs[0])
    if taken:
        _net(ctx, "then_net").run(1)
    elif ctx.arg("else_net") is not None:
        _net(ctx, "else_net").run(1)
    # What IfGradient reads: the branch taken and its block's blobs (a nested If's too, so the
    # hidden blob is kept always, as Caffe2 keeps a Do op's workspace).
    ctx.workspace.blobs[saved_blobs_name(ctx.op)] = (taken, dict(local))
    local.clear()
    return _outputs(ctx)


@register_op("While", gradient=_while_grad_maker, setup=_control_setup("loop_net"),
             cpu_only_inputs=True, side_effects=True)
def while_op(ctx, inputs):
    """Repeat: run cond_net (if given), stop when the condition is false, run loop_net."""
    block = ctx.state["block"]
    block.blobs.local.clear()
    cond_name = ctx.input_names[0]
    has_cond_net = ctx.arg("cond_net") is not None
    saved = saved_blobs_name(ctx.op)
    # Snapshots for WhileGradient, only when one is prepared (its setup names the blob).
    stack = [] if saved in ctx.workspace.blobs else None
    while True:
        if has_cond_net:
            _net(ctx, "cond_net").run(1)
        if not _truth(ctx, block.blobs[cond_name]):
            break
        if stack is not None:
            stack.append({n: _snapshot(block.blobs[n]) for n in ctx.output_names
                          if n != cond_name and block.blobs.get(n) is not None})
        _net(ctx, "loop_net").run(1)
    block.blobs.local.clear()
    if stack is not None:
        ctx.workspace.blobs[saved] = stack
    return _outputs(ctx)


def _snapshot(value):
    # Loop ops may update their state in place (Iter): the snapshot must not follow.
    return value.clone() if isinstance(value, torch.Tensor) else value


def saved_blobs_name(op):
    """The hidden blob where a forward If/While keeps what its gradient op reads."""
    key = "\0".join([op.type, *op.input, "->", *op.output]).encode()
    return f"_{op.type.lower()}_fwd_blobs_{hashlib.sha1(key).hexdigest()[:10]}"


# --- gradients ----------------------------------------------------------------------------------

def _net_arg(op, name):
    from caffe2torch.proto import caffe2_pb2
    for a in op.arg:
        if a.name == name:
            return a.n
    return caffe2_pb2.NetDef() if name == "else_net" else None


def _branch_backward(net, outer_inputs, g_of):
    """(backward ops, {outer input: gradient of its value before the branch, or None})."""
    from caffe2torch.python import core
    from caffe2torch.python.gradients import backward_pass
    written = {o for op in net.op for o in op.output}
    ys = {y: g for y, g in g_of.items() if y in written}
    versioned = {}
    grad_ops = []
    if ys:
        grad_ops, _ = backward_pass(list(net.op), ys, core.CreateOperator, versioned)
    found = {}
    for x in outer_inputs:
        inner = versioned.get((x, 0))
        # A blob the branch does not write keeps its value: its gradient passes through.
        through = g_of.get(x) if x not in written else None
        if inner and through:
            total = f"{x}_grad/_branch_sum"
            grad_ops.append(core.CreateOperator("Sum", [inner, through], [total]))
            inner = total
        found[x] = inner or through
    return grad_ops, found


def _netdef(name, ops):
    from caffe2torch.proto import caffe2_pb2
    net = caffe2_pb2.NetDef(name=name)
    net.op.extend(ops)
    return net


def _external_reads(nets, outer):
    """Blobs of ``outer`` that the gradient nets read before writing them (the op's inputs)."""
    reads = []
    for net in nets:
        made = set()
        for op in net.op:
            reads += [n for n in op.input if n in outer and n not in made and n not in reads]
            made.update(op.output)
    return reads


def _if_grad(op, g_output):
    from caffe2torch.python import core
    outer_inputs = list(dict.fromkeys(op.input[1:]))
    g_of = {y: str(g) for y, g in zip(op.output, g_output) if g is not None}
    branches = []
    for name in ("then_net", "else_net"):
        branches.append(_branch_backward(_net_arg(op, name), outer_inputs, g_of))
    wrt = [x for x in outer_inputs if any(found[x] for _, found in branches)]
    if not wrt:
        return [], [None] * len(op.input)
    nets, grads = [], []
    for (grad_ops, found), name in zip(branches, ("then", "else")):
        names = []
        for x in wrt:
            if found[x] is None:
                # The branch not taken leaves x's gradient at zero (Caffe2's zero-init ops).
                zero = f"{x}_grad/_{name}_zero"
                grad_ops.append(core.CreateOperator("ConstantFill", [x], [zero], value=0.0))
                found[x] = zero
            names.append(found[x])
        nets.append(_netdef(f"{name}_grad", grad_ops))
        grads.append(names)
    outer = set(op.input) | set(op.output) | set(g_of.values())
    inputs = [op.input[0]] + [n for n in _external_reads(nets, outer) if n != op.input[0]]
    g_input = {x: grad_name(x) for x in wrt}
    grad = gradient_op(op, "IfGradient", inputs, [g_input[x] for x in wrt], copy_args=False,
                       then_net=nets[0], else_net=nets[1], then_grads=grads[0],
                       else_grads=grads[1], saved_blobs=saved_blobs_name(op))
    return [grad], [g_input.get(x) if k else None for k, x in enumerate(op.input)]


def _grad_setup(ctx):
    ctx.require("saved_blobs")
    # The forward op finds this name and keeps what the gradient reads (While's snapshots).
    ctx.workspace.blobs.setdefault(ctx.arg("saved_blobs"), None)
    ctx.state["block"] = _Block(ctx.workspace, private=True)


def _saved(ctx):
    saved = ctx.workspace.blobs.get(ctx.arg("saved_blobs"))
    if saved is None:
        forward = ctx.op.type[:-len("Gradient")]
        raise RuntimeError(f"{ctx.op.type} needs the blobs of its forward {forward} op, which "
                           "has not run: run the forward ops (in the same net) first")
    return saved


def _zeros_for(ctx, name, value):
    if value is None:
        value = ctx.workspace.blobs[name]
    return torch.zeros_like(value, dtype=value.dtype if value.is_floating_point()
                            else torch.float32)


@register_op("IfGradient", gradient=NO_GRADIENT, setup=_grad_setup, cpu_only_inputs=True,
             side_effects=True)
def if_gradient(ctx, inputs):
    """The gradient of If: the backward net of the branch the forward If took."""
    taken, branch_blobs = _saved(ctx)
    which = "then" if taken else "else"
    local = ctx.state["block"].blobs.local
    local.clear()
    local.update(branch_blobs)
    _net(ctx, f"{which}_net").run(1)
    out = [local[n] if n in local else ctx.workspace.blobs[n] for n in ctx.arg(f"{which}_grads")]
    local.clear()
    return out


def _ssa(ops, tag):
    """``ops`` with every write renamed to a new blob (reads follow): (ops, last names)."""
    from caffe2torch.proto import caffe2_pb2
    current, renamed = {}, []
    for k, op in enumerate(ops):
        if op.type in ("If", "While"):
            raise NotImplementedError(f"a While body holding an {op.type} op has no gradient in "
                                      "caffe2torch; unroll the inner control flow")
        new = caffe2_pb2.OperatorDef()
        new.CopyFrom(op)
        new.input[:] = [current.get(n, n) for n in op.input]
        for j, name in enumerate(op.output):
            current[name] = new.output[j] = f"{name}/_{tag}_{k}_{j}"
        renamed.append(new)
    return renamed, current


def _needed(forward_ops, backward_ops):
    """The forward ops that compute what the backward ops read (the rest need not rerun)."""
    want = {n for op in backward_ops for n in op.input}
    keep = []
    for op in reversed(forward_ops):
        if want.intersection(op.output):
            keep.append(op)
            want.update(op.input)
    return keep[::-1]


def _while_grad(op, g_output):
    from caffe2torch.python import core
    from caffe2torch.python.gradients import backward_pass
    cond = op.input[0]
    g_of = {y: str(g) for y, g in zip(op.output, g_output) if g is not None}
    if not g_of:
        return [], [None] * len(op.input)
    body, last = _ssa(_net_arg(op, "loop_net").op, "while_fwd")
    carried = [c for c in dict.fromkeys(op.output) if c != cond]
    grad_in = {c: f"{c}_grad/_while_in" for c in carried if c in last}
    versioned = {}
    backward, _ = backward_pass(body, {last[c]: g for c, g in grad_in.items()},
                                core.CreateOperator, versioned)
    wrt = []
    for x in dict.fromkeys(op.input[1:]):
        if x == cond:
            continue
        if versioned.get((x, 0)) or (x in carried and x in g_of):
            wrt.append(x)
    if not wrt:
        return [], [None] * len(op.input)
    net = _netdef("loop_grad", _needed(body, backward) + list(backward))
    outer = set(op.input) | set(op.output)
    inputs = [g_of[c] for c in carried if c in g_of]
    inputs += [n for n in _external_reads([net], outer) if n not in inputs]
    g_input = {x: grad_name(x) for x in wrt}
    grad = gradient_op(
        op, "WhileGradient", inputs, [g_input[x] for x in wrt], copy_args=False, loop_net=net,
        carried=carried, carried_grads=[g_of.get(c, "") for c in carried],
        carried_grad_in=[grad_in.get(c, "") for c in carried], wrt=wrt,
        wrt_grads=[versioned.get((x, 0), "") for x in wrt], saved_blobs=saved_blobs_name(op))
    return [grad], [g_input.get(x) if k else None for k, x in enumerate(op.input)]


@register_op("WhileGradient", gradient=NO_GRADIENT, setup=_grad_setup, cpu_only_inputs=True,
             side_effects=True)
def while_gradient(ctx, inputs):
    """The gradient of While: the body's backward pass over the iterations, last first."""
    stack = _saved(ctx)
    blobs = ctx.workspace.blobs
    carried = ctx.arg("carried")
    grad_in = dict(zip(carried, ctx.arg("carried_grad_in")))
    g = {c: (blobs[n] if n else None) for c, n in zip(carried, ctx.arg("carried_grads"))}
    wrt_grads = dict(zip(ctx.arg("wrt"), ctx.arg("wrt_grads")))
    summed = {x: None for x in wrt_grads if x not in g}
    local = ctx.state["block"].blobs.local
    for snapshot in reversed(stack):
        local.clear()
        local.update(snapshot)
        for c, name in grad_in.items():
            if name:
                local[name] = g[c] if g[c] is not None else _zeros_for(ctx, c, snapshot.get(c))
        _net(ctx, "loop_net").run(1)
        for c in g:
            if grad_in[c]:  # the body writes c: its gradient before this iteration
                g[c] = local.get(wrt_grads.get(c, ""))
        for x, total in summed.items():
            part = local.get(wrt_grads[x])
            if part is not None:
                summed[x] = part if total is None else total + part
    local.clear()
    out = []
    for x in ctx.arg("wrt"):
        value = g[x] if x in g else summed[x]
        out.append(value if value is not None else _zeros_for(ctx, x, None))
    return out
