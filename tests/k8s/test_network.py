"""Who may reach Jupyter (issue 11, case 14): its namespace and `kubectl port-forward` only."""
import shutil
import subprocess

import yaml

from k8s_manifests import DEPLOY, OVERLAYS, by_kind, pod_template

# The commented example in each overlay's kustomization.yaml that admits one more namespace.
EXAMPLE_START = "# - target: {kind: NetworkPolicy, name: jupyter-ingress}"


def jupyter_ingress_rules(docs):
    """The ingress rules of every NetworkPolicy that selects Jupyter's pods."""
    labels = pod_template(by_kind(docs, "Deployment")["jupyter"])["metadata"]["labels"]
    rules = []
    for policy in by_kind(docs, "NetworkPolicy").values():
        selected = policy["spec"]["podSelector"].get("matchLabels", {})
        if selected.items() <= labels.items():
            rules += policy["spec"].get("ingress", [])
    return rules


def test_jupyter_takes_connections_only_from_pods_of_its_own_namespace(docs):
    # An ingress rule without `from` admits every pod of every namespace (and whatever the
    # network routes to the pod). A peer that is a podSelector alone means pods of the policy's
    # own namespace. `kubectl port-forward` enters through the kubelet inside the pod's network
    # namespace, which NetworkPolicies do not filter, so it keeps working.
    rules = jupyter_ingress_rules(docs)
    assert rules
    for rule in rules:
        assert rule.get("from"), "a Jupyter ingress rule without `from` admits every namespace"
        assert rule["from"] == [{"podSelector": {}}], rule["from"]
        assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 8888)]


def overlay_with_example_enabled(overlay, tmp_path):
    """A copy of deploy/ whose overlay has its commented jupyter-ingress example uncommented."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / "overlays" / overlay / "kustomization.yaml"
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == EXAMPLE_START)
    indent = lines[start].index("#")
    end = start
    while end < len(lines) and lines[end].startswith(" " * indent + "# "):
        end += 1
    lines[start:end] = [line[:indent] + line[indent + 2:] for line in lines[start:end]]
    path.write_text("\n".join(lines) + "\n")
    return copy / "overlays" / overlay


def test_each_overlay_documents_how_to_admit_another_namespace(tmp_path):
    for overlay in OVERLAYS:
        out = subprocess.run(["kubectl", "kustomize", str(overlay_with_example_enabled(
            overlay, tmp_path / overlay))], check=True, capture_output=True, text=True).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
        (rule,) = jupyter_ingress_rules(docs)
        assert rule["from"] == [
            {"podSelector": {}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}], overlay
