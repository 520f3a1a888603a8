"""Caffe2's ``control``: execution steps that run nets or steps once, in a loop or on a condition
(``Do``, ``DoParallel``, ``For``, ``While``, ``Until``, ``DoWhile``, ``DoUntil``, ``Switch``,
``SwitchNot``, ``If``, ``IfNot``), built from ``should_stop_blob`` steps as Caffe2 builds them.

A condition is a bool blob, or a net whose last external output is that blob (the net runs
before each test). Example::

    init_net = core.Net("init")
    cnt = init_net.CreateCounter([], init_count=0)
    step = control.For("count_to_5", cnt_net, 5)     # runs cnt_net five times
    workspace.RunPlan(core.Plan(control.Do("all", init_net, step)))

DoParallel's substeps are marked concurrent and run one after another (caffe2torch's plan runner
is single-threaded).
"""
from caffe2torch.python import core

_step_names = set()
_next_index = [1]


def _next_step_name(control_name, base_name):
    """``base/control``, made unique with ``_<n>`` (the step names of Caffe2's control)."""
    name = candidate = f"{base_name}/{control_name}"
    while candidate in _step_names:
        candidate = f"{name}_{_next_index[0]}"
        _next_index[0] += 1
    _step_names.add(candidate)
    return candidate


def _as_list(args):
    """(a, b) -> [a, b]; (a,) -> [a]; ([a, b],) -> [a, b]."""
    if not args:
        raise ValueError("control: give at least one net or step")
    if len(args) == 1:
        return list(args[0]) if isinstance(args[0], list) else [args[0]]
    return list(args)


def _is_nets(nets_or_steps):
    items = nets_or_steps if isinstance(nets_or_steps, list) else [nets_or_steps]
    return all(isinstance(n, core.Net) for n in items)


def _prepend(nets_or_steps, *nets):
    items, nets = _as_list((nets_or_steps,)), _as_list(nets)
    return nets + items if _is_nets(items) else [Do("prepend", nets)] + items


def _append(nets_or_steps, *nets):
    items, nets = _as_list((nets_or_steps,)), _as_list(nets)
    return items + nets if _is_nets(items) else items + [Do("append", nets)]


def GetConditionBlobFromNet(condition_net):
    """The condition blob of a net: its last external output."""
    outputs = condition_net.Proto().external_output
    if not outputs:
        raise ValueError(f"condition net {condition_net.Name()!r} needs an external output "
                         "(its last one is the condition)")
    return core.BlobReference(outputs[-1])


def BoolNet(*blobs_with_bool_value):
    """A net setting each (blob, bool) pair's blob to that constant."""
    net = core.Net("bool_net")
    for blob, value in _as_list(blobs_with_bool_value):
        out = net.ConstantFill([], [blob], shape=[], value=value, dtype=core.DataType.BOOL)
        net.AddExternalOutput(out)
    return net


def NotNet(condition_blob_or_net):
    """(net computing Not(condition), its output blob)."""
    cond = GetConditionBlobFromNet(condition_blob_or_net) \
        if isinstance(condition_blob_or_net, core.Net) else condition_blob_or_net
    net = core.Net("not_net")
    out = net.Not(cond)
    net.AddExternalOutput(out)
    return net, out


def _copy_condition_net(condition_blob):
    net = core.Net("copy_condition_blob_net")
    out = net.Copy(condition_blob)
    net.AddExternalOutput(out)
    return net, out


def MergeConditionNets(name, condition_nets, relation):
    """One net running every condition net, its condition their And/Or (``relation``)."""
    if not isinstance(condition_nets, list):
        return condition_nets
    if len(condition_nets) <= 1:
        return condition_nets[0] if condition_nets else None
    merged = core.Net(name)
    last = None
    for net in condition_nets:
        merged.Proto().op.extend(net.Proto().op)
        merged.Proto().external_input.extend(net.Proto().external_input)
        cond = GetConditionBlobFromNet(net)
        last = cond if last is None else getattr(merged, relation)([last, cond])
        for key, values in net.__dict__.get("_attr_dict", {}).items():
            for v in values:
                merged.add_attribute(key, v)
    merged.AddExternalOutput(last)
    return merged


