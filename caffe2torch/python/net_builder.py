"""Caffe2's ``net_builder``: build nets with ``ops.X(...)`` inside ``with NetBuilder():``.

Two kinds of control flow, as in Caffe2:

* execution steps: ``ops.loop()``, ``ops.If`` / ``Elif`` / ``Else``, ``ops.stop()``,
  ``ops.stop_if(blob)``, ``ops.stop_guard()``; each block becomes an ExecutionStep of the plan
  (a step with a ``should_stop_blob``), and ``ops.task_init()`` / ``task_exit()`` add steps that
  a :class:`~caffe2torch.python.task.Task` runs first or last;
* control ops: ``ops.IfNet`` / ``Else`` / ``WhileNet`` / ``Condition`` build one If or While op
  whose nets follow NetBuilder's block rules (a blob first written inside the block is local to
  it; writing a blob defined before updates it).

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
"""
import threading

from caffe2torch.python import core

_local = threading.local()


def _stack():
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


class NetBuilder:
    """Collects the nets and sub-builders that ``ops.X`` calls build; ``get()`` returns them."""

    def __init__(self, name=None, initial_scope=None, _stop_blob_required=False,
                 _stop_blob=None, _fullname=None, _use_control_ops=False):
        parent = NetBuilder.current(required=False)
        if _fullname and name:
            raise ValueError("NetBuilder: set name or _fullname, not both")
        self.name = _fullname or "/".join(n for n in (parent.name if parent else None, name)
                                          if n)
        self._frozen = False
        self._current_net = None
        self._children = []
        if parent is not None:
            parent._update_lexical_scope()
        self._init_lexical_scope = set(parent._lexical_scope) if parent else set()
        self._init_lexical_scope |= {str(b) for b in initial_scope or []}
        self._lexical_scope = set(self._init_lexical_scope)
        self._stop_blob = _stop_blob
        self._stop_blob_required = _stop_blob_required
        self._use_control_ops = _use_control_ops
        self._last_if = None

    @staticmethod
    def current(required=True):
        """The innermost active NetBuilder (None, or an error, when there is none)."""
        stack = _stack()
        if not stack:
            if required:
                raise RuntimeError("ops.X(...) needs an active NetBuilder: use `with "
                                   "NetBuilder() as nb:` (or `with Task():`)")
            return None
        return stack[-1]

    def __enter__(self):
        _stack().append(self)
        return self

    def __exit__(self, etype, *args):
        _stack().pop()
        self.freeze()
        if etype is None and self._stop_blob_required and self._stop_blob is None:
            raise RuntimeError(f"this NetBuilder ({self.name}) needs a stop condition: call "
                               "ops.stop() or ops.stop_if(...) inside it")

    def stop_blob(self):
        """The bool blob that stops this builder's step (created False on first use)."""
        if self._stop_blob is None:
            net = self.current_net()
            self._stop_blob = core.BlobReference(net.NextName("stop_blob"), net=net)
            net.Const(False, blob_out=self._stop_blob)
            if self._current_net is not self._children[0]:
                # Reset it at the start of every run of the step (loops run their steps again).
                init = core.Net("stop_blob_init")
                init.Const(False, blob_out=self._stop_blob)
                self._children.insert(0, init)
        return self._stop_blob

    def stop_if(self, blob):
        """Stop this builder's step after the current net when ``blob`` is true."""
        stop = self.stop_blob()
        ops.Or([stop, blob], [stop])
        self._current_net = None  # the check happens after a net: start a new one

    def _assert_mutable(self):
        if self._frozen:
            raise RuntimeError(f"this NetBuilder ({self.name}) has been built already")

    def _update_lexical_scope(self):
        self._lexical_scope = set(self._init_lexical_scope)
        for child in self._children:
            if isinstance(child, core.Net):
                self._lexical_scope |= child.UsedBlobNames()

    def add(self, child):
        """Append a net, an execution step, a sub-builder or a TaskGroup; returns it."""
        self._assert_mutable()
        self._current_net = None
        self._children.append(child)
        if isinstance(child, core.Net):
            self._current_net = child
        self._update_lexical_scope()
        return child

    def current_net(self, name=None):
        """The net ops are added to (a new one after a non-net child, or when named)."""
        self._assert_mutable()
        if self._current_net is None or name is not None:
            self.add(core.Net(name))
        return self._current_net

    def freeze(self):
        """No more children; sub-builders freeze too."""
        for child in self._children:
            if hasattr(child, "freeze"):
                child.freeze()
        self._current_net = None
        self._frozen = True

    def get(self):
        """The nets and sub-builders built, in order (the builder is frozen)."""
        self.freeze()
        return self._children

    def _record(self, op):
        self._lexical_scope.update(op.output)

    def __str__(self):
        return self.name or "Un-named NetBuilder"


