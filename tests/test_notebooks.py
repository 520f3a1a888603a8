"""The committed notebooks: no outputs, a parameters cell that agrees with run_all.py's schema."""
import ast
import re
from pathlib import Path

import nbformat
import papermill
import pytest

from mnist_tutorial import runner

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TYPES = {int: "int", float: "float", str: "str"}


def _notebook(step):
    return nbformat.read(str(NOTEBOOKS / runner.NOTEBOOKS[step]), as_version=4)


def test_the_notebooks_are_exactly_the_steps():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(runner.NOTEBOOKS.values())


@pytest.mark.parametrize("step", runner.STEPS)
def test_committed_without_outputs(step):
    nb = _notebook(step)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{step}: a code cell carries outputs"
            assert cell.execution_count is None, f"{step}: a code cell carries an execution count"


@pytest.mark.parametrize("step", runner.STEPS)
def test_layout_markdown_then_parameters_then_thin_code(step):
    nb = _notebook(step)
    assert nb.metadata.kernelspec.name == runner.KERNEL_NAME
    assert nb.cells[0].cell_type == "markdown"
    assert nb.cells[1].cell_type == "code" and "parameters" in nb.cells[1].metadata.get("tags", [])
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in nb.cells[2:]:
        if cell.cell_type == "code":
            # no def or class in a notebook: the logic lives in mnist_tutorial/
            assert not re.search(r"^\s*(def|class)\s", cell.source, re.M), cell.source
            ast.parse(cell.source)


@pytest.mark.parametrize("step", runner.STEPS)
def test_parameters_agree_with_the_schema(step):
    declared = papermill.inspect_notebook(str(NOTEBOOKS / runner.NOTEBOOKS[step]))
    assert "run_dir" in declared
    for name, info in declared.items():
        if name in runner.INJECTED:
            continue
        spec = runner.SCHEMA[name]
        assert not spec.runner_only, f"{name} is runner-only but {step} declares it"
        assert info["inferred_type_name"] == TYPES[spec.type], name
        assert ast.literal_eval(info["default"]) == spec.default, name
        assert info["help"], f"{step}: {name} has no comment"


def test_every_notebook_parameter_of_the_schema_is_declared_somewhere():
    declared = set()
    for step in runner.STEPS:
        declared |= set(papermill.inspect_notebook(str(NOTEBOOKS / runner.NOTEBOOKS[step])))
    wanted = {name for name, spec in runner.SCHEMA.items() if not spec.runner_only}
    assert wanted <= declared, wanted - declared


def test_the_defaults_run_as_is_in_jupyter():
    # The parameters cell alone runs, and its run_dir is relative: steps resolve it under the repo
    namespace = {}
    exec(_notebook("build").cells[1].source, namespace)
    assert namespace["device"] == "auto" and not Path(namespace["run_dir"]).is_absolute()
