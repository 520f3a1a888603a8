#!/usr/bin/env python3
"""``make k8s-smoke``: build the image without a registry and run the batch Job's pod in podman.

1. base image: a Debian root file system made by mmdebstrap and imported into podman (no
   registry is reachable, so nothing can be pulled); cached in podman's image store;
2. ``deploy/Dockerfile`` built FROM it with podman, torch from a local CPU wheel directory;
3. the cpu overlay rendered with kustomize; the Job's pod template lifted into a Pod (``podman
   kube play`` runs Pods, not Jobs), its ConfigMap given params/smoke.yaml, its PVCs made podman
   volumes; names get a ``c2t-smoke-`` prefix so that nothing of the user's is touched;
4. ``podman kube play --network=none``: the run must succeed offline, as uid 10001, on a
   read-only root file system; then the executed notebooks, their HTML, run.json and the run
   history on the outputs volume are checked;
5. Jupyter's Deployment played the same way with a throwaway token: /api answers, and the
   contents API wants the token.

Run it as root on a Linux machine with podman, runc and mmdebstrap (see the README). Set
SMOKE_KEEP=1 to keep the pods and volumes for a look afterwards.
"""
import base64
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import nbformat
import yaml

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "build" / "k8s-smoke"
PREFIX = "c2t-smoke-"
BASE_IMAGE = "localhost/caffe2torch-smoke-base"
IMAGE = "localhost/caffe2torch:smoke"
WHEELS = os.environ.get("SMOKE_WHEELS", "/opt/wheels")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
STEPS = ("01_download", "02_build", "03_train", "04_test", "05_export")
# podman's defaults fail on these machines: crun on rlimits and hybrid cgroups (see K8S_NOTES).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


class SmokeError(Exception):
    """A failed smoke step: the message says what and where to look."""


