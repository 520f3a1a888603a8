"""Caffe2's ``core.Plan``, ``core.ExecutionStep`` and ``core.execution_step`` (re-exported by core).

A plan is a list of execution steps plus the nets they run; ``workspace.RunPlan(plan)`` runs it
(see :mod:`caffe2torch.python.plan_runner`). Example::

    init_step = core.execution_step("init", init_net)
    train_step = core.execution_step("train", train_net, num_iter=100)
    plan = core.Plan("train_plan")
    plan.AddStep(core.execution_step("all", [init_step, train_step]))
    workspace.RunPlan(plan)
"""
from caffe2torch.proto import caffe2_pb2


def _net_proto(net):
    return net.Proto() if hasattr(net, "Proto") else net


class ExecutionStep:
    """An ExecutionStep under construction: nets or substeps, iterations, a stop blob."""

    def __init__(self, name, nets=None, num_iter=None):
        self._step = caffe2_pb2.ExecutionStep(name=name or "")
        self._nets = []  # the nets' NetDefs, so that Plan.AddStep can add them to the plan
        self._net_objects = []  # the core.Net objects (their attributes: task setup, reports)
        self._substeps = []
        self._net_names = set()
        if nets is not None:
            for net in nets if isinstance(nets, (list, tuple)) else [nets]:
                self.AddNet(net)
        if num_iter is not None:
            self._step.num_iter = num_iter

    def get_net(self, name):
        """The NetDef of net ``name`` of this step."""
        return next(n for n in self._nets if n.name == name)

    def Name(self):
        """The step's name."""
        return self._step.name

    def __str__(self):
        return self._step.name

    def HasNets(self):
        """True when the step runs nets."""
        return bool(self._step.network)

    def HasSubsteps(self):
        """True when the step has substeps."""
        return bool(self._step.substep)

    def Nets(self):
        """The NetDefs this step runs."""
        return list(self._nets)

    def Substeps(self):
        """The ExecutionStep objects (or protos) added as substeps."""
        return list(self._substeps)

    def SetIter(self, num_iter):
        """Run ``num_iter`` times."""
        self._step.num_iter = num_iter

    def SetCreateWorkspace(self, create_workspace):
        """Run in a child workspace."""
        self._step.create_workspace = create_workspace

    def SetNumConcurrentInstances(self, num_concurrent_instances):
        """Caffe2's concurrent instances (run one after another here)."""
        self._step.num_concurrent_instances = num_concurrent_instances

    def SetOnlyOnce(self, only_once):
        """With a stop blob: run one iteration only."""
        self._step.only_once = only_once

    def SetShouldStopBlob(self, should_stop_blob):
        """Stop when this boolean blob becomes true (checked after each net or substep)."""
        self._step.should_stop_blob = str(should_stop_blob)

    def RunEveryMillis(self, interval):
        """Run this step periodically while its parent runs."""
        self._step.run_every_ms = interval

    def SetReportNet(self, report_net, report_interval):
        """Run ``report_net`` every ``report_interval`` seconds while the step runs."""
        proto = _net_proto(report_net)
        self._add_net_proto(proto)
        self._step.report_net = proto.name
        self._step.report_interval = report_interval

    def AddSubstep(self, substep):
        """Add an ExecutionStep (object or proto) as a substep."""
        if self._step.network:
            raise ValueError(f"ExecutionStep {self.Name()!r} already has nets; a step holds "
                             "nets or substeps, not both")
        proto = substep.Proto() if isinstance(substep, ExecutionStep) else substep
        self._step.substep.add().CopyFrom(proto)
        self._substeps.append(substep)
        if isinstance(substep, ExecutionStep):
            for net in substep._all_nets():
                self._add_net_proto(net, add_to_step=False)
            self._net_objects.extend(substep._net_objects)
        return self

    def SetConcurrentSubsteps(self, concurrent_substeps):
        """Mark the substeps as concurrent (run one after another here)."""
        self._step.concurrent_substeps = concurrent_substeps

    def AddNet(self, net):
        """Run ``net`` (core.Net or NetDef) in this step."""
        if self._step.substep:
            raise ValueError(f"ExecutionStep {self.Name()!r} already has substeps; a step holds "
                             "nets or substeps, not both")
        self._add_net_proto(_net_proto(net))
        if hasattr(net, "get_attributes"):
            self._net_objects.append(net)
        return self

    def _add_net_proto(self, proto, add_to_step=True):
        if add_to_step:
            self._step.network.append(proto.name)
        if proto.name not in self._net_names:
            self._net_names.add(proto.name)
            self._nets.append(proto)

    def _all_nets(self):
        return list(self._nets)

    def get_all_attributes(self, name):
        """The objects attached under ``name`` to the nets of this step and its substeps."""
        return [a for net in self._net_objects for a in net.get_attributes(name)]

    def Proto(self):
        """The ExecutionStep proto."""
        return self._step

    @staticmethod
    def create_from_proto(step_proto, net_obj_dict, net_proto_dict):
        """An ExecutionStep from its proto, its nets taken from ``net_obj_dict`` by name."""
        step = ExecutionStep(step_proto.name)
        for name in step_proto.network:
            if name not in net_obj_dict:
                raise ValueError(f"ExecutionStep {step_proto.name!r} uses net {name!r}, which "
                                 "the plan does not hold")
            step.AddNet(net_obj_dict[name])
        for sub in step_proto.substep:
            step.AddSubstep(ExecutionStep.create_from_proto(sub, net_obj_dict, net_proto_dict))
        # Every other field (num_iter, should_stop_blob, report_net, ...) as in the proto.
        nets, substeps = list(step._step.network), list(step._step.substep)
        step._step.CopyFrom(step_proto)
        del step._step.network[:]
        step._step.network.extend(nets)
        del step._step.substep[:]
        for sub in substeps:
            step._step.substep.add().CopyFrom(sub)
        return step


