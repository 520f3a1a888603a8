"""Caffe2's ``task``: a :class:`Task` is an execution step with setup/exit steps and outputs; a
:class:`TaskGroup` holds the tasks a :class:`~caffe2torch.python.session.LocalSession` runs.

Example (Caffe2's net_builder tests)::

    with Task() as task:
        with ops.task_init():
            one = ops.Const(1)
        two = ops.Add([one, one])
        out = final_output(two)
    with LocalSession() as session:
        session.run(task)
    out.fetch()   # 2

caffe2torch runs on one machine: ``Cluster`` and ``Node`` only name where tasks would run, and a
task's ``num_instances`` instances run one after another, as its concurrent steps do.
"""
import threading

from caffe2torch.python import core

_local = threading.local()


def _stack(kind):
    stacks = _local.__dict__.setdefault("stacks", {})
    return stacks.setdefault(kind, [])


class _Context:
    """A `with` context of which the innermost active one is ``type(self).current()``."""

    def __enter__(self):
        _stack(type(self).__name__).append(self)
        return self

    def __exit__(self, etype, *args):
        _stack(type(self).__name__).pop()

    @classmethod
    def current(cls, value=None, required=True):
        """The innermost active instance (None, or an error, when there is none)."""
        if value is not None:
            return value
        stack = _stack(cls.__name__)
        if not stack:
            if required:
                raise RuntimeError(f"no active {cls.__name__}: use `with {cls.__name__}():`")
            return None
        return stack[-1]


class WorkspaceType:
    """Where a task's blobs live: a workspace of its own (PRIVATE) or the session's (GLOBAL)."""

    PRIVATE = "private"
    GLOBAL = "global"


class Cluster(_Context):
    """The nodes tasks were assigned to (names only: everything runs in this process)."""

    def __init__(self):
        self._nodes = {}

    def add_node(self, node):
        """Record ``node`` (a Node or its name)."""
        name = str(node)
        self._nodes.setdefault(name, getattr(node, "kwargs", {}))

    def nodes(self):
        """The node names, in the order first used."""
        return list(self._nodes)

    def node_kwargs(self):
        """{node name: its keyword arguments}."""
        return dict(self._nodes)


class Node(_Context):
    """A named place to run tasks (``'local'`` by default)."""

    def __init__(self, node="local", **kwargs):
        self._name = str(node)
        self.kwargs = kwargs
        cluster = Cluster.current(required=False)
        if cluster is not None:
            cluster.add_node(self)

    def __str__(self):
        return self._name

    def __repr__(self):
        return f"Node(name={self._name!r}, kwargs={self.kwargs!r})"


class TaskOutput:
    """The value(s) of blobs a task returns, readable after a session ran it."""

    def __init__(self, names):
        self.names = [str(n) for n in names]
        self._values = None

    def set(self, values, _fetch_func=None):
        """Store the fetched values (the session calls this)."""
        self._values = values

    def get(self):
        """The value (one blob) or the list of values."""
        if self._values is None:
            raise RuntimeError(f"the output {self.names} has no value yet: run its task in a "
                               "session first")
        return self._values[0] if len(self.names) == 1 else self._values

    def fetch(self):
        """As get() (Caffe2 fetches lazily; here the values are fetched when the task ends)."""
        return self.get()


class TaskOutputList:
    """The outputs of a task, fetched together."""

    def __init__(self, outputs=None):
        self.outputs = list(outputs or [])

    def names(self):
        """Every blob name of every output."""
        return [n for o in self.outputs for n in o.names]

    def set_values(self, values, _fetch_func=None):
        """Hand each output its part of ``values`` (in names() order)."""
        k = 0
        for o in self.outputs:
            o.set(values[k:k + len(o.names)])
            k += len(o.names)

    def __repr__(self):
        return f"TaskOutputList(outputs={self.outputs!r})"


def final_output(blob_or_record):
    """Return ``blob_or_record``'s value from the current Task (a TaskOutput to fetch later)."""
    task = Task.current(required=False) or Task()
    return task.add_output(blob_or_record)


def _setup_steps(step, attribute):
    """(init steps, exit steps) of the _SetupBuilders attached to the step's nets."""
    inits, exits = [], []
    for setup in step.get_all_attributes(attribute) if step is not None else []:
        init, exit_ = setup.setup(None), setup.exit(None)
        if init is not None:
            inits.append(init)
        if exit_ is not None:
            exits.append(exit_)
    return inits, exits