# --- execution-step blocks ----------------------------------------------------------------------

class _RunOnce(NetBuilder):
    def __exit__(self, etype, *args):
        if etype is None and self._stop_blob is not None:
            ops.stop()  # a stop blob makes the step loop: stop after one pass
        NetBuilder.__exit__(self, etype, *args)


class _StopGuard(_RunOnce):
    def __init__(self, has_stopped_blob=None, name=None):
        super().__init__(name)
        self._stopped = has_stopped_blob
        self._ran = False

    def __enter__(self):
        builder = super().__enter__()
        self._stopped = ops.Const(True, blob_out=self._stopped)
        return builder

    def __exit__(self, etype, *args):
        if etype is None:
            self._ran = True
            ops.Const(False, blob_out=self._stopped)
        super().__exit__(etype, *args)

    def has_stopped(self):
        """A bool blob: True after the block ran iff it was halted by stop/stop_if."""
        if not self._ran:
            raise RuntimeError("stop_guard().has_stopped(): the block has not been built yet")
        return self._stopped


class _Loop(NetBuilder):
    def __init__(self, iters=None, name=None):
        super().__init__(name, _stop_blob_required=True)
        self._iter = None
        if iters is not None:
            # The counters live in the enclosing net: each entry into the loop starts at 0.
            self._inc = ops.Const(1)
            self._iter = ops.Const(0)
            self._num_iters = iters if isinstance(iters, core.BlobReference) else ops.Const(iters)
        else:
            self._num_iters = None

    def iter(self):
        """The iteration counter blob (0, 1, ...); loops with a number of iterations only."""
        if self._num_iters is None:
            raise RuntimeError("this loop has no number of iterations: use ops.loop(n)")
        return self._iter

    def __enter__(self):
        builder = super().__enter__()
        if self._num_iters is not None:
            ops.stop_if(ops.GE([self._iter, self._num_iters]))
        return builder

    def __exit__(self, etype, *args):
        if etype is None and self._num_iters is not None:
            self.current_net().Add([self._iter, self._inc], [self._iter])
        super().__exit__(etype, *args)


class _RunIf(_RunOnce):
    def __init__(self, cond_blob=None, name=None, _already_ran=None):
        super().__init__(name)
        self._is_else = cond_blob is None
        if _already_ran is None:
            self._else_blob = ops.Not(cond_blob)
            self._already_ran = ops.Const(False)
        else:
            self._already_ran = _already_ran
            self._else_blob = _already_ran if cond_blob is None else \
                ops.Or([_already_ran, ops.Not(cond_blob)])

    def __enter__(self):
        builder = super().__enter__()
        ops.stop_if(self._else_blob)
        ops.Const(True, blob_out=self._already_ran)
        return builder

    def Elif(self, cond, name=None):
        """The next branch: runs if no earlier branch ran and ``cond`` holds."""
        if self._is_else:
            raise RuntimeError("Elif cannot follow an Else")
        return NetBuilder.current().add(_RunIf(cond, name=name or self.name,
                                               _already_ran=self._already_ran))

    def Else(self, name=None):
        """The last branch: runs if no earlier branch ran."""
        if self._is_else:
            raise RuntimeError("Else cannot follow an Else")
        return NetBuilder.current().add(_RunIf(name=name or self.name,
                                               _already_ran=self._already_ran))


