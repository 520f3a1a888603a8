"""The committed notebooks: no outputs, a parameters cell the pipeline can read."""
import ast
import re
from pathlib import Path

import nbformat
import papermill
import pytest

from pipeline import params

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _notebook(step):
    return nbformat.read(str(NOTEBOOKS / params.notebook_path(step).name), as_version=4)


def test_the_notebooks_are_exactly_the_steps():
    names = sorted(params.notebook_path(s).name for s in params.STEPS)
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == names


@pytest.mark.parametrize("step", params.STEPS)
def test_committed_without_outputs(step):
    nb = _notebook(step)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{step}: a code cell carries outputs"
            assert cell.execution_count is None, f"{step}: a code cell carries an execution count"


@pytest.mark.parametrize("step", params.STEPS)
def test_layout_markdown_then_parameters_then_thin_code(step):
    nb = _notebook(step)
    assert nb.metadata.kernelspec.name == "caffe2torch"
    assert nb.cells[0].cell_type == "markdown"
    assert nb.cells[1].cell_type == "code" and "parameters" in nb.cells[1].metadata.get("tags", [])
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in nb.cells[2:]:
        if cell.cell_type == "code":
            # no def or class in a notebook: the logic lives in mnist_tutorial/
            assert not re.search(r"^\s*(def|class)\s", cell.source, re.M), cell.source
            ast.parse(cell.source)


@pytest.mark.parametrize("step", params.STEPS)
def test_parameters_are_typed_literals_with_help(step):
    declared = papermill.inspect_notebook(str(NOTEBOOKS / params.notebook_path(step).name))
    assert "run_dir" in declared
    schema = params.schema()  # the pipeline's schema is read from these cells
    for name, info in declared.items():
        if name in params.INJECTED:
            continue
        assert info["inferred_type_name"] == schema[name].type.__name__, name
        assert ast.literal_eval(info["default"]) == schema[name].default, name
        assert info["help"], f"{step}: {name} has no comment"


def test_the_defaults_run_as_is_in_jupyter():
    # The parameters cell alone runs, and its run_dir is relative: steps resolve it under the repo
    namespace = {}
    exec(_notebook("build").cells[1].source, namespace)
    assert namespace["device"] == "auto" and not Path(namespace["run_dir"]).is_absolute()