def _rename_nets(step_proto, renamed):
    # core.Net(proto) may give a net a new unique name: the step must name it so.
    step_proto.network[:] = [renamed.get(n, n) for n in step_proto.network]
    if step_proto.HasField("report_net"):
        step_proto.report_net = renamed.get(step_proto.report_net, step_proto.report_net)
    for sub in step_proto.substep:
        _rename_nets(sub, renamed)


def add_nets_in_order(step, net_list):
    """Append the NetDefs ``step`` uses to ``net_list`` (each once, first use first)."""
    names = {n.name for n in net_list}
    for net in step._all_nets() if isinstance(step, ExecutionStep) else []:
        if net.name not in names:
            names.add(net.name)
            net_list.append(net)


class Plan:
    """A PlanDef under construction: ``AddStep`` adds a step and the nets it runs."""

    def __init__(self, name_or_step):
        self._plan = caffe2_pb2.PlanDef()
        self._net_dict = {}
        self._net_objects = {}  # name -> the core.Net given (Nets() returns those, as Caffe2)
        self._steps = []
        if isinstance(name_or_step, ExecutionStep):
            self._plan.name = name_or_step.Name()
            self.AddStep(name_or_step)
        elif isinstance(name_or_step, str):
            self._plan.name = name_or_step
        else:
            raise TypeError("Plan takes a name or an ExecutionStep")

    def __str__(self):
        return self._plan.name

    def Proto(self):
        """The PlanDef."""
        return self._plan

    def AddNets(self, nets):
        """Add nets (core.Net or NetDef) to the plan, each name once."""
        for net in nets:
            proto = _net_proto(net)
            if hasattr(net, "Proto"):
                self._net_objects.setdefault(proto.name, net)
            if proto.name not in self._net_dict:
                self._net_dict[proto.name] = proto
                self._plan.network.add().CopyFrom(proto)

    def Nets(self):
        """The plan's nets: the core.Net objects given (NetDefs where protos were given)."""
        return [self._net_objects.get(name, proto) for name, proto in self._net_dict.items()]

    def AddStep(self, step):
        """Add an execution step (object or proto) and the nets it uses."""
        if isinstance(step, ExecutionStep):
            for net in step._net_objects:
                self._net_objects.setdefault(net.Name(), net)
            nets = []
            add_nets_in_order(step, nets)
            self.AddNets(nets)
            proto = step.Proto()
        else:
            proto = step
        self._plan.execution_step.add().CopyFrom(proto)
        self._steps.append(step)

    def Steps(self):
        """The steps added."""
        return list(self._steps)

    @staticmethod
    def create_from_proto(plan_proto):
        """A Plan (with core.Net objects) from a PlanDef."""
        from caffe2torch.python import core
        plan = Plan(plan_proto.name)
        nets = {}
        for net_proto in plan_proto.network:
            if net_proto.name in nets:
                raise ValueError(f"plan {plan_proto.name!r} holds two nets named "
                                 f"{net_proto.name!r}")
            nets[net_proto.name] = core.Net(net_proto)
        protos = {n.name: n for n in plan_proto.network}
        renamed = {name: net.Name() for name, net in nets.items()}
        for step_proto in plan_proto.execution_step:
            step = ExecutionStep.create_from_proto(step_proto, nets, protos)
            _rename_nets(step._step, renamed)
            plan.AddStep(step)
        return plan

    def get_all_attributes(self, name):
        """The objects attached under ``name`` to the nets of the plan's steps."""
        return [a for step in self._steps if isinstance(step, ExecutionStep)
                for a in step.get_all_attributes(name)]


