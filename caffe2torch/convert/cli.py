"""caffe2torch-convert: a Caffe2 predict net and its weights to ONNX, torch.export (.pt2) or
TorchScript.

Usage::

    caffe2torch-convert --init init_net.pb --predict predict_net.pb --input data:1,3,32,32 \\
        -o model.onnx
    caffe2torch-convert --predictor mnist_model.minidb -o mnist_model.pt2 --dynamic-batch
    python -m caffe2torch.convert --help

Exit status: 0 written, 2 bad input (files, options, a net that cannot be exported).
"""
import argparse
import os
import sys

import caffe2torch
from caffe2torch.convert.module import ExportError, OpError

PROG = "caffe2torch-convert"
SUFFIXES = {".onnx": "onnx", ".pt2": "pt2", ".pt": "torchscript", ".ts": "torchscript",
            ".torchscript": "torchscript"}
DTYPES = ("float32", "float64", "int32", "int64", "uint8", "bool")


class UsageError(ValueError):
    """Bad command-line input; printed as one line, exit status 2."""


def parse_input(text):
    """``name:1,3,32,32[:dtype]`` -> (name, [1, 3, 32, 32], dtype)."""
    name, sep, rest = text.rpartition(":") if text.count(":") >= 1 else ("", "", "")
    dtype = "float32"
    if sep and rest in DTYPES:
        dtype = rest
        name, sep, rest = name.rpartition(":")
    if not sep or not name:
        raise UsageError(f"--input {text!r}: expected NAME:DIMS[:DTYPE], e.g. data:1,3,32,32")
    try:
        dims = [int(d) for d in rest.split(",")] if rest else []
    except ValueError:
        raise UsageError(f"--input {text!r}: dimensions must be integers separated by commas, "
                         "e.g. data:1,3,32,32") from None
    if any(d < 1 for d in dims):
        raise UsageError(f"--input {text!r}: dimensions must be positive")
    return name, dims, dtype


