"""Get a Caffe2 model out: a predict NetDef and its parameters as a ``torch.nn.Module``, a
``torch.export`` program (``.pt2``), ONNX (checked by ``onnx.checker`` and onnxruntime) or
TorchScript. See docs/export.md; the command is ``caffe2torch-convert``
(:mod:`caffe2torch.convert.cli`).

Example::

    from caffe2torch import convert
    module = convert.from_predictor_db("mnist_model.minidb")
    report = convert.export_onnx(module, (torch.zeros(1, 1, 28, 28),), "mnist_model.onnx")
"""
from caffe2torch.convert.export import (FORMATS, OnnxReport, check_exportable, export_onnx,
                                        export_predictor, export_program, export_torchscript,
                                        run_onnxruntime, save_pt2, untraceable_reason)
from caffe2torch.convert.load import (from_db, from_netdefs, from_predictor_db, read_netdef,
                                      read_predictor)
from caffe2torch.convert.module import (ExportError, NetModule, OpError, cpu_net,
                                        training_reason)

__all__ = ["FORMATS", "ExportError", "NetModule", "OnnxReport", "OpError", "check_exportable",
           "cpu_net", "export_onnx", "export_predictor", "export_program", "export_torchscript",
           "from_db", "from_netdefs", "from_predictor_db", "read_netdef", "read_predictor",
           "run_onnxruntime", "save_pt2", "training_reason", "untraceable_reason"]