class _SetupBuilder(NetBuilder):
    INIT = "init"
    EXIT = "exit"

    def __init__(self, type, name=None):
        super().__init__(name)
        self.type = type

    def setup(self, net):
        """The step a Task runs first (for task_init)."""
        return core.to_execution_step(self) if self.type == _SetupBuilder.INIT else None

    def exit(self, net):
        """The step a Task runs last (for task_exit)."""
        return core.to_execution_step(self) if self.type == _SetupBuilder.EXIT else None


# --- control-op blocks: one If / While op with block-local blobs ----------------------------------

class _Block(NetBuilder):
    """The body of an IfNet / Else / WhileNet / Condition: one net of its own."""

    def net_def(self):
        merged = core.Net(self.name or "block")
        for child in self._children:
            if not isinstance(child, core.Net):
                raise RuntimeError("IfNet/WhileNet blocks hold ops and nested IfNet/WhileNet "
                                   "blocks only, not execution-step blocks (ops.If, ops.loop)")
            merged.AppendNet(child)
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


def _scope(builder):
    builder._update_lexical_scope()
    return builder._lexical_scope


class _IfNet(_Block):
    def __init__(self, cond):
        super().__init__(name="then")
        self._cond = str(cond)

    def __exit__(self, etype, *args):
        super().__exit__(etype, *args)
        if etype is not None:
            return
        parent = NetBuilder.current()
        then_net = self.net_def()
        read, written = _outer_blobs([then_net], _scope(parent))
        net = parent.current_net()
        # Without an Else the blobs written here keep their values otherwise: they are inputs
        # too, so that their gradient passes through (the Else block prunes what it writes).
        inputs = [self._cond] + [b for b in read if b != self._cond]
        inputs += [b for b in written if b not in inputs]
        net.If(inputs, written, then_net=then_net)
        parent._last_if = net.Proto().op[-1]


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

    def __exit__(self, etype, *args):
        super().__exit__(etype, *args)
        if etype is not None:
            return
        parent = NetBuilder.current()
        scope = _scope(parent)
        else_net = self.net_def()
        read, written = _outer_blobs([else_net], scope)
        op = self._if
        op.arg.add().CopyFrom(core.utils.MakeArgument("else_net", else_net))
        then_net = next(a.n for a in op.arg if a.name == "then_net")
        then_read, then_written = _outer_blobs([then_net], scope)
        # Keep as inputs the blobs read, and those written by one branch only.
        keep = [op.input[0]] + [b for b in op.input[1:] if b in then_read or b in read
                                or (b in then_written) != (b in written)]
        keep += [b for b in read if b not in keep]
        keep += [b for b in written if b not in keep and b not in then_written]
        del op.input[:]
        op.input.extend(keep)
        op.output.extend(b for b in written if b not in op.output)


class _WhileNet(_Block):
    def __init__(self):
        super().__init__(name="loop")
        self._cond_net = None
        self._cond_blob = None

    def __exit__(self, etype, *args):
        super().__exit__(etype, *args)
        if etype is not None:
            return
        if self._cond_net is None:
            raise RuntimeError("ops.WhileNet() needs a `with ops.Condition():` block inside")
        parent = NetBuilder.current()
        loop_net = self.net_def()
        net = parent.current_net()
        cond = self._cond_blob
        if cond not in _scope(parent):
            # While reads its condition blob from the workspace: make it exist outside.
            net.ConstantFill([], cond, shape=[], value=False, dtype=core.DataType.BOOL)
        read, written = _outer_blobs([self._cond_net, loop_net], _scope(parent))
        net.While([cond] + [b for b in read if b != cond], written, loop_net=loop_net,
                  cond_net=self._cond_net)


class _Condition(_Block):
    def __init__(self):
        super().__init__(name="cond")

    def __enter__(self):
        self._while = NetBuilder.current()
        if not isinstance(self._while, _WhileNet):
            raise RuntimeError("ops.Condition() is only valid directly inside ops.WhileNet()")
        return super().__enter__()

    def __exit__(self, etype, *args):
        super().__exit__(etype, *args)
        if etype is not None:
            return
        cond_net = self.net_def()
        if not cond_net.op or not cond_net.op[-1].output:
            raise RuntimeError("ops.Condition(): its last op must output the condition blob")
        self._while._cond_net = cond_net
        self._while._cond_blob = cond_net.op[-1].output[0]


