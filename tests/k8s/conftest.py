"""Renders the kustomize overlays once per session for the policy tests."""
import pytest

from k8s_manifests import OVERLAYS, WORKLOAD_KINDS, render


@pytest.fixture(scope="session")
def rendered():
    """Map each overlay's name to its rendered documents."""
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session", params=OVERLAYS)
def docs(request, rendered):
    """The rendered documents of one overlay (each test runs for every overlay)."""
    return rendered[request.param]


@pytest.fixture(scope="session")
def workloads(docs):
    """The Deployments, Jobs and CronJobs of one overlay."""
    found = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert {d["kind"] for d in found} == set(WORKLOAD_KINDS)
    return found

