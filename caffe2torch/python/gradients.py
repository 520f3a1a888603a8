"""Builds the backward pass of a list of OperatorDefs (Caffe2's GradientRegistry + IR, simplified).

Blobs are tracked in SSA form (name, version) so in-place ops (``Relu(x, x)``) work. Walking the ops
backwards, each op's registered gradient maker turns the gradients of its outputs into gradient ops
and the gradients of its inputs. When several ops contribute a gradient to the same blob version,
the contributions are renamed ``_<g>_autosplit_<k>`` and summed into ``<g>`` (Caffe2's naming).
"""
from collections import defaultdict

from caffe2torch.ops import registry
from caffe2torch.proto import caffe2_pb2


def backward_pass(ops, ys, create_operator, versioned=None):
    """Gradient ops for ``ops`` given ``ys`` ({name: grad name or None}); returns (ops, grad map).

    ``versioned``: a dict that receives {(name, version): gradient name}, version 0 being the
    value a blob had before the first op (what control-flow gradients need).

    A None gradient name means "start from 1": a ``ConstantFill([y], [y + '_autogen_grad'],
    value=1.0)`` is emitted first, as Caffe2 does. ``create_operator`` builds that op (so the
    current device scope applies).
    """
    versions = defaultdict(int)
    in_versions, out_versions = [], []
    first_consumer = {}
    for i, op in enumerate(ops):
        ins = [(n, versions[n]) for n in op.input]
        for key in ins:
            first_consumer.setdefault(key, i)
        in_versions.append(ins)
        for n in op.output:
            versions[n] += 1
        out_versions.append([(n, versions[n]) for n in op.output])

    grad_ops = []
    grads = {}  # (name, version) -> gradient blob name
    for y, g in ys.items():
        name = str(y)
        if g is None:
            # y as given, as Caffe2: a BlobReference is used as is (a str gets the name scope)
            fill = create_operator("ConstantFill", [y], [name + "_autogen_grad"], value=1.0)
            grad_ops.append(fill)
            g = fill.output[0]
        grads[(name, versions[name])] = str(g)

    pending = defaultdict(list)  # (name, version) -> [(grad name, ops that write it)]
    by_consumer = defaultdict(list)
    for key, i in first_consumer.items():
        by_consumer[i].append(key)

    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        g_output = [grads.get(key) for key in out_versions[i]]
        if any(g is not None for g in g_output):
            schema = registry.get_schema(op.type)
            if schema.gradient == registry.NO_GRADIENT:
                pass
            elif schema.gradient is None:
                raise NotImplementedError(
                    f"operator {op.type} (op #{i}, outputs {list(op.output)}) has no gradient in "
                    "caffe2torch; put a StopGradient before it or leave it out of the loss path")
            else:
                new_ops, g_input = schema.gradient(op, g_output)
                grad_ops.extend(new_ops)
                for key, g in zip(in_versions[i], g_input):
                    if g is not None:
                        names = _names(g)
                        writers = [o for o in new_ops if any(n in o.output for n in names)]
                        pending[key].append((g, writers))
        for key in by_consumer.get(i, ()):
            contributions = pending.pop(key, None)
            if contributions and key in grads:
                # A blob of ``ys`` that later ops also read: its given gradient adds to theirs.
                contributions.append((grads[key], []))
            if contributions:
                grads[key] = _merge(key[0], contributions, grad_ops)
    if versioned is not None:
        versioned.update(grads)
    grad_map = {}
    for (name, _version), g in sorted(grads.items(), key=lambda kv: -kv[0][1]):
        grad_map[name] = g
    return grad_ops, grad_map


def _names(g):
    """The blob names of a gradient: one name, or a GradientSlice's indices and values."""
    return [str(g.indices), str(g.values)] if _is_slice(g) else [str(g)]


def _is_slice(g):
    return hasattr(g, "indices") and hasattr(g, "values")


def _merge(name, contributions, grad_ops):
    """One gradient name for a blob version; several contributions are renamed and summed.

    A contribution that no gradient op writes (a pass-through, e.g. Sum's gradient is dY itself)
    keeps its name; the total goes to the first written contribution's name, else ``<name>_grad``.
    A sparse contribution (GradientSlice) stays sparse alone; summed with others it is made
    dense first (SparseToDense over the blob's rows), as Caffe2 sums mixed gradients densely.
    """
    if len(contributions) == 1:
        return contributions[0][0]
    if any(_is_slice(g) for g, _ in contributions):
        dense = []
        for k, (g, writers) in enumerate(contributions):
            if _is_slice(g):
                out = f"{name}_grad_densified_{k}"
                grad_ops.append(caffe2_pb2.OperatorDef(
                    type="SparseToDense", name="", input=[str(g.indices), str(g.values), name],
                    output=[out]))
                g, writers = out, []
            dense.append((g, writers))
        contributions = dense
    written = [g for g, writers in contributions if writers]
    target = written[0] if written else registry.grad_name(name)
    parts = []
    for k, (g, writers) in enumerate(contributions):
        if not writers:
            parts.append(g)
            continue
        part = f"_{g}_autosplit_{k}"
        for w in writers:
            for j, out in enumerate(w.output):
                if out == g:
                    w.output[j] = part
        parts.append(part)
    total = caffe2_pb2.OperatorDef(type="Sum", name="", input=parts, output=[target])
    first = contributions[0][1]
    if first and first[0].HasField("device_option"):
        total.device_option.CopyFrom(first[0].device_option)
    grad_ops.append(total)
    return target
