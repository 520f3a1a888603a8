"""net_builder's execution-step control (ops.loop, ops.If/Elif/Else, ops.stop/stop_if,
ops.stop_guard, ops.task_init/task_exit), task (Task, TaskGroup, final_output), session
(LocalSession) and control (Do, For, While, Until, DoWhile, DoUntil, Switch, If, IfNot): the
scenarios of Caffe2's net_builder, session and control tests, run on the plan runner."""
import numpy as np
import pytest

from caffe2torch.python import control, core, workspace
from caffe2torch.python.net_builder import NetBuilder, ops
from caffe2torch.python.session import LocalSession
from caffe2torch.python.task import Task, TaskGroup, WorkspaceType, final_output

pytestmark = pytest.mark.usefixtures("fresh_workspace")


def _run(nb):
    ws = workspace.C.Workspace()
    ws.run(core.Plan(core.to_execution_step(nb)))
    return ws


def test_loop_until_stop_if():
    with NetBuilder() as nb:
        x, y = ops.Const(5), ops.Const(0)
        with ops.loop():
            ops.stop_if(ops.EQ([x, ops.Const(0)]))
            ops.Add([x, ops.Const(-1)], [x])
            ops.Add([y, ops.Const(1)], [y])
    ws = _run(nb)
    assert ws.blobs[str(y)].fetch() == 5 and ws.blobs[str(x)].fetch() == 0


def test_loop_needs_a_stop_condition():
    with NetBuilder():
        with pytest.raises(RuntimeError, match="needs a stop condition"):
            with ops.loop():
                ops.Const(1)


@pytest.mark.parametrize("value, stopped", [(10, False), (3, True)])
def test_stop_guard_says_whether_it_stopped(value, stopped):
    with NetBuilder() as nb:
        x = ops.Const(value)
        with ops.stop_guard() as guard:
            ops.stop_if(ops.LT([x, ops.Const(5)]))
            after = ops.Const(1)
        with ops.stop_guard() as empty:
            pass
    ws = _run(nb)
    assert ws.blobs[str(guard.has_stopped())].fetch() == stopped
    assert ws.blobs[str(empty.has_stopped())].fetch() == False  # noqa: E712
    assert (ws.blobs_raw.get(str(after)) is not None) != stopped  # the rest ran iff not stopped


@pytest.mark.parametrize("x, expected", [(75, 2), (25, 3), (50, 1)])
def test_if_steps_and_stop_inside(x, expected):
    with NetBuilder() as nb:
        y = ops.Const(1)
        cond = ops.Const(x)
        with ops.If(ops.GT([cond, ops.Const(50)])):
            ops.Const(2, blob_out=y)
        with ops.If(ops.LT([cond, ops.Const(50)])):
            ops.Const(3, blob_out=y)
            ops.stop()
            ops.Const(4, blob_out=y)  # never runs: the step stopped
    assert _run(nb).blobs[str(y)].fetch() == expected


def test_nested_counted_loops_with_elif_else_in_a_task():
    with Task() as task:
        totals = [ops.Const(0) for _ in range(4)]  # all, >= 80, >= 50, the rest
        with ops.loop(6) as outer:
            tens = ops.Mul([outer.iter(), ops.Const(10)])
            with ops.loop(outer.iter()) as inner:
                val = ops.Add([tens, inner.iter()])
                with ops.If(ops.GE([val, ops.Const(40)])) as branch:
                    ops.Add([totals[1], val], [totals[1]])
                with branch.Elif(ops.GE([val, ops.Const(20)])) as branch:
                    ops.Add([totals[2], val], [totals[2]])
                with branch.Else():
                    ops.Add([totals[3], val], [totals[3]])
                ops.Add([totals[0], val], totals[0])
        outputs = [final_output(t) for t in totals]
    with LocalSession() as session:
        session.run(task)
    values = [v for i in range(6) for v in (i * 10 + j for j in range(i))]
    expected = [sum(values), sum(v for v in values if v >= 40),
                sum(v for v in values if 20 <= v < 40), sum(v for v in values if v < 20)]
    assert [int(o.fetch()) for o in outputs] == expected


def test_task_init_and_task_exit_run_first_and_last():
    with Task() as task:
        with ops.task_init():
            one = ops.Const(1)
        two = ops.Add([one, one])
        with ops.task_init():
            three = ops.Const(3)
        accum = ops.Add([two, three])  # 5
        with ops.task_exit():
            seven_1 = ops.Add([accum, one])  # runs after the lines below: 6 + 1
        six = ops.Add([accum, one])
        ops.Add([accum, one], [accum])
        seven_2 = ops.Add([accum, one])
        o6, o7_1, o7_2 = final_output(six), final_output(seven_1), final_output(seven_2)
    with LocalSession() as session:
        session.run(task)
    assert (o6.fetch(), o7_1.fetch(), o7_2.fetch()) == (6, 7, 7)


def test_a_private_task_keeps_its_blobs_a_global_one_shares_them():
    workspace.FeedBlob("base", np.array([2.0], np.float32))
    with TaskGroup() as group:
        with Task(workspace_type=WorkspaceType.PRIVATE):
            ops.Scale("base", "private_out", scale=3.0)
            private = final_output("private_out")
        with Task(workspace_type=WorkspaceType.GLOBAL):
            ops.Scale("base", "global_out", scale=5.0)
    assert group.num_registered_tasks() == 2
    LocalSession().run(group)
    assert private.fetch()[0] == 6.0
    assert not workspace.HasBlob("private_out") and workspace.FetchBlob("global_out")[0] == 10.0


