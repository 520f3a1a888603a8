"""Caffe2's ``net_builder``: build nets with ``ops.X(...)`` inside ``with NetBuilder():``, and
control flow blocks ``ops.IfNet`` / ``ops.Else`` / ``ops.WhileNet`` / ``ops.Condition``.

Example (the Control_Ops tutorial)::

    with NetBuilder() as nb:
        ops.Const(0.5, blob_out="x")
        ops.Const(0.0, blob_out="y")
        with ops.IfNet(ops.GT(["x", "zero"])):
            ops.Copy("one", "y")
        with ops.Else():
            ops.Copy("zero", "y")
    plan = core.Plan("if_net_test")
    plan.AddStep(core.to_execution_step(nb))
    workspace.RunPlan(plan)

Block rules as Caffe2's: a blob first written inside a block is local to it; writing a blob
defined before (in the block or outside) updates that blob. This covers the builder, its ops and
the If/While control blocks; Caffe2's task/session machinery (``ops.task_init``, ``stop_if``
execution steps, ``Loop`` as execution steps) is not part of it.
"""
import threading

from caffe2torch.python import core

_local = threading.local()


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


class NetBuilder:
    """Collects the nets that ``ops.X`` calls build; ``get()`` returns them, in order."""

    def __init__(self, name=None, initial_scope=None, _stop_blob_required=False,
                 _stop_blob=None, _fullname=None, _use_control_ops=False):
        self.name = name or "net_builder"
        self._children = []
        parent = NetBuilder.current(required=False)
        self._lexical_scope = set(initial_scope or [])
        if parent is not None:
            self._lexical_scope |= parent._lexical_scope
        self._last_if = None

    @staticmethod
    def current(required=True):
        """The innermost active NetBuilder (None, or an error, when there is none)."""
        stack = _stack()
        if not stack:
            if required:
                raise RuntimeError("ops.X(...) needs an active NetBuilder: use `with "
                                   "NetBuilder() as nb:`")
            return None
        return stack[-1]

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, exc_type, exc, tb):
        _stack().pop()

    def add(self, child):
        """Append a net, an execution step or a nested builder; returns it."""
        self._children.append(child)
        return child

    def current_net(self, name=None):
        """The net ops are added to (a new one after a non-net child)."""
        if not self._children or not isinstance(self._children[-1], core.Net):
            self.add(core.Net(name or self.name))
        return self._children[-1]

    def get(self):
        """The nets (and steps) built, in order."""
        return list(self._children)

    def _record(self, op):
        self._lexical_scope.update(op.output)


class _Block(NetBuilder):
    """The body of an IfNet / Else / WhileNet / Condition: one net of its own."""

    def net_def(self):
        nets = [c for c in self._children if isinstance(c, core.Net)]
        merged = core.Net(self.name)
        for net in nets:
            merged.AppendNet(net)
        return merged.Proto()


def _outer_blobs(net_defs, scope):
    """(read, written) names of the nets that belong to the enclosing scope, in first-use order."""
    read, written = [], []
    for net in net_defs:
        for op in net.op:
            for name in op.input:
                if name in scope and name not in read:
                    read.append(name)
            for name in op.output:
                if name in scope and name not in written:
                    written.append(name)
    return read, written


class _IfNet(_Block):
    def __init__(self, cond):
        super().__init__(name="then")
        self._cond = str(cond)

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        parent = NetBuilder.current()
        then_net = self.net_def()
        read, written = _outer_blobs([then_net], parent._lexical_scope)
        net = parent.current_net()
        # Without an Else the blobs written here keep their values otherwise: they are inputs
        # too, so that their gradient passes through (the Else block prunes what it writes).
        inputs = [self._cond] + [b for b in read if b != self._cond]
        inputs += [b for b in written if b not in inputs]
        net.If(inputs, written, then_net=then_net)
        parent._last_if = net.Proto().op[-1]
        parent._record(parent._last_if)