def to_execution_step(step_or_nets, default_name=None):
    """An ExecutionStep from a step, a net, a NetBuilder, a Task(Group), or a list of those."""
    if isinstance(step_or_nets, ExecutionStep):
        return step_or_nets
    if hasattr(step_or_nets, "get_step"):  # a Task or TaskGroup
        return step_or_nets.get_step()
    stop_blob = None
    if hasattr(step_or_nets, "get") and hasattr(step_or_nets, "current_net"):  # a NetBuilder
        default_name = default_name or step_or_nets.name
        stop_blob = step_or_nets._stop_blob
        step_or_nets = step_or_nets.get()
    if not default_name and hasattr(step_or_nets, "Name"):
        default_name = step_or_nets.Name()
    if hasattr(step_or_nets, "Proto") or isinstance(step_or_nets, caffe2_pb2.NetDef):
        step_or_nets = [step_or_nets]
    return execution_step(default_name, step_or_nets, should_stop_blob=stop_blob)


def scoped_execution_step(name, *args, **kwargs):
    """execution_step with its name under the current name scope."""
    from caffe2torch.python import scope
    return execution_step(scope.CurrentNameScope() + name if name else name, *args, **kwargs)


def execution_step(default_name, steps_or_nets, num_iter=None, report_net=None,
                   report_interval=None, concurrent_substeps=None, should_stop_blob=None,
                   only_once=None, num_concurrent_instances=None, create_workspace=False,
                   run_every_ms=None):
    """An ExecutionStep running ``steps_or_nets`` (a net, a step, or a list of nets or steps)."""
    if isinstance(steps_or_nets, ExecutionStep):
        steps_or_nets = [steps_or_nets]
    elif hasattr(steps_or_nets, "Proto") or isinstance(steps_or_nets, caffe2_pb2.NetDef):
        steps_or_nets = [steps_or_nets]
    step = ExecutionStep(default_name)
    if should_stop_blob is not None:
        step.SetShouldStopBlob(should_stop_blob)
    if num_iter is not None:
        step.SetIter(num_iter)
    if only_once is not None:
        step.SetOnlyOnce(only_once)
    if concurrent_substeps is not None:
        step.SetConcurrentSubsteps(concurrent_substeps)
    if report_net is not None:
        if report_interval is None:
            raise ValueError("execution_step: report_net needs report_interval (seconds)")
        step.SetReportNet(report_net, report_interval)
    if num_concurrent_instances is not None:
        step.SetNumConcurrentInstances(num_concurrent_instances)
    if create_workspace:
        step.SetCreateWorkspace(True)
    if run_every_ms:
        step.RunEveryMillis(run_every_ms)
    items = list(steps_or_nets or [])

    def is_net(s):
        return isinstance(s, caffe2_pb2.NetDef) or (hasattr(s, "Proto") and not isinstance(
            s, ExecutionStep) and isinstance(s.Proto(), caffe2_pb2.NetDef))
    if items and all(is_net(s) for s in items):
        for net in items:
            step.AddNet(net)
    else:
        # Steps, builders, tasks, or a mix with nets: each becomes a substep (Caffe2's rule).
        for s in items:
            step.AddSubstep(s if isinstance(s, caffe2_pb2.ExecutionStep) else
                            to_execution_step(s))
    return step
