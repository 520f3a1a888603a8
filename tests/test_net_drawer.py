"""net_drawer: Caffe2's node ids, labels and styles, and rendering with or without Graphviz."""
import json
import os
import stat

import pytest

from caffe2torch.proto import caffe2_pb2
from caffe2torch.python import core, net_drawer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_net():
    """data -> FC -> fc1 -> Relu (in place) -> fc1 -> Softmax -> prob."""
    net = caffe2_pb2.NetDef(name="drawn")
    net.op.add(type="FC", input=["data", "fc1_w", "fc1_b"], output=["fc1"])
    net.op.add(type="Relu", input=["fc1"], output=["fc1"])
    net.op.add(type="Softmax", input=["fc1"], output=["prob"], name="head")
    return net


def node_attrs(graph, node_id):
    nodes = graph.get_node(node_id)
    assert len(nodes) >= 1, f"no node {node_id!r}; nodes: {[n.get_name() for n in graph.get_nodes()]}"
    return nodes[0].get_attributes()


def edges(graph):
    return [(e.get_source(), e.get_destination()) for e in graph.get_edges()]


def test_op_and_blob_nodes_follow_caffe2():
    graph = net_drawer.GetPydotGraph(small_net())
    assert graph.get_name() == "drawn" and graph.get("rankdir") == "LR"
    assert node_attrs(graph, 'FC (op#0)') == {
        "shape": "box", "color": "#0F9D58", "style": "filled", "fontcolor": "#FFFFFF"}
    # An op with a name is labelled "<name>/<Type> (op#i)".
    assert node_attrs(graph, 'head/Softmax (op#2)')["shape"] == "box"
    blob = node_attrs(graph, json.dumps("fc1_w0"))
    assert blob == {"label": json.dumps("fc1_w"), "shape": "octagon"}


def test_in_place_op_creates_a_new_blob_version():
    graph = net_drawer.GetPydotGraph(small_net())
    e = edges(graph)
    assert ('"data0"', 'FC (op#0)') in e
    assert ('FC (op#0)', '"fc10"') in e
    assert ('"fc10"', 'Relu (op#1)') in e
    assert ('Relu (op#1)', '"fc11"') in e  # the rewritten fc1 is a second node
    assert ('"fc11"', 'head/Softmax (op#2)') in e
    assert ('head/Softmax (op#2)', '"prob0"') in e
    assert len(e) == 8


def test_accepts_core_net_and_op_lists():
    net = core.Net("drawer_core_net")
    net.Relu(["x"], "y")
    assert net_drawer.GetPydotGraph(net).get_name() == "drawer_core_net"
    ops = list(small_net().op)
    assert net_drawer.GetPydotGraph(ops).get_name() == "unnamed"
    assert net_drawer.GetPydotGraph(ops, name="mine", rankdir="TB").get("rankdir") == "TB"


def test_append_output_node_producer():
    producer = net_drawer.GetOpNodeProducer(True, **net_drawer.OP_STYLE)
    graph = net_drawer.GetPydotGraph(small_net(), node_producer=producer)
    assert graph.get_node('FC (op#0)\nfc1')


def test_minimal_graph_has_only_ops():
    net = caffe2_pb2.NetDef(name="minimal")
    net.op.add(type="Relu", input=["x"], output=["a"])           # op0
    net.op.add(type="Relu", input=["a"], output=["b"])           # op1 (needs op0)
    net.op.add(type="Add", input=["a", "b"], output=["c"])       # op2 (needs op0, op1)
    graph = net_drawer.GetPydotGraphMinimal(net)
    names = [n.get_name() for n in graph.get_nodes()]
    assert names == ['Relu (op#0)', 'Relu (op#1)', 'Add (op#2)']
    assert edges(graph) == [('Relu (op#0)', 'Relu (op#1)'), ('Relu (op#0)', 'Add (op#2)'),
                            ('Relu (op#1)', 'Add (op#2)')]
    reduced = net_drawer.GetPydotGraphMinimal(net, minimal_dependency=True)
    # op0 -> op2 is implied by op0 -> op1 -> op2.
    assert edges(reduced) == [('Relu (op#0)', 'Relu (op#1)'), ('Relu (op#1)', 'Add (op#2)')]


def _path_without_dot(tmp_path):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    return str(empty)


def test_renders_without_graphviz_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_without_dot(tmp_path))
    program = net_drawer.dot_program()
    assert os.path.basename(program) == "graphviz-pure"
    graph = net_drawer.GetPydotGraph(small_net())
    png = net_drawer.render(graph)
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert graph.create_png().startswith(PNG_MAGIC)
    svg = graph.create_svg()
    assert b"<svg" in svg and b"Softmax (op#2)" in svg and b"fc1_w" in svg
    assert b"#0f9d58" in svg.lower()


def test_uses_graphviz_dot_when_on_path(tmp_path, monkeypatch):
    # A stand-in `dot` that records its call and delegates to graphviz-pure.
    renderer = net_drawer.dot_program()
    bindir = tmp_path / "graphviz_bin"
    bindir.mkdir()
    marker = tmp_path / "dot_was_called"
    fake_dot = bindir / "dot"
    fake_dot.write_text(f'#!/bin/sh\necho "$@" > "{marker}"\nexec "{renderer}" "$@"\n')
    fake_dot.chmod(fake_dot.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bindir))
    assert net_drawer.dot_program() == str(fake_dot)
    png = net_drawer.GetPydotGraphMinimal(small_net()).create_png()
    assert png.startswith(PNG_MAGIC)
    assert marker.read_text().startswith("-Tpng")


def test_no_renderer_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _path_without_dot(tmp_path))
    monkeypatch.setattr(net_drawer.os, "access", lambda path, mode: False)
    with pytest.raises(RuntimeError, match="pip install graphviz-pure"):
        net_drawer.dot_program()