class _Else(_Block):
    def __init__(self):
        super().__init__(name="else")

    def __enter__(self):
        parent = NetBuilder.current()
        self._if = parent._last_if
        if self._if is None:
            raise RuntimeError("ops.Else() must follow an `with ops.IfNet(...)` block directly")
        parent._last_if = None
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        parent = NetBuilder.current()
        else_net = self.net_def()
        read, written = _outer_blobs([else_net], parent._lexical_scope)
        op = self._if
        op.arg.add().CopyFrom(core.utils.MakeArgument("else_net", else_net))
        then_net = next(a.n for a in op.arg if a.name == "then_net")
        _, then_written = _outer_blobs([then_net], parent._lexical_scope)
        then_read, _ = _outer_blobs([then_net], parent._lexical_scope)
        # Keep as inputs the blobs read, and those written by one branch only.
        keep = [op.input[0]] + [b for b in op.input[1:] if b in then_read or b in read
                                or (b in then_written) != (b in written)]
        keep += [b for b in read if b not in keep]
        keep += [b for b in written if b not in keep and b not in then_written]
        del op.input[:]
        op.input.extend(keep)
        op.output.extend(b for b in written if b not in op.output)
        parent._record(op)


class _WhileNet(_Block):
    def __init__(self):
        super().__init__(name="loop")
        self._cond_net = None
        self._cond_blob = None

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        if self._cond_net is None:
            raise RuntimeError("ops.WhileNet() needs a `with ops.Condition():` block inside")
        parent = NetBuilder.current()
        loop_net = self.net_def()
        net = parent.current_net()
        cond = self._cond_blob
        if cond not in parent._lexical_scope:
            # While reads its condition blob from the workspace: make it exist outside.
            net.ConstantFill([], cond, shape=[], value=False, dtype=core.DataType.BOOL)
            parent._lexical_scope.add(cond)
        read, written = _outer_blobs([self._cond_net, loop_net], parent._lexical_scope)
        net.While([cond] + [b for b in read if b != cond], written, loop_net=loop_net,
                  cond_net=self._cond_net)
        parent._record(net.Proto().op[-1])


class _Condition(_Block):
    def __init__(self):
        super().__init__(name="cond")

    def __enter__(self):
        self._while = NetBuilder.current()
        if not isinstance(self._while, _WhileNet):
            raise RuntimeError("ops.Condition() is only valid directly inside ops.WhileNet()")
        return super().__enter__()

    def __exit__(self, exc_type, exc, tb):
        super().__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        cond_net = self.net_def()
        if not cond_net.op or not cond_net.op[-1].output:
            raise RuntimeError("ops.Condition(): its last op must output the condition blob")
        self._while._cond_net = cond_net
        self._while._cond_blob = cond_net.op[-1].output[0]


class Operations:
    """``ops``: ``ops.X(inputs, outputs, **args)`` adds op X to the active builder's net."""

    def IfNet(self, cond, name=None):
        """A `with` block run when ``cond`` holds (Caffe2's If operator)."""
        return _IfNet(cond)

    def Else(self, name=None):
        """The `with` block run otherwise; directly after an IfNet block."""
        return _Else()

    def WhileNet(self, name=None):
        """A `with` block repeated while its Condition block's last output holds."""
        return _WhileNet()

    def Condition(self, name=None):
        """The condition block of a WhileNet."""
        return _Condition()

    def Const(self, array, blob_out=None, dtype=None):
        """A constant blob (a 0-d tensor for a Python number), as core.Net.Const."""
        builder = NetBuilder.current()
        net = builder.current_net()
        ref = net.Const(array, blob_out, dtype)
        builder._record(net.Proto().op[-1])
        return ref

    def Python(self, f, grad_f=None, python_func_type=None, pass_workspace=False,
               grad_output_indices=None, grad_input_indices=None):
        """A builder ``(inputs, outputs)`` for a Python op (see core.Net.Python)."""
        def add_op(*args, **kwargs):
            builder = NetBuilder.current()
            net = builder.current_net()
            ref = net.Python(f, grad_f, python_func_type, pass_workspace, grad_output_indices,
                             grad_input_indices)(*args, **kwargs)
            builder._record(net.Proto().op[-1])
            return ref
        return add_op

    def __getattr__(self, op_type):
        if op_type.startswith("__"):
            raise AttributeError(op_type)

        def add_op(*args, **kwargs):
            builder = NetBuilder.current()
            net = builder.current_net()
            ref = getattr(net, op_type)(*args, **kwargs)
            builder._record(net.Proto().op[-1])
            return ref
        return add_op


ops = Operations()