def build_parser():
    """The argument parser of caffe2torch-convert."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert a Caffe2 predict net and its weights to ONNX, "
        "torch.export (.pt2) or TorchScript.",
        epilog="Example: caffe2torch-convert --init init_net.pb --predict predict_net.pb "
        "--input data:1,3,32,32 -o model.onnx")
    source = parser.add_argument_group("the model (one of --init, --init-db, --predictor)")
    source.add_argument("--predict", metavar="PB", help="predict NetDef (binary .pb or text)")
    source.add_argument("--init", metavar="PB", help="init NetDef that fills the parameters")
    source.add_argument("--init-db", metavar="DB", help="minidb/LMDB of the parameters (Save)")
    source.add_argument("--predictor", metavar="DB",
                        help="predictor DB written by predictor_exporter.save_to_db")
    source.add_argument("--db-type", default="minidb", help="type of --init-db/--predictor "
                        "(minidb or lmdb; default minidb)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME:DIMS[:DTYPE]",
                        help="an external input and its example shape, e.g. data:1,3,32,32 "
                        "(repeat for several; default: the shapes the files record)")
    parser.add_argument("--output", action="append", default=[], metavar="BLOB",
                        help="an output blob (repeat; default: the net's external outputs)")
    parser.add_argument("-o", "--out", required=True, metavar="FILE", help="file to write")
    parser.add_argument("--format", choices=("pt2", "onnx", "torchscript"),
                        help="output format (default: from the suffix of -o)")
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="make dimension 0 of every input dynamic (pt2, onnx)")
    parser.add_argument("--no-verify", action="store_true",
                        help="onnx: skip the onnxruntime run against caffe2torch")
    parser.add_argument("--version", action="version", version=f"{PROG} {caffe2torch.__version__}")
    return parser


def _load(args):
    from caffe2torch import convert

    given = [k for k in ("init", "init_db", "predictor") if getattr(args, k)]
    if len(given) != 1:
        raise UsageError("give exactly one of --init, --init-db, --predictor "
                         f"(got {', '.join('--' + g.replace('_', '-') for g in given) or 'none'})")
    if given[0] != "predictor" and not args.predict:
        raise UsageError(f"--{given[0].replace('_', '-')} needs --predict PREDICT_NET.pb")
    if given[0] == "predictor" and args.predict:
        raise UsageError("--predictor holds its predict net; drop --predict")
    for path in (args.predict, args.init, args.init_db, args.predictor):
        if path and not os.path.exists(path):
            raise UsageError(f"{path}: no such file")
    names = [parse_input(t)[0] for t in args.input] or None
    outputs = args.output or None
    if args.predictor:
        return convert.from_predictor_db(args.predictor, args.db_type, names, outputs)
    if args.init_db:
        return convert.from_db(args.predict, args.init_db, args.db_type, names, outputs)
    return convert.from_netdefs(args.init, args.predict, names, outputs)


def _examples(module, specs):
    import torch

    examples = []
    given = {name: (dims, dtype) for name, dims, dtype in map(parse_input, specs)}
    for name in module.input_names:
        if name in given:
            dims, dtype = given[name]
            examples.append(torch.zeros(dims, dtype=getattr(torch, dtype)).uniform_()
                            if dtype.startswith("float") else
                            torch.zeros(dims, dtype=getattr(torch, dtype)))
        elif name in module.input_examples:
            example = module.input_examples[name]
            examples.append(torch.rand(example.shape).to(example.dtype)
                            if example.is_floating_point() else torch.zeros_like(example))
        else:
            raise UsageError(f"the shape of input {name!r} is unknown: give --input "
                             f"{name}:DIMS (e.g. {name}:1,3,32,32)")
    return tuple(examples)


def _shape_text(module, examples):
    return ", ".join(f"{n}[{','.join(map(str, x.shape))}]"
                     for n, x in zip(module.input_names, examples))


def run(args):
    """Convert as ``args`` say; returns the line to print."""
    from caffe2torch import convert

    fmt = args.format or SUFFIXES.get(os.path.splitext(args.out)[1].lower())
    if fmt is None:
        raise UsageError(f"-o {args.out}: cannot tell the format from the suffix; give --format "
                         "pt2, onnx or torchscript")
    if args.dynamic_batch and fmt == "torchscript":
        raise UsageError("--dynamic-batch needs --format pt2 or onnx (TorchScript is traced at "
                         "fixed shapes)")
    module = _load(args)
    examples = _examples(module, args.input)
    convert.check_exportable(module)
    what = f"{_shape_text(module, examples)} -> {', '.join(module.output_names)}"
    try:
        return _write(args, fmt, module, examples, what)
    except OpError as exc:
        given = {parse_input(t)[0] for t in args.input}
        guessed = [n for n in module.input_names if n not in given]
        hint = (f" (the example shape of {', '.join(guessed)} came from the files: give "
                f"--input {guessed[0]}:DIMS)" if guessed else "")
        raise UsageError(f"{exc}{hint}") from exc


def _write(args, fmt, module, examples, what):
    from caffe2torch import convert

    if fmt == "pt2":
        convert.save_pt2(convert.export_program(module, examples, args.dynamic_batch), args.out)
        return f"wrote {args.out} (pt2; {what})"
    if fmt == "torchscript":
        convert.export_torchscript(module, examples, args.out)
        return f"wrote {args.out} (torchscript; {what})"
    report = convert.export_onnx(module, examples, args.out, args.dynamic_batch,
                                 verify=not args.no_verify)
    check = ("not run in onnxruntime" if report.max_abs_diff is None else
             f"onnxruntime matches caffe2torch, max abs diff {report.max_abs_diff:.3g}")
    return f"wrote {args.out} (onnx, checked; {what}; {check})"


def main(argv=None):
    """Run caffe2torch-convert with ``argv`` (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 2
    from caffe2torch.ops.registry import UnknownOperatorError
    try:
        print(run(args))
    except (UsageError, ExportError, OpError, UnknownOperatorError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
