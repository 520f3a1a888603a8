"""Caffe2's ``net_drawer``: a net as a pydot graph, rendered to PNG/SVG with Graphviz's ``dot``.

Op nodes are green boxes labelled ``"<Type> (op#<i>)"``; blob nodes are octagons whose id is the
JSON-quoted name plus a version counter, so an op that rewrites a blob (in-place Relu) gets a
new node. Rendering uses ``dot`` when Graphviz is installed and otherwise the ``graphviz-pure``
program (a self-contained dot renderer from PyPI), so it works on a fresh machine::

    graph = net_drawer.GetPydotGraph(model.net, rankdir="LR")
    display(Image(net_drawer.render(graph)))     # in Jupyter; graph.create_png() works too
"""
import json
import os
import shutil
import sys
import sysconfig
from collections import defaultdict

import pydot

from caffe2torch.proto import caffe2_pb2

OP_STYLE = {"shape": "box", "color": "#0F9D58", "style": "filled", "fontcolor": "#FFFFFF"}
BLOB_STYLE = {"shape": "octagon"}


def dot_program():
    """Path of the renderer: Graphviz's ``dot`` on PATH, else the ``graphviz-pure`` program."""
    found = shutil.which("dot")
    if found:
        return found
    # graphviz-pure installs next to the Python interpreter, which need not be on PATH.
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "graphviz-pure")
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("graphviz-pure")
    if found:
        return found
    raise RuntimeError("no Graphviz renderer found: install graphviz-pure (pip install "
                       "graphviz-pure) or Graphviz itself (apt-get install graphviz)")


class PydotGraph(pydot.Dot):
    """A ``pydot.Dot`` whose ``create_png()``/``create_svg()`` find a renderer (see dot_program)."""

    def create(self, prog=None, format="ps", encoding=None):
        """Render with ``prog``, or with dot_program() while the graph's prog is the default."""
        if prog is None and self.prog == "dot":
            prog = dot_program()
        return super().create(prog=prog, format=format, encoding=encoding)


def render(graph, fmt="png"):
    """The bytes of ``graph`` (any pydot.Dot) rendered as ``fmt`` ("png", "svg", "pdf", ...)."""
    return graph.create(prog=dot_program(), format=fmt)


def _rectify_operator_and_name(operators_or_net, name):
    """The op list and graph name of a NetDef, core.Net or list of OperatorDefs."""
    if isinstance(operators_or_net, caffe2_pb2.NetDef):
        return operators_or_net.op, name if name is not None else operators_or_net.name
    if hasattr(operators_or_net, "Proto"):
        net = operators_or_net.Proto()
        if not isinstance(net, caffe2_pb2.NetDef):
            raise TypeError(f"expected a NetDef from Proto(), got {type(net).__name__}")
        return net.op, name if name is not None else net.name
    return operators_or_net, name if name is not None else "unnamed"


def _escape_label(name):
    # JSON quoting is Caffe2's escaping for blob names with '/', ':' or quotes.
    return json.dumps(name)


def GetOpNodeProducer(append_output, **kwargs):
    """A function (op, op_id) -> op node; ``append_output`` lists the outputs in the label."""
    def really_get_op_node(op, op_id):
        node_name = f"{op.name}/{op.type} (op#{op_id})" if op.name else f"{op.type} (op#{op_id})"
        if append_output:
            for output_name in op.output:
                node_name += "\n" + output_name
        return pydot.Node(node_name, **kwargs)
    return really_get_op_node


def GetPydotGraph(operators_or_net, name=None, rankdir="LR", node_producer=None):
    """A graph of ops (boxes) and blobs (octagons) with edges blob -> op -> blob."""
    if node_producer is None:
        node_producer = GetOpNodeProducer(False, **OP_STYLE)
    operators, name = _rectify_operator_and_name(operators_or_net, name)
    graph = PydotGraph(name, rankdir=rankdir)
    blob_nodes = {}
    versions = defaultdict(int)
    for op_id, op in enumerate(operators):
        op_node = node_producer(op, op_id)
        graph.add_node(op_node)
        for input_name in op.input:
            input_node = blob_nodes.get(input_name)
            if input_node is None:
                input_node = pydot.Node(_escape_label(input_name + str(versions[input_name])),
                                        label=_escape_label(input_name), **BLOB_STYLE)
                blob_nodes[input_name] = input_node
            graph.add_node(input_node)
            graph.add_edge(pydot.Edge(input_node, op_node))
        for output_name in op.output:
            if output_name in blob_nodes:
                versions[output_name] += 1  # a rewrite: the new value is a new node
            output_node = pydot.Node(_escape_label(output_name + str(versions[output_name])),
                                     label=_escape_label(output_name), **BLOB_STYLE)
            blob_nodes[output_name] = output_node
            graph.add_node(output_node)
            graph.add_edge(pydot.Edge(op_node, output_node))
    return graph


def GetPydotGraphMinimal(operators_or_net, name=None, rankdir="LR", minimal_dependency=False,
                         node_producer=None):
    """Ops only, with an edge from the op that produced each input.

    With ``minimal_dependency``, an edge from parent p is dropped when p is already an ancestor
    of another parent (if c needs a and b, and b needs a, only b -> c is drawn).
    """
    if node_producer is None:
        node_producer = GetOpNodeProducer(False, **OP_STYLE)
    operators, name = _rectify_operator_and_name(operators_or_net, name)
    graph = PydotGraph(name, rankdir=rankdir)
    blob_parents = {}
    ancestry = defaultdict(set)  # op node name -> names of all its ancestor op nodes
    nodes = {}
    for op_id, op in enumerate(operators):
        op_node = node_producer(op, op_id)
        key = op_node.get_name()
        nodes[key] = op_node
        graph.add_node(op_node)
        parents = [blob_parents[n] for n in op.input if n in blob_parents]
        ancestry[key].update(parents)
        for parent in parents:
            ancestry[key].update(ancestry[parent])
        for parent in parents:  # an op reading two outputs of one op gets two edges (Caffe2)
            if minimal_dependency and any(parent in ancestry[other] for other in parents):
                continue
            graph.add_edge(pydot.Edge(nodes[parent], op_node))
        for output_name in op.output:
            blob_parents[output_name] = key
    return graph
