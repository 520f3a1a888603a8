"""Control flow: ``If`` (then_net / else_net) and ``While`` (loop_net, optional cond_net).

The nets in the arguments run in a block scope over the op's workspace: a write to a blob that
exists outside the block updates it, a blob first written inside the block is local and gone
when the op ends. These are the block rules of Caffe2's NetBuilder and ``brew.cond``/``loop``
(which Caffe2 realizes with extra Do/CreateScope ops); a bare Caffe2 ``If`` would leave the
branch's new blobs in the workspace. The condition is a one-element bool (or number) tensor.
"""
import collections.abc

import torch

from caffe2torch.ops.registry import NO_GRADIENT, register_op


class _BlockBlobs(collections.abc.MutableMapping):
    """Blobs of a block: reads see the outer blobs; writes go outside unless the name is new."""

    def __init__(self, outer):
        self.outer = outer
        self.local = {}

    def __getitem__(self, key):
        if key in self.local:
            return self.local[key]
        return self.outer[key]

    def __setitem__(self, key, value):
        if key in self.local or key not in self.outer:
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

    def __init__(self, workspace):
        self.blobs = _BlockBlobs(workspace.blobs)
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


def _control_setup(*required):
    def setup(ctx):
        for name in required:
            ctx.require(name)
        ctx.state["block"] = _Block(ctx.workspace)
    return setup


@register_op("If", gradient=NO_GRADIENT, setup=_control_setup("then_net"),
             cpu_only_inputs=True, side_effects=True)
def if_op(ctx, inputs):
    """Run then_net if the condition holds, else else_net (when given), in a block scope."""
    ctx.state["block"].blobs.local.clear()
    if _truth(ctx, inputs[0]):
        _net(ctx, "then_net").run(1)
    elif ctx.arg("else_net") is not None:
        _net(ctx, "else_net").run(1)
    ctx.state["block"].blobs.local.clear()
    return _outputs(ctx)


@register_op("While", gradient=NO_GRADIENT, setup=_control_setup("loop_net"),
             cpu_only_inputs=True, side_effects=True)
def while_op(ctx, inputs):
    """Repeat: run cond_net (if given), stop when the condition is false, run loop_net."""
    block = ctx.state["block"]
    block.blobs.local.clear()
    cond_name = ctx.input_names[0]
    has_cond_net = ctx.arg("cond_net") is not None
    while True:
        if has_cond_net:
            _net(ctx, "cond_net").run(1)
        if not _truth(ctx, block.blobs[cond_name]):
            break
        _net(ctx, "loop_net").run(1)
    block.blobs.local.clear()
    return _outputs(ctx)