class Operations:
    """``ops``: ``ops.X(inputs, outputs, **args)`` adds op X to the active builder's net."""

    def net(self, net=None, name=None):
        """The current net (a new one when ``name`` is given), or add ``net`` to the builder."""
        if net is not None and name is not None:
            raise ValueError("ops.net(): give net or name, not both")
        if net is not None:
            return NetBuilder.current().add(net)
        return NetBuilder.current().current_net(name=name)

    def stop(self):
        """Stop the current execution step after this point (the rest does not run)."""
        return self.stop_if(ops.Const(True))

    def stop_if(self, blob):
        """Stop the current execution step here when the bool ``blob`` is true."""
        return NetBuilder.current().stop_if(blob)

    def loop(self, iters=None, name=None):
        """A block run repeatedly: ``iters`` times (a number or blob), or until ops.stop_if."""
        return NetBuilder.current().add(_Loop(iters, name=name))

    def stop_guard(self, has_stopped_blob=None, name=None):
        """A block run once; ``.has_stopped()`` is a blob saying whether stop/stop_if ended it."""
        return NetBuilder.current().add(_StopGuard(has_stopped_blob=has_stopped_blob,
                                                   name=name))

    def If(self, cond, name=None):
        """A block run once when ``cond`` holds (an execution step); ``.Elif`` / ``.Else``."""
        return NetBuilder.current().add(_RunIf(cond, name=name))

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

    def task_init(self):
        """A block run once when the Task starts (before the task's other steps)."""
        from caffe2torch.python.task import Task
        setup = _SetupBuilder(_SetupBuilder.INIT)
        self.net().add_attribute(Task.TASK_SETUP, setup)
        return setup

    def task_exit(self):
        """A block run once when the Task ends (after the task's other steps)."""
        from caffe2torch.python.task import Task
        setup = _SetupBuilder(_SetupBuilder.EXIT)
        self.net().add_attribute(Task.TASK_SETUP, setup)
        return setup

    def task_instance_init(self):
        """As task_init (caffe2torch runs one instance of a task)."""
        from caffe2torch.python.task import Task
        setup = _SetupBuilder(_SetupBuilder.INIT)
        self.net().add_attribute(Task.TASK_INSTANCE_SETUP, setup)
        return setup

    def task_instance_exit(self):
        """As task_exit (caffe2torch runs one instance of a task)."""
        from caffe2torch.python.task import Task
        setup = _SetupBuilder(_SetupBuilder.EXIT)
        self.net().add_attribute(Task.TASK_INSTANCE_SETUP, setup)
        return setup

    def local_init(self):
        """A block run once when the TaskGroup starts, before its tasks."""
        from caffe2torch.python.task import TaskGroup
        setup = _SetupBuilder(_SetupBuilder.INIT)
        self.net().add_attribute(TaskGroup.LOCAL_SETUP, setup)
        return setup

    def local_exit(self, name=None):
        """A block run once when the TaskGroup ends, after its tasks."""
        from caffe2torch.python.task import TaskGroup
        setup = _SetupBuilder(_SetupBuilder.EXIT, name)
        self.net().add_attribute(TaskGroup.LOCAL_SETUP, setup)
        return setup

    def Const(self, array, blob_out=None, dtype=None):
        """A constant blob (as core.Net.Const)."""
        return self.net().Const(array, blob_out, dtype)

    def Python(self, f, grad_f=None, python_func_type=None, pass_workspace=False,
               grad_output_indices=None, grad_input_indices=None):
        """A builder ``(inputs, outputs)`` for a Python op (see core.Net.Python)."""
        def add_op(*args, **kwargs):
            return self.net().Python(f, grad_f, python_func_type, pass_workspace,
                                     grad_output_indices, grad_input_indices)(*args, **kwargs)
        return add_op

    def __getattr__(self, op_type):
        if op_type.startswith("__"):
            raise AttributeError(op_type)
        if NetBuilder.current(required=False) is None:
            raise AttributeError("No active NetBuilder.")
        return getattr(self.net(), op_type)


ops = Operations()