def CombineConditions(name, condition_nets, relation):
    """A net combining the condition blobs of the nets with And/Or (without their ops)."""
    if not condition_nets:
        return None
    if not isinstance(condition_nets, list):
        raise ValueError("CombineConditions: condition_nets must be a list of nets")
    if len(condition_nets) == 1:
        net, _ = _copy_condition_net(GetConditionBlobFromNet(condition_nets[0]))
        return net
    combined = core.Net(name)
    last = None
    for net in condition_nets:
        cond = GetConditionBlobFromNet(net)
        last = cond if last is None else getattr(combined, relation)([last, cond])
    combined.AddExternalOutput(last)
    return combined


def Do(name, *nets_or_steps):
    """Run the nets or steps once, in order."""
    items = _as_list(nets_or_steps)
    if len(items) == 1 and isinstance(items[0], core.ExecutionStep):
        return items[0]
    return core.scoped_execution_step(_next_step_name("Do", name), items)


def DoParallel(name, *nets_or_steps):
    """Run the nets or steps as concurrent substeps (one after another here)."""
    items = _as_list(nets_or_steps)
    if len(items) == 1 and isinstance(items[0], core.ExecutionStep):
        return items[0]
    return core.scoped_execution_step(_next_step_name("DoParallel", name), items,
                                      concurrent_substeps=True)


def _until_not(name, condition_blob_or_net, nets_or_steps, control, only_once):
    """A step running the nets or steps while the condition holds (tested before each pass)."""
    not_net, stop = NotNet(condition_blob_or_net)
    if isinstance(condition_blob_or_net, core.Net):
        items = _prepend(nets_or_steps, condition_blob_or_net, not_net)
    else:
        items = _prepend(nets_or_steps, not_net)

    def step(control_name):
        return core.scoped_execution_step(_next_step_name(control_name, name), items,
                                          should_stop_blob=stop, only_once=only_once)
    if _is_nets(items):
        # The stop blob may be True from an earlier run: reset it first.
        return Do(f"{name}/{control}", BoolNet((stop, False)), step(f"{control}-inner"))
    return step(control)


def _RunOnceIf(name, condition_blob_or_net, nets_or_steps):
    """Run once if the condition holds (a condition net runs first)."""
    return _until_not(name, condition_blob_or_net, nets_or_steps, "_RunOnceIf", only_once=True)


def _RunOnceIfNot(name, condition_blob_or_net, nets_or_steps):
    """Run once if the condition does not hold."""
    if isinstance(condition_blob_or_net, core.Net):
        cond = GetConditionBlobFromNet(condition_blob_or_net)
        items = _prepend(nets_or_steps, condition_blob_or_net)
    else:
        copy_net, cond = _copy_condition_net(condition_blob_or_net)
        items = _prepend(nets_or_steps, copy_net)
    return core.scoped_execution_step(_next_step_name("_RunOnceIfNot", name), items,
                                      should_stop_blob=cond, only_once=True)


def For(name, nets_or_steps, iter_num):
    """Run the nets or steps ``iter_num`` times."""
    init_net = core.Net("init-net")
    counter = init_net.CreateCounter([], init_count=iter_num)
    iter_net = core.Net("For-iter")
    done = iter_net.CountDown([counter])
    loop = core.scoped_execution_step(_next_step_name("For-inner", name),
                                      _prepend(nets_or_steps, iter_net), should_stop_blob=done)
    return Do(name + "/For", Do(name + "/For-init-net", init_net), loop)


def While(name, condition_blob_or_net, nets_or_steps):
    """Repeat the nets or steps while the condition holds (tested before each pass)."""
    return _until_not(name, condition_blob_or_net, nets_or_steps, "While", only_once=None)