def sh(*cmd, log=None, check=True, **kw):
    """Run a command; with ``log`` its output goes to that file, else it is returned."""
    if log is not None:
        with open(log, "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, **kw)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        detail = Path(log).read_text()[-3000:] if log else (proc.stdout + proc.stderr)[-3000:]
        raise SmokeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{detail}")
    return proc


def require_tools():
    """Fail with the install command when a tool is missing."""
    missing = [t for t in ("podman", "runc", "mmdebstrap", "kubectl") if not shutil.which(t)]
    if missing:
        raise SmokeError(f"missing {', '.join(missing)}: apt-get install podman buildah runc "
                         "mmdebstrap (kubectl: see the README)")
    if not Path(WHEELS).is_dir() or not list(Path(WHEELS).glob("torch-*.whl")):
        raise SmokeError(f"no torch wheel in {WHEELS}: set SMOKE_WHEELS to a folder holding the "
                         "CPU wheel of the torch version constraints.txt pins")


def host_python():
    """The CPython install (prefix, version) that runs this script when it can be copied in.

    Debian 12's own python3 is 3.11.2, older than constraints.txt allows (soupsieve 4.1.3 wants
    >= 3.11.5 and misparses CSS on 3.11.2, which breaks nbconvert's HTML). The interpreter that
    made .venv satisfies the pins by construction, so the base image carries a copy of it under
    /usr/local, the way the python:3.11-slim images lay theirs out.
    """
    prefix = Path(sys.base_prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if prefix == Path("/usr") or not (prefix / "bin" / f"python{version}").exists():
        return None, None
    return prefix, version


def make_base_image():
    """Import a minimal Debian with Python as the base image, once; return its name."""
    prefix, version = host_python()
    tag = f"bookworm-py{sys.version.split()[0]}" if prefix else "bookworm"
    image = f"{BASE_IMAGE}:{tag}"
    if sh("podman", "image", "exists", image, check=False).returncode == 0:
        return image, "cached"
    if prefix:
        # The shared libraries that CPython's extension modules link against.
        packages = ("ca-certificates,libbz2-1.0,libexpat1,libffi8,libgdbm6,liblzma5,libncursesw6,"
                    "libnsl2,libreadline8,libsqlite3-0,libssl3,libuuid1,zlib1g")
        lib = f"lib/python{version}"
        copy = (f'tar -C {prefix} --exclude=./{lib}/site-packages --exclude=./{lib}/test '
                f'-cf - ./bin/python{version} ./lib | tar -C "$1/usr/local" -xf - '
                f'&& mkdir -p "$1/usr/local/{lib}/site-packages" '
                f'&& ln -s python{version} "$1/usr/local/bin/python3" && chroot "$1" ldconfig')
        hooks = [f"--customize-hook={copy}"]
    else:
        packages, hooks = "python3,python3-venv,ca-certificates", []
    tmp = WORK / "rootfs.tmp.tar"
    # --skip=output/dev: no device nodes, like a registry image, so that podman creates the
    # emptyDir mount points (/dev/shm) owned by the pod's user.
    sh("mmdebstrap", "--variant=minbase", "--skip=output/dev", f"--include={packages}", *hooks,
       "bookworm", str(tmp), log=WORK / "mmdebstrap.log")
    sh("podman", "import", "--change",
       "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", str(tmp), image)
    tmp.unlink()
    return image, "built"


def build_image(base):
    """Build deploy/Dockerfile FROM the local base; podman's layer cache makes reruns quick."""
    pip_args = f"--find-links {WHEELS} --cert {CA_BUNDLE}"
    sh("podman", "build", "--layers", "--network=host", "-f", "deploy/Dockerfile",
       "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"PIP_EXTRA_ARGS={pip_args}",
       "-v", f"{WHEELS}:{WHEELS}:ro", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
       "-t", IMAGE, ".", cwd=REPO, log=WORK / "build.log")


def dev_distributions():
    """The names of pyproject.toml's dev extra: the tools the image must not carry."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [req.split(">")[0].split("=")[0].split("[")[0].strip()
             for req in project["optional-dependencies"]["dev"]]
    return [n for n in names if n != project["name"]]  # dev also names the project's own extras


# Run in the image: which dev distributions and commands it holds, and what the installed
# package and its command say when started outside /app.
IMAGE_PROBE = """\
import importlib.metadata, json, os, shutil, subprocess, sys
dists = [d for d in sys.argv[1:] if d != "setuptools"]
found = []
for name in dists:
    try:
        found.append(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        pass
commands = [c for c in ("pytest", "ruff", "nbqa", "yamllint", "hadolint", "kubernetes-validate",
                        "twine", "checkov") if shutil.which(c)]
import caffe2torch
version = subprocess.run(["make_mnist_db", "--version"], capture_output=True, text=True).stdout
print(json.dumps({"dists": found, "commands": commands, "caffe2torch": caffe2torch.__file__,
                  "make_mnist_db": version.strip(), "PYTHONPATH": os.environ.get("PYTHONPATH")}))
"""


def check_image(base):
    """The image holds no test, lint or packaging tool, and imports the installed package.

    Returns the image's size and what it adds to ``base``, in bytes.
    """
    out = sh("podman", "run", "--rm", "--network=none", "--workdir=/tmp", IMAGE, "python", "-c",
             IMAGE_PROBE, *dev_distributions()).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    if seen["dists"] or seen["commands"]:
        raise SmokeError(f"the image carries development tools: {seen['dists']} {seen['commands']}")
    if seen["caffe2torch"] != "/app/caffe2torch/__init__.py" or seen["PYTHONPATH"] \
            or not seen["make_mnist_db"].startswith("make_mnist_db "):
        raise SmokeError(f"the image's installed package or its command is wrong: {seen}")
    sizes = [int(sh("podman", "image", "inspect", "--format", "{{.Size}}", name).stdout)
             for name in (IMAGE, base)]
    return sizes[0], sizes[0] - sizes[1]


def render(overlay):
    """The overlay's objects, keyed by (kind, name)."""
    out = sh("kubectl", "kustomize", str(REPO / "deploy" / "overlays" / overlay)).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}


def as_pod(name, template, objects):
    """A Pod from a pod template, with prefixed names for its pod, volumes and claims."""
    spec = json.loads(json.dumps(template["spec"]))
    for c in spec.get("initContainers", []) + spec["containers"]:
        c["image"] = IMAGE
        for m in c.get("volumeMounts", []):
            m["name"] = PREFIX + m["name"]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                ref["name"] = PREFIX + ref["name"]
    for v in spec["volumes"]:
        v["name"] = PREFIX + v["name"]
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", claim) in objects, claim
            v["persistentVolumeClaim"]["claimName"] = PREFIX + claim
        if "configMap" in v:
            assert ("ConfigMap", v["configMap"]["name"]) in objects, v["configMap"]["name"]
            v["configMap"]["name"] = PREFIX + v["configMap"]["name"]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": PREFIX + name, "labels": template["metadata"]["labels"]},
            "spec": spec}


def renamed(obj):
    """A copy of a PVC, ConfigMap or Secret with the smoke prefix and no namespace."""
    obj = json.loads(json.dumps(obj))
    obj["metadata"] = {"name": PREFIX + obj["metadata"]["name"]}
    return obj


def volume_path(name):
    """Where a podman volume's files are on this machine."""
    return Path(sh("podman", "volume", "inspect", "--format", "{{.Mountpoint}}",
                   PREFIX + name).stdout.strip())


def clean():
    """Remove the smoke's pods, volumes and secrets (all named with the prefix)."""
    for kind in ("pod", "volume", "secret"):
        for name in sh("podman", kind, "ls", "--format", "{{.Name}}").stdout.split():
            if name.startswith(PREFIX):
                sh("podman", kind, "rm", *(["-f"] if kind != "secret" else []), name, check=False)


def play(path, docs):
    """Write a multi-document YAML file and `podman kube play` it without a network."""
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    sh("podman", "kube", "play", "--network=none", str(path))


def wait_for_exit(container, timeout):
    """The container's exit code, or a SmokeError after ``timeout`` seconds."""
    proc = sh("podman", "wait", container, timeout=timeout)
    return int(proc.stdout.strip())


def run_pipeline(objects):
    """Play the Job's pod template under params/smoke.yaml; return the outputs volume's path."""
    job = objects[("Job", "pipeline-run")]
    template = job["spec"]["template"]
    params = renamed(objects[("ConfigMap", "pipeline-params")])
    cluster = yaml.safe_load(params["data"]["params.yaml"])
    smoke = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    params["data"]["params.yaml"] = yaml.safe_dump({**cluster, **smoke}, sort_keys=False)
    claims = [renamed(o) for (k, _), o in objects.items() if k == "PersistentVolumeClaim"]
    pod = as_pod("pipeline", template, objects)
    play(WORK / "pipeline.yaml", claims + [params, pod])
    container = f"{PREFIX}pipeline-pipeline"
    code = wait_for_exit(container, timeout=job["spec"]["activeDeadlineSeconds"])
    logs = sh("podman", "logs", container, check=False)
    (WORK / "pipeline.log").write_text(logs.stdout + logs.stderr)
    if code != 0:
        raise SmokeError(f"the Job's pod exited {code}; its log: {WORK / 'pipeline.log'}\n"
                         + (logs.stdout + logs.stderr)[-3000:])
    return volume_path("outputs")


def check_outputs(outputs):
    """The run's folder holds executed notebooks, HTML and a successful run.json; say which."""
    runs = [p for p in outputs.iterdir() if p.is_dir() and not p.is_symlink()
            and (p / "run.json").exists()]
    if len(runs) != 1:
        found = sorted(p.name for p in runs)
        raise SmokeError(f"expected one run folder in {outputs}, found {found}")
    run_dir = runs[0]
    run = json.loads((run_dir / "run.json").read_text())
    if run.get("status") != "succeeded" or run.get("run_id") != run_dir.name:
        raise SmokeError(f"{run_dir}/run.json: status {run.get('status')!r}, "
                         f"run_id {run.get('run_id')!r}")
    for step in STEPS:
        nb = nbformat.read(run_dir / f"{step}.ipynb", as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        if not code or any(c.execution_count is None for c in code):
            raise SmokeError(f"{run_dir}/{step}.ipynb has cells that did not run")
        errors = [o for c in code for o in c.outputs if o.output_type == "error"]
        if errors:
            raise SmokeError(f"{run_dir}/{step}.ipynb has error outputs: {errors[0].ename}")
        if (run_dir / f"{step}.html").stat().st_size == 0:
            raise SmokeError(f"{run_dir}/{step}.html is empty")
    history = [json.loads(line) for line in (outputs / "runs.jsonl").read_text().splitlines()]
    if [h["run_id"] for h in history] != [run_dir.name]:
        raise SmokeError(f"{outputs}/runs.jsonl does not list exactly this run: {history}")
    if os.readlink(outputs / "latest") != run_dir.name or not (outputs / "index.html").exists():
        raise SmokeError(f"{outputs}: latest or index.html missing")
    owner = (run_dir / "run.json").stat().st_uid
    if owner != 10001:
        raise SmokeError(f"{run_dir}/run.json is owned by uid {owner}, not the pod's 10001")
    return run_dir, run


def check_jupyter(objects):
    """Play Jupyter's Deployment with a throwaway token; /api answers, the contents API wants it."""
    deployment = objects[("Deployment", "jupyter")]
    token = secrets.token_hex(16)
    # podman 4.3 resolves secretKeyRef against a podman secret that holds the Secret's data
    # as JSON, {key: base64 value} (a Secret object in the played YAML does not work there).
    data = {"token": base64.b64encode(token.encode()).decode()}
    sh("podman", "secret", "create", PREFIX + "jupyter-token", "-", input=json.dumps(data))
    # The claims' volumes are the pipeline's, still there: Jupyter sees the run's outputs.
    pod = as_pod("jupyter", deployment["spec"]["template"], objects)
    # podman 4.3 races when it removes a finished init container under load ("cannot remove
    # container ... as it is running"): run each init container to its end first, in a pod of
    # its own with the same spec, as the kubelet runs them one after the other.
    for init in pod["spec"].pop("initContainers", []):
        alone = json.loads(json.dumps(pod))
        alone["metadata"]["name"] = PREFIX + init["name"]
        alone["spec"].update(containers=[init], restartPolicy="Never")
        play(WORK / f"{init['name']}.yaml", [alone])
        if wait_for_exit(f"{PREFIX}{init['name']}-{init['name']}", timeout=300) != 0:
            raise SmokeError(f"Jupyter's init container {init['name']} failed")
        sh("podman", "kube", "down", str(WORK / f"{init['name']}.yaml"))
    # podman maps declared ports to the host, which needs a network; the pod has none here, and
    # the checks below ask from inside it.
    for c in pod["spec"]["containers"]:
        c.pop("ports", None)
    play(WORK / "jupyter.yaml", [pod])
    # podman's network is off: ask from inside the pod, as the kubelet's probe would.
    probe = textwrap.dedent("""\
        import sys, time, urllib.error, urllib.request
        def get(path):
            try:
                return urllib.request.urlopen("http://127.0.0.1:8888" + path, timeout=5).status
            except urllib.error.HTTPError as e:
                return e.code
            except OSError:
                return None
        for _ in range(60):
            if get("/api") == 200:
                break
            time.sleep(1)
        print(get("/api"), get("/api/contents"), get("/api/contents?token=" + sys.argv[1]))
        """)
    out = sh("podman", "exec", f"{PREFIX}jupyter-jupyter", "python", "-c", probe, token).stdout
    codes = out.split()
    if codes != ["200", "403", "200"]:
        logs = sh("podman", "logs", f"{PREFIX}jupyter-jupyter", check=False)
        raise SmokeError(f"Jupyter answered /api, /api/contents without and with the token: "
                         f"{codes} (want 200 403 200)\n{(logs.stdout + logs.stderr)[-2000:]}")
    seeded = volume_path("outputs") / "notebooks"
    if sorted(p.stem for p in seeded.glob("*.ipynb")) != list(STEPS):
        raise SmokeError(f"the seed-notebooks init container did not copy the notebooks: {seeded}")


def main():
    """Run the smoke test; exit 0 when every check passed."""
    WORK.mkdir(parents=True, exist_ok=True)
    conf = WORK / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)
    timings = {}
    start = time.monotonic()
    try:
        require_tools()
        clean()
        t = time.monotonic()
        base, state = make_base_image()
        timings[f"base image {base} ({state})"] = time.monotonic() - t
        t = time.monotonic()
        build_image(base)
        timings["image build"] = time.monotonic() - t
        size, added = check_image(base)
        objects = render("cpu")
        t = time.monotonic()
        outputs = run_pipeline(objects)
        run_dir, run = check_outputs(outputs)
        # A copy of what the pod wrote, to look at after the volumes are gone.
        shutil.rmtree(WORK / "outputs", ignore_errors=True)
        shutil.copytree(outputs, WORK / "outputs", symlinks=True)
        timings["pipeline pod"] = time.monotonic() - t
        sh("podman", "kube", "down", str(WORK / "pipeline.yaml"))
        t = time.monotonic()
        check_jupyter(objects)
        timings["jupyter pod"] = time.monotonic() - t
    except (SmokeError, subprocess.TimeoutExpired) as e:
        print(f"k8s-smoke: FAILED: {e}", file=sys.stderr)
        print("k8s-smoke: 0 passed, 1 failed")
        return 1
    finally:
        if not os.environ.get("SMOKE_KEEP"):
            clean()
    for what, seconds in timings.items():
        print(f"k8s-smoke: {what}: {seconds:.0f} s")
    checked = [d for d in dev_distributions() if d != "setuptools"]  # the editable install's
    print(f"k8s-smoke: image {IMAGE}: {size / 1e6:.0f} MB, of which {added / 1e6:.0f} MB above "
          f"the base image (the venv with torch, the project, graphviz); no dev tool in it "
          f"({', '.join(checked)} checked)")
    print(f"k8s-smoke: run {run_dir.name} succeeded (test_accuracy "
          f"{run.get('metrics', {}).get('test_accuracy')}); notebooks {', '.join(STEPS)}, "
          f"their HTML, run.json, runs.jsonl, index.html and latest checked; copies in "
          f"{WORK / 'outputs'}")
    print(f"k8s-smoke: passed in {time.monotonic() - start:.0f} s")
    print("k8s-smoke: 1 passed, 0 failed")  # the closing line CI reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
