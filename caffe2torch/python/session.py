"""Caffe2's ``session``: :class:`LocalSession` runs Tasks, TaskGroups, steps, plans and nets in
a workspace and hands the tasks' ``final_output`` values back.

Example::

    with Task() as task:
        out = final_output(ops.Add([ops.Const(1), ops.Const(2)]))
    with LocalSession() as session:
        session.run(task)
    out.fetch()   # 3

A PRIVATE task (the default for a Task in a TaskGroup of its own type) runs in a child workspace
that reads the session's blobs and keeps its own; a GLOBAL one writes the session's workspace.
"""
from caffe2torch.python import core
from caffe2torch.python.task import Task, TaskGroup, WorkspaceType


class CompiledRunnable:
    """A runnable turned into a TaskGroup once (Session.compile)."""

    def __init__(self, obj, session_class):
        self.obj = obj
        self.session_class = session_class


class Session:
    """Runs TaskGroups; ``run`` accepts a Task, TaskGroup, ExecutionStep, Plan, Net or a list."""

    _compiled_cache = {}

    def __init__(self):
        self._open = True

    def is_open(self):
        """False after close()."""
        return self._open

    @classmethod
    def compile(cls, runnable, workspace_type=None, setup_net_list=None):
        """The TaskGroup that runs ``runnable`` (non-Task runnables run in GLOBAL workspace)."""
        if isinstance(runnable, CompiledRunnable):
            return runnable
        if isinstance(runnable, TaskGroup):
            if workspace_type is not None and runnable.workspace_type() not in (
                    None, workspace_type):
                raise ValueError(f"this TaskGroup has workspace type "
                                 f"{runnable.workspace_type()!r}, not {workspace_type!r}")
            group = runnable
        else:
            group = TaskGroup(workspace_type=workspace_type or WorkspaceType.GLOBAL)
            if isinstance(runnable, Task):
                group.add(runnable)
            elif isinstance(runnable, core.Plan):
                steps = runnable.Steps()
                group.add(Task(step=steps if len(steps) != 1 else steps[0], group=False))
            else:
                group.add(Task(step=core.to_execution_step(runnable, "runnable"), group=False))
        if setup_net_list:
            group._setup_nets = list(setup_net_list)
        return CompiledRunnable(group, session_class=cls)

    def run(self, runnable, workspace_type=None, setup_net_list=None):
        """Run ``runnable``; the outputs of its tasks become fetchable."""
        if not self._open:
            raise RuntimeError("this session is closed")
        compiled = self.compile(runnable, workspace_type, setup_net_list)
        self._run_compiled(compiled)

    def _run_compiled(self, compiled):
        raise NotImplementedError(f"{type(self).__name__} does not run task groups")

    def close(self):
        """Release the session (it runs nothing afterwards)."""
        self._open = False

    def fetch_output(self, output):
        """The value of a TaskOutput."""
        return output.fetch()

    def __enter__(self):
        return self

    def __exit__(self, etype, *args):
        if etype is None:
            self.close()


class LocalSession(Session):
    """Runs tasks in this process, in ``ws`` (default: the current workspace)."""

    def __init__(self, ws=None):
        super().__init__()
        self._ws = ws

    def _workspace(self):
        from caffe2torch.python import workspace
        if self._ws is None:
            return workspace.C()  # the current workspace when the session runs
        # workspace.C.Workspace wraps caffe2torch's Workspace; the plan runner takes the latter.
        return getattr(self._ws, "_impl", self._ws)

    def _run_compiled(self, compiled):
        from caffe2torch.python import plan_runner
        group = compiled.obj
        ws = self._workspace()
        for net in getattr(group, "_setup_nets", []):
            plan_runner.run_plan(core.execution_step("setup", net), ws)
        inits, exits = group.local_setup_steps()
        for step in inits:
            plan_runner.run_plan(step, ws)
        for task in group.tasks():
            target = ws if task.workspace_type() == WorkspaceType.GLOBAL else \
                plan_runner.child_workspace(ws)
            plan_runner.run_plan(task.get_step(), target)
            values = [_fetch(target, name) for name in task.output_names()]
            task.output_list().set_values(values)
        for step in exits:
            plan_runner.run_plan(step, ws)
        group._already_used = True


def _fetch(ws, name):
    value = ws.blobs.get(name)
    if hasattr(value, "resolve"):  # a Deferred blob
        value = value.resolve()
    if value is None:
        raise RuntimeError(f"task output {name!r} was not produced by the task")
    return value.detach().cpu().numpy().copy() if hasattr(value, "detach") else value