def Until(name, condition_blob_or_net, nets_or_steps):
    """Repeat the nets or steps until the condition holds (tested before each pass)."""
    if isinstance(condition_blob_or_net, core.Net):
        stop = GetConditionBlobFromNet(condition_blob_or_net)
        nets_or_steps = _prepend(nets_or_steps, condition_blob_or_net)
    else:
        stop = core.BlobReference(str(condition_blob_or_net))
    return core.scoped_execution_step(_next_step_name("Until", name), nets_or_steps,
                                      should_stop_blob=stop)


def DoWhile(name, condition_blob_or_net, nets_or_steps):
    """Run the nets or steps, then repeat while the condition holds (tested after each pass)."""
    not_net, stop = NotNet(condition_blob_or_net)
    if isinstance(condition_blob_or_net, core.Net):
        items = _append(nets_or_steps, condition_blob_or_net, not_net)
    else:
        items = _append(nets_or_steps, not_net)
    return Do(name + "/DoWhile", BoolNet((stop, False)), core.scoped_execution_step(
        _next_step_name("DoWhile-inner", name), items, should_stop_blob=stop))


def DoUntil(name, condition_blob_or_net, nets_or_steps):
    """Run the nets or steps, then repeat until the condition holds (tested after each pass)."""
    if not isinstance(condition_blob_or_net, core.Net):
        return core.scoped_execution_step(_next_step_name("DoUntil", name), nets_or_steps,
                                          should_stop_blob=core.BlobReference(
                                              str(condition_blob_or_net)))
    items = _append(nets_or_steps, condition_blob_or_net)
    stop = GetConditionBlobFromNet(condition_blob_or_net)
    return Do(name + "/DoUntil", BoolNet((stop, False)), core.scoped_execution_step(
        _next_step_name("DoUntil-inner", name), items, should_stop_blob=stop))


def Switch(name, *conditions):
    """Run each (condition, nets_or_steps) whose condition holds (several may run)."""
    return core.scoped_execution_step(
        _next_step_name("Switch", name),
        [_RunOnceIf(name + "/Switch", cond, step) for cond, step in _as_list(conditions)])


def SwitchNot(name, *conditions):
    """Run each (condition, nets_or_steps) whose condition does not hold."""
    return core.scoped_execution_step(
        _next_step_name("SwitchNot", name),
        [_RunOnceIfNot(name + "/SwitchNot", cond, step) for cond, step in _as_list(conditions)])


def If(name, condition_blob_or_net, true_nets_or_steps, false_nets_or_steps=None):
    """Run true_nets_or_steps if the condition holds, else false_nets_or_steps (if given)."""
    if not false_nets_or_steps:
        return _RunOnceIf(name + "/If", condition_blob_or_net, true_nets_or_steps)
    cond = GetConditionBlobFromNet(condition_blob_or_net) \
        if isinstance(condition_blob_or_net, core.Net) else condition_blob_or_net
    return Do(name + "/If",
              _RunOnceIf(name + "/If-true", condition_blob_or_net, true_nets_or_steps),
              _RunOnceIfNot(name + "/If-false", cond, false_nets_or_steps))


def IfNot(name, condition_blob_or_net, true_nets_or_steps, false_nets_or_steps=None):
    """Run true_nets_or_steps if the condition does not hold, else false_nets_or_steps."""
    if not false_nets_or_steps:
        return _RunOnceIfNot(name + "/IfNot", condition_blob_or_net, true_nets_or_steps)
    cond = GetConditionBlobFromNet(condition_blob_or_net) \
        if isinstance(condition_blob_or_net, core.Net) else condition_blob_or_net
    return Do(name + "/IfNot",
              _RunOnceIfNot(name + "/IfNot-true", condition_blob_or_net, true_nets_or_steps),
              _RunOnceIf(name + "/IfNot-false", cond, false_nets_or_steps))