def test_session_runs_nets_steps_and_plans():
    net = core.Net("session_net")
    net.ConstantFill([], "c", shape=[1], value=4.0)
    with LocalSession() as session:
        session.run(net)
        assert workspace.FetchBlob("c")[0] == 4.0
        net2 = core.Net("session_net2")
        net2.Scale("c", "c", scale=2.0)
        session.run(core.execution_step("twice", net2, num_iter=2))
        assert workspace.FetchBlob("c")[0] == 16.0
    with pytest.raises(RuntimeError, match="closed"):
        session.run(net)


def test_final_output_before_the_run_says_so():
    with Task():
        out = final_output(ops.Const(1))
    with pytest.raises(RuntimeError, match="run its task"):
        out.fetch()


# --- control ------------------------------------------------------------------------------------

def _counter_nets(init=0):
    init_net = core.Net("counter_init")
    counter = init_net.CreateCounter([], init_count=init)
    count_net = core.Net("count_up")
    count_net.CountUp([counter], [])
    read_net = core.Net("read_count")
    read_net.RetrieveCount([counter], ["count"])
    return init_net, counter, count_net, read_net


def _run_control(step, init_net, read_net):
    workspace.RunPlan(core.Plan(control.Do("all", init_net, step, read_net)))
    return int(workspace.FetchBlob("count"))


def _limit_net(counter, limit, op="LT"):
    """A condition net: count < limit (its last external output)."""
    net = core.Net("cond")
    count = net.RetrieveCount([counter], [net.NextName("c")])
    cond = getattr(net, op)([count, net.Const(np.array(limit, np.int64))],
                            [net.NextName("cond")])
    net.AddExternalOutput(cond)
    return net


def test_for_and_do():
    init_net, counter, count_net, read_net = _counter_nets()
    assert _run_control(control.For("for", count_net, 4), init_net, read_net) == 4
    init_net, counter, count_net, read_net = _counter_nets()
    assert _run_control(control.Do("do", count_net, count_net), init_net, read_net) == 2
    init_net, counter, count_net, read_net = _counter_nets()
    step = control.DoParallel("par", count_net, count_net, count_net)
    assert step.Proto().concurrent_substeps or len(step.Proto().network) == 3
    assert _run_control(step, init_net, read_net) == 3


@pytest.mark.parametrize("kind, start, expected", [
    ("While", 0, 5), ("While", 7, 7), ("DoWhile", 7, 8), ("Until", 0, 5),
    ("DoUntil", 0, 5), ("DoUntil", 7, 8)])
def test_while_until_do_while_do_until(kind, start, expected):
    init_net, counter, count_net, read_net = _counter_nets(start)
    # While/DoWhile run while count < 5; Until/DoUntil until count >= 5.
    cond = _limit_net(counter, 5, "LT" if "While" in kind else "GE")
    step = getattr(control, kind)(kind, cond, count_net)
    assert _run_control(step, init_net, read_net) == expected


@pytest.mark.parametrize("flag, expected", [(True, 1), (False, 10)])
@pytest.mark.parametrize("kind", ["If", "IfNot"])
def test_if_and_if_not(kind, flag, expected):
    init_net, counter, count_net, read_net = _counter_nets()
    ten = core.Net("count_ten")
    for _ in range(10):
        ten.CountUp([counter], [])
    workspace.FeedBlob("flag", np.array(flag if kind == "If" else not flag))
    branches = (count_net, ten) if kind == "If" else (ten, count_net)
    step = getattr(control, kind)(kind, "flag", *branches)
    if kind == "IfNot":
        expected = 11 - expected  # IfNot on the negated flag swaps the branches
    assert _run_control(step, init_net, read_net) == expected


def test_switch_runs_every_true_branch():
    init_net, counter, count_net, read_net = _counter_nets()
    workspace.FeedBlob("yes", np.array(True))
    workspace.FeedBlob("no", np.array(False))
    step = control.Switch("sw", ("yes", count_net), ("no", count_net), ("yes", count_net))
    assert _run_control(step, init_net, read_net) == 2
    init_net, counter, count_net, read_net = _counter_nets()
    step = control.SwitchNot("swn", ("yes", count_net), ("no", count_net))
    assert _run_control(step, init_net, read_net) == 1


def test_merge_and_combine_condition_nets():
    a, b = core.Net("a"), core.Net("b")
    a.AddExternalOutput(a.ConstantFill([], "ca", shape=[], value=True, dtype=core.DataType.BOOL))
    b.AddExternalOutput(b.ConstantFill([], "cb", shape=[], value=False,
                                       dtype=core.DataType.BOOL))
    merged = control.MergeConditionNets("m", [a, b], "And")
    workspace.RunNetOnce(merged)
    assert workspace.FetchBlob(control.GetConditionBlobFromNet(merged)) == False  # noqa: E712
    combined = control.CombineConditions("c", [a, b], "Or")
    workspace.RunNetOnce(combined)
    assert workspace.FetchBlob(control.GetConditionBlobFromNet(combined)) == True  # noqa: E712


def test_task_instances_have_workspaces_and_python_op_instances_of_their_own():
    built = []

    def builder():
        built.append(1)
        return lambda inputs, outputs: None
    with TaskGroup() as group:
        with Task(num_instances=3):
            with ops.task_init():
                shared = ops.CreateCounter([], ["shared_counter"])
            with ops.task_instance_init():
                mine = ops.CreateCounter([], ["instance_counter"])
            with ops.loop(4):
                ops.CountUp(shared)
                ops.CountUp(mine)
                ops.Python((builder, [], {}))([], [])
            with ops.task_instance_exit():
                count = ops.RetrieveCount(mine)
                ops.Add([ops.Const(0), count], ["last_instance_count"])
            with ops.task_exit():
                total = final_output(ops.RetrieveCount(shared))
    LocalSession().run(group)
    assert total.fetch() == 12 and len(built) == 3  # one Python op instance per task instance
    assert not workspace.HasBlob("instance_counter")
