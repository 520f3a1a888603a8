"""Export a :class:`NetModule` to ``torch.export`` (``.pt2``), ONNX and TorchScript.

Example::

    module = convert.from_netdefs("init_net.pb", "predict_net.pb")
    x = torch.randn(1, 3, 32, 32)
    program = convert.export_program(module, (x,), dynamic_batch=True)
    convert.save_pt2(program, "model.pt2")
    report = convert.export_onnx(module, (x,), "model.onnx", dynamic_batch=True)
    report.max_abs_diff        # onnxruntime vs caffe2torch on ``x`` (None without onnxruntime)
"""
import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings

import numpy as np
import torch

from caffe2torch.convert.module import ExportError, OpError, describe
from caffe2torch.ops import registry
from caffe2torch.python import utils

FORMATS = ("pt2", "onnx", "torchscript")


def untraceable_reason(op):
    """Why torch.export cannot trace this OperatorDef (its schema, or its arguments), or None."""
    reason = registry.get_schema(op.type).untraceable_reason
    if reason is not None:
        return reason
    args = utils.ArgsToDict(op.arg)
    if args.get("input_as_shape"):
        return "input_as_shape=1 makes its output sizes depend on the input values (data-dependent)"
    if op.type == "ConstantFill" and args.get("dtype") == 8:  # TensorProto.STRING
        return "it makes a string tensor, which torch cannot hold"
    if op.type == "Reshape" and len(op.input) > 1:
        return ("its shape comes from input new_shape, so its output sizes depend on the input "
                "values (data-dependent); give the shape as argument 'shape'")
    if op.type == "RoIAlign" and args.get("sampling_ratio", -1) <= 0:
        return ("an adaptive sampling_ratio (<= 0) sizes its sampling grid from the RoI values "
                "(data-dependent); set sampling_ratio > 0")
    return None


@contextlib.contextmanager
def _quiet_torch():
    """Hide torch's own notices that say nothing about the user's net (torchvision, pytree)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                                    category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def check_exportable(module):
    """Raise ExportError naming the first op of ``module``'s net that torch.export cannot trace."""
    for i, op in enumerate(module.net.op):
        reason = untraceable_reason(op)
        if reason is not None:
            raise ExportError(f"cannot export {describe(i, op)}: {reason}")


def _batched(example_inputs):
    """Example inputs with a batch of at least 2 (torch.export specializes a size-1 batch)."""
    return tuple(torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x for x in example_inputs)


def _dynamic_shapes(example_inputs):
    batch = torch.export.Dim("batch")
    return (tuple({0: batch} if x.dim() else None for x in example_inputs),)


def export_program(module, example_inputs, dynamic_batch=False):
    """The ``torch.export.ExportedProgram`` of ``module``; a dynamic dim 0 on request."""
    check_exportable(module)
    try:
        with _quiet_torch():
            return _export(module, tuple(example_inputs), dynamic_batch)
    except OpError as exc:
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
        if isinstance(exc.__cause__, GuardOnDataDependentSymNode):
            raise ExportError(f"cannot export {exc.op_text}: it reads input values in Python "
                              "(data-dependent), which torch.export cannot trace; add it to "
                              "caffe2torch.ops.registry.NOT_TRACEABLE") from exc
        raise


def _export(module, example_inputs, dynamic_batch):
    if dynamic_batch:
        shapes = {x.shape[0] for x in example_inputs if x.dim()}
        if len(shapes) > 1:
            raise ExportError(f"--dynamic-batch needs one batch size for all inputs, got "
                              f"{sorted(shapes)} for {module.input_names}")
        return torch.export.export(module, _batched(example_inputs),
                                   dynamic_shapes=_dynamic_shapes(example_inputs))
    return torch.export.export(module, example_inputs)


def _replace(path, write, suffix):
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pt2(program, path):
    """Write ``program`` to ``path`` (``torch.export.save``); load it with ``torch.export.load``."""
    _replace(path, lambda tmp: torch.export.save(program, tmp), ".pt2")


def _outputs_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


@dataclasses.dataclass
class OnnxReport:
    """What export_onnx wrote and checked."""

    path: str
    input_names: list
    output_names: list
    checked: bool  # onnx.checker passed
    max_abs_diff: float = None  # onnxruntime vs the module on the example; None without onnxruntime


