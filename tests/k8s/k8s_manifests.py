"""Rendering the kustomize overlays, and the parts of objects the policy tests look at."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = ("gpu", "cpu")
WORKLOAD_KINDS = ("Deployment", "Job", "CronJob")


def render(overlay):
    """Return the documents that `kubectl kustomize` renders for one overlay."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl not found: install kubectl (it bundles kustomize) to run tests/k8s")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def pod_template(obj):
    """Return the pod template (metadata + spec) of a Deployment, Job or CronJob."""
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def job_spec(obj):
    """Return the Job spec of a Job or of a CronJob's jobTemplate."""
    return obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]


def all_containers(pod_spec):
    """Return the init containers and the containers of a pod spec."""
    return pod_spec.get("initContainers", []) + pod_spec["containers"]




def by_kind(docs, kind):
    """Return the documents of one kind, keyed by name."""
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}
