"""Runs a PlanDef: its execution steps, in order, each a tree of substeps or of net runs.

Caffe2's plan executor semantics (caffe2/core/plan_executor.cc): a step holds substeps or
networks, never both; it runs ``num_iter`` times (default once), or, with ``should_stop_blob``,
until that boolean blob is true (checked after every substep or net run; ``only_once`` runs one
iteration). Substeps with ``run_every_ms`` and a step's ``report_net`` run periodically on a
thread while the step runs, and once more when it ends. ``create_workspace`` runs the step in a
child workspace that shares its parent's blobs (new ones stay its own). The plan's nets are
created in the workspace (replacing nets of the same name once). ``concurrent_substeps`` run one after another here:
caffe2torch's executor is single-threaded.
"""
import collections
import threading

import torch

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python.executor import PreparedNet


class _Reporter:
    """Calls ``fn`` every ``interval_s`` on a thread until stopped, and once when stopping."""

    def __init__(self, interval_s, fn):
        self._done = threading.Event()
        self._fn = fn
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True)
        self._thread.start()

    def _loop(self, interval_s):
        while True:
            stopped = self._done.wait(interval_s)
            self._fn()
            if stopped:
                return

    def stop(self):
        """Stop the thread after its final call."""
        self._done.set()
        self._thread.join()


class _ChildWorkspace:
    """A workspace reading its parent's blobs; every write stays its own (the Predictor's)."""

    def __init__(self, parent):
        self.blobs = collections.ChainMap({}, parent.blobs)
        self.nets = {}
        self.root_folder = parent.root_folder
        self.root_folder_name = getattr(parent, "root_folder_name", parent.root_folder)


class _StepWorkspace(_ChildWorkspace):
    """A create_workspace step's (or PRIVATE task's) workspace: new blobs stay its own; the
    parent's blobs are shared, read and written, as a Caffe2 child workspace forwards them."""

    def __init__(self, parent):
        super().__init__(parent)
        from caffe2torch.ops.control import _BlockBlobs
        self.blobs = _BlockBlobs(parent.blobs)


def child_workspace(parent):
    """A workspace whose new blobs stay its own and that shares ``parent``'s (a PRIVATE task's)."""
    return _StepWorkspace(parent)


class _PlanRun:
    def __init__(self, plan, workspace):
        self.net_defs = {}
        for net in plan.network:
            if net.name in self.net_defs:
                raise RuntimeError(f"plan {plan.name!r} contains two networks named {net.name!r}; "
                                   "give each net of a plan its own name")
            self.net_defs[net.name] = net
        # Nets that already exist in the workspace are replaced by the plan's once.
        self.needs_override = {n for n in self.net_defs if n in workspace.nets}
        self.plan = plan

    def net(self, workspace, step, name):
        if name not in self.net_defs:
            if name in workspace.nets:
                return workspace.nets[name]
            raise RuntimeError(f"ExecutionStep {step.name!r} uses undefined net {name!r}; add it "
                               "to the plan (core.Plan.AddStep adds a step's nets)")
        if name in self.needs_override or name not in workspace.nets:
            old = workspace.nets.pop(name, None)
            if old is not None:
                old.close()
            workspace.nets[name] = PreparedNet(self.net_defs[name], workspace)
            self.needs_override.discard(name)
        return workspace.nets[name]

    def create_nets(self, step, workspace):
        """Create the nets of ``step`` and its substeps (Caffe2 compiles a step tree up front)."""
        for name in step.network:
            self.net(workspace, step, name)
        if step.HasField("report_net"):
            self.net(workspace, step, step.report_net)
        for sub in step.substep:
            if not sub.create_workspace:
                self.create_nets(sub, workspace)

    def run_step(self, step, workspace):
        if step.substep and step.network:
            raise RuntimeError(f"ExecutionStep {step.name!r} has both substeps and networks; "
                               "an ExecutionStep holds one or the other")
        if step.HasField("should_stop_blob") and step.HasField("num_iter"):
            raise RuntimeError(f"ExecutionStep {step.name!r}: must not set num_iter together "
                               "with should_stop_blob")
        if step.create_workspace:
            workspace = _StepWorkspace(workspace)
            self.create_nets(step, workspace)
        nets = [self.net(workspace, step, n) for n in step.network]
        stop_blob = step.should_stop_blob if step.HasField("should_stop_blob") else None
        if stop_blob is not None and stop_blob not in workspace.blobs:
            raise RuntimeError(f"ExecutionStep {step.name!r}: should_stop_blob {stop_blob!r} "
                               "does not exist")
        if stop_blob is None:
            iterations = step.num_iter if step.HasField("num_iter") else 1
        else:
            iterations = 1 if step.only_once else None

        recurring = [s for s in step.substep if not s.HasField("run_every_ms")]
        reporters = []
        if step.HasField("report_net"):
            if not step.HasField("report_interval"):
                raise RuntimeError(f"ExecutionStep {step.name!r}: a report_interval must be "
                                   "provided if report_net is set")
            report = self.net(workspace, step, step.report_net)
            reporters.append(_Reporter(step.report_interval, report.run))
        for s in step.substep:
            if s.HasField("run_every_ms"):
                reporters.append(_Reporter(s.run_every_ms / 1000.0,
                                           lambda s=s: self.run_step(s, workspace)))
        try:
            it = 0
            while iterations is None or it < iterations:
                for item in (recurring or nets):
                    if isinstance(item, caffe2_pb2.ExecutionStep):
                        self.run_step(item, workspace)
                    else:
                        item.run(1)
                    if stop_blob is not None and _should_stop(workspace, stop_blob):
                        return True
                it += 1
        finally:
            for r in reporters:
                r.stop()
        return True


def _should_stop(workspace, name):
    value = workspace.blobs.get(name)
    if value is None:
        return False  # not yet written: keep going, as Caffe2 does
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dtype != torch.bool:
        raise RuntimeError(f"should_stop_blob {name!r} must be a scalar boolean tensor, got "
                           f"{getattr(value, 'dtype', type(value).__name__)}")
    return bool(value.reshape(()).item())


def as_plan(obj):
    """A PlanDef from a PlanDef, core.Plan, ExecutionStep, core.ExecutionStep or serialized plan."""
    if isinstance(obj, (bytes, bytearray)):
        plan = caffe2_pb2.PlanDef()
        plan.ParseFromString(bytes(obj))
        return plan
    proto = obj.Proto() if hasattr(obj, "Proto") else obj
    if isinstance(proto, caffe2_pb2.PlanDef):
        return proto
    if isinstance(proto, caffe2_pb2.ExecutionStep):
        from caffe2torch.python import core
        plan = core.Plan(proto.name or "plan")
        plan.AddStep(obj)
        return plan.Proto()
    raise TypeError(f"RunPlan takes a PlanDef, core.Plan or ExecutionStep, not "
                    f"{type(obj).__name__}")


def run_plan(obj, workspace):
    """Run the plan in ``workspace``; True on success (a failing op raises, naming itself)."""
    plan = as_plan(obj)
    run = _PlanRun(plan, workspace)
    with torch.no_grad():
        for step in plan.execution_step:
            run.create_nets(step, workspace)
            run.run_step(step, workspace)
    return True