def _rename_initializers(model, names):
    """Give ONNX initializers their Caffe2 blob names (``names``: torch name -> blob name)."""
    graph = model.graph
    taken = {v for node in graph.node for v in list(node.input) + list(node.output)}
    taken |= {v.name for v in graph.input} | {v.name for v in graph.output}
    rename = {}
    for init in graph.initializer:
        blob = names.get(init.name)
        if blob and blob != init.name and blob not in taken:
            rename[init.name] = blob
            taken.add(blob)
    for init in graph.initializer:
        init.name = rename.get(init.name, init.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for value in list(graph.input) + list(graph.value_info):
        value.name = rename.get(value.name, value.name)


def run_onnxruntime(path, input_names, example_inputs):
    """onnxruntime's outputs (numpy) for ``example_inputs`` (tensors or arrays) on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {n: x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
             for n, x in zip(input_names, example_inputs)}
    return session.run(None, feeds)


def export_onnx(module, example_inputs, path, dynamic_batch=False, program=None, verify=True,
                rtol=1e-4, atol=1e-5):
    """Write ``module`` as ONNX to ``path`` (inputs, outputs and initializers keep Caffe2 names).

    The model passes ``onnx.checker``; with ``verify`` and onnxruntime installed it runs once on
    ``example_inputs`` and must match the module within ``rtol``/``atol`` (else ExportError).
    ``program``: an ExportedProgram of ``module`` to reuse (saves a second trace).
    """
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) translates with it)
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the packages onnx and onnxscript ({exc}); install "
                          "them, e.g. pip install onnx onnxscript onnxruntime") from None
    example_inputs = tuple(example_inputs)
    if program is None:
        program = export_program(module, example_inputs, dynamic_batch)
    with _quiet_torch():
        onnx_program = torch.onnx.export(program, _batched(example_inputs) if dynamic_batch
                                         else example_inputs, dynamo=True, verbose=False,
                                         input_names=module.input_names,
                                         output_names=module.output_names)
    model = onnx_program.model_proto
    _rename_initializers(model, module.blob_names)
    model.producer_name = "caffe2torch"

    def write(tmp):
        onnx.save(model, tmp)
        onnx.checker.check_model(tmp, full_check=True)

    _replace(path, write, ".onnx")
    report = OnnxReport(str(path), [i.name for i in model.graph.input],
                        [o.name for o in model.graph.output], True)
    if verify:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return report
        got = run_onnxruntime(str(path), report.input_names, example_inputs)
        with torch.no_grad():
            want = [t.numpy() for t in _outputs_list(module(*example_inputs))]
        report.max_abs_diff = max(float(np.abs(g - w).max()) if g.size else 0.0
                                  for g, w in zip(got, want))
        for name, g, w in zip(report.output_names, got, want):
            if g.shape != w.shape or not np.allclose(g, w, rtol=rtol, atol=atol):
                raise ExportError(f"{path}: onnxruntime's output {name!r} differs from "
                                  f"caffe2torch's (max abs diff {report.max_abs_diff:.3g}, "
                                  f"shapes {g.shape} vs {w.shape})")
    return report


def export_torchscript(module, example_inputs, path):
    """Write ``module`` traced as TorchScript to ``path`` (load it with ``torch.jit.load``)."""
    check_exportable(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        with torch.no_grad():
            traced = torch.jit.trace(module, tuple(example_inputs), check_trace=False)
        _replace(path, lambda tmp: torch.jit.save(traced, tmp), ".pt")
    return traced


def export_predictor(path, example_inputs=None, formats=("onnx", "pt2"), db_type="minidb",
                     dynamic_batch=True):
    """Write ``<name>.onnx`` / ``<name>.pt2`` beside the predictor DB ``path``; returns a dict.

    ``example_inputs`` default to zeros of the shapes the predictor was saved with. The dict
    holds ``module`` (the NetModule), ``example_inputs``, and per format the path written
    (``"onnx"`` gives the :class:`OnnxReport`).
    """
    from caffe2torch.convert.load import from_predictor_db

    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export formats {unknown}; choose from {list(FORMATS)}")
    module = from_predictor_db(str(path), db_type)
    if example_inputs is None:
        missing = [n for n in module.input_names if n not in module.input_examples]
        if missing:
            raise ExportError(f"{path}: the shape of input {missing[0]!r} is not recorded; pass "
                              "example_inputs")
        example_inputs = tuple(module.input_examples[n] for n in module.input_names)
    example_inputs = tuple(torch.as_tensor(x) for x in example_inputs)
    stem = os.path.splitext(str(path))[0]
    result = {"module": module, "example_inputs": example_inputs}
    program = None
    if "pt2" in formats or "onnx" in formats:
        program = export_program(module, example_inputs, dynamic_batch)
    if "pt2" in formats:
        save_pt2(program, stem + ".pt2")
        result["pt2"] = stem + ".pt2"
    if "onnx" in formats:
        result["onnx"] = export_onnx(module, example_inputs, stem + ".onnx", dynamic_batch,
                                     program=program)
    if "torchscript" in formats:
        export_torchscript(module, example_inputs, stem + ".pt")
        result["torchscript"] = stem + ".pt"
    return result