class TaskGroup(_Context):
    """The tasks a session runs together; ``local_init``/``local_exit`` blocks run around them."""

    LOCAL_SETUP = "local_setup"

    def __init__(self, workspace_type=None):
        self._tasks = []
        self._workspace_type = workspace_type
        self._report_steps = []
        self._already_used = False

    def add(self, task):
        """Add a Task; a task without a workspace type takes the group's."""
        if self._already_used:
            raise RuntimeError("cannot add a task to a TaskGroup that has run already")
        if task._workspace_type is None:
            task._workspace_type = self._workspace_type
        self._tasks.append(task)
        task._group = self
        return task

    def tasks(self):
        """The tasks, in the order added."""
        return list(self._tasks)

    def num_registered_tasks(self):
        """How many tasks were added."""
        return len(self._tasks)

    def used_nodes(self):
        """The nodes the tasks run on."""
        return sorted({str(t.node) for t in self._tasks})

    def workspace_type(self):
        """The group's WorkspaceType (None: each task's own, PRIVATE by default)."""
        return self._workspace_type

    def report_step(self, step=None, node=None, interval_ms=1000):
        """Run ``step`` every ``interval_ms`` while the tasks run."""
        step = core.to_execution_step(step)
        step.RunEveryMillis(interval_ms)
        self._report_steps.append(step)

    def report_net(self, net=None, node=None, report_interval=5):
        """Run ``net`` every ``report_interval`` seconds while the tasks run (a new one if None)."""
        net = net or core.Net("task_group_report_net")
        self.report_step(net, interval_ms=int(report_interval * 1000))
        return net

    def local_setup_steps(self):
        """(init steps, exit steps) of the group's ``ops.local_init``/``local_exit`` blocks."""
        inits, exits = [], []
        for task in self._tasks:
            i, e = _setup_steps(task._step, TaskGroup.LOCAL_SETUP)
            inits += i
            exits += e
        return inits, exits

    def to_task(self, node=None):
        """One Task running the group: local init, every task (one after another), local exit."""
        inits, exits = self.local_setup_steps()
        steps = [t.get_step() for t in self._tasks]
        body = core.execution_step("task_group", steps + self._report_steps,
                                   concurrent_substeps=True) if steps else None
        merged = Task(step=core.execution_step(
            "task_group_with_setup", inits + ([body] if body else []) + exits),
            name="task_group", group=False)
        merged._outputs = [o for t in self._tasks for o in t._outputs]
        return merged

    def get_step(self):
        """The ExecutionStep of to_task()."""
        return self.to_task().get_step()


class Task(_Context):
    """An execution step with its setup and exit steps and its outputs (Caffe2's Task).

    ``with Task() as task:`` opens a NetBuilder: ``ops.X`` calls inside build the task's step.
    """

    TASK_SETUP = "task_setup"
    REPORT_STEP = "report_step"
    TASK_INSTANCE_SETUP = "task_instance_setup"
    _names = set()

    def __init__(self, step=None, outputs=None, workspace_type=None, group=None, node=None,
                 name=None, num_instances=None):
        self.name = self._unique(name or "task")
        self.node = str(Node.current(node, required=False) or "local")
        self._workspace_type = workspace_type
        self._step = None
        self._net_builder = None
        self._outputs = []
        self._num_instances = num_instances
        self._group = None
        if step is not None:
            self.set_step(step)
        if outputs is not None:
            self.add_outputs(outputs)
        if group is not False:
            group = group if group is not None else TaskGroup.current(required=False)
            if group is not None:
                group.add(self)

    @classmethod
    def _unique(cls, name):
        candidate, k = name, 1
        while candidate in cls._names:
            candidate, k = f"{name}_{k}", k + 1
        cls._names.add(candidate)
        return candidate

    def __enter__(self):
        from caffe2torch.python.net_builder import NetBuilder
        super().__enter__()
        self._net_builder = NetBuilder(_fullname=self.name)
        self._net_builder.__enter__()
        return self

    def __exit__(self, etype, *args):
        self._net_builder.__exit__(etype, *args)
        super().__exit__(etype, *args)
        if etype is None and self._net_builder.get():
            self.set_step(self._net_builder)
        self._net_builder = None

    def workspace_type(self):
        """The task's WorkspaceType (PRIVATE unless set, here or by its group)."""
        return self._workspace_type or WorkspaceType.PRIVATE

    def num_instances(self):
        """How many instances run (one after another here)."""
        return self._num_instances or 1

    def set_step(self, step):
        """The body of the task (a step, net, NetBuilder or list of them)."""
        if self._step is not None:
            raise RuntimeError(f"task {self.name!r} already has a step")
        self._step = core.to_execution_step(step, default_name=self.name)

    def add_output(self, output):
        """Return the value of ``output`` (a blob, or a list of blobs) after the task runs."""
        names = [str(o) for o in output] if isinstance(output, (list, tuple)) else [str(output)]
        out = TaskOutput(names)
        self._outputs.append(out)
        return out

    def add_outputs(self, outputs):
        """add_output for each of ``outputs``; returns the TaskOutputs (one for one output)."""
        if not isinstance(outputs, (list, tuple)):
            return self.add_output(outputs)
        return [self.add_output(o) for o in outputs]

    def outputs(self):
        """The TaskOutputs added so far."""
        return list(self._outputs)

    def output_list(self):
        """The outputs as a TaskOutputList."""
        return TaskOutputList(self._outputs)

    def output_names(self):
        """The blob names of all outputs."""
        return self.output_list().names()

    def get_step(self):
        """The task as one ExecutionStep: task_init blocks, the body (its instances), task_exit."""
        inits, exits = _setup_steps(self._step, Task.TASK_SETUP)
        inst_inits, inst_exits = _setup_steps(self._step, Task.TASK_INSTANCE_SETUP)
        instance = inst_inits + ([self._step] if self._step is not None else []) + inst_exits
        if self._num_instances is None:
            steps = inits + instance + exits
        else:
            # Each instance runs in a workspace of its own (its blobs and op instances, as
            # Caffe2's concurrent instances), reading the task's blobs; one after another here.
            runs = []
            for k in range(self.num_instances()):
                run = core.execution_step(f"{self.name}:instance_{k}", instance)
                run.SetCreateWorkspace(True)
                runs.append(run)
            steps = inits + runs + exits
        return core.execution_step(self.name, steps) if steps else \
            core.execution_step(self.name, [core.Net(self.name + "_empty")])

    def __repr__(self):
        return f"Task(name={self.name!r}, node={self.node!r}, outputs={self.output_names()})"
