"""What the schemas can't see: Jupyter, the Job and CronJob, GPUs, references, network policy."""
import re
import zoneinfo

import pytest
import yaml

from k8s_manifests import (DEPLOY, REPO, all_containers, by_kind, job_spec, pod_template)


def jupyter(docs):
    return by_kind(docs, "Deployment")["jupyter"]


def batch(docs):
    """The Job and the CronJob: the two ways a pipeline run starts."""
    return [by_kind(docs, "Job")["pipeline-run"], by_kind(docs, "CronJob")["pipeline"]]


def test_service_maps_port_80_to_jupyters_8888_inside_the_cluster(docs):
    service = by_kind(docs, "Service")["jupyter"]
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    template = pod_template(jupyter(docs))
    (container,) = template["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get(port["targetPort"], port["targetPort"]) == 8888
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()


def test_jupyter_runs_the_server_with_a_token_from_a_secret_probes_and_culling(docs):
    deployment = jupyter(docs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # RWO volumes
    (c,) = pod_template(deployment)["spec"]["containers"]
    assert c["command"][0] == "jupyter"
    args = dict(a.lstrip("-").split("=", 1) for a in c["args"])
    assert args["ServerApp.port"] == "8888" and args["ServerApp.ip"] == "0.0.0.0"
    assert int(args["MappingKernelManager.cull_idle_timeout"]) > 0
    assert int(args["MappingKernelManager.cull_interval"]) > 0
    assert args["MappingKernelManager.cull_connected"] == "True"
    env = {e["name"]: e for e in c["env"]}
    assert env["JUPYTER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "jupyter-token",
                                                                 "key": "token"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/api", "port": "http"}, probe


def test_job_and_cronjob_run_the_same_pod_template(docs):
    job, cron = batch(docs)
    assert pod_template(job) == pod_template(cron)
    assert {k: v for k, v in job_spec(job).items() if k != "template"} == \
        {k: v for k, v in job_spec(cron).items() if k != "template"}


def test_batch_runs_fail_fast_and_end(docs):
    for obj in batch(docs):
        spec = job_spec(obj)
        assert pod_template(obj)["spec"]["restartPolicy"] == "Never"
        assert 0 <= spec["backoffLimit"] <= 3
        assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
        assert spec["ttlSecondsAfterFinished"] > 0
        rules = spec["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert fail and set(fail[0]["onExitCodes"]["values"]) == {1, 2}  # run_all.py's codes
        assert fail[0]["onExitCodes"]["operator"] == "In"
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore[0]["onPodConditions"][0]["type"] == "DisruptionTarget"


def test_cronjob_forbids_overlap_keeps_history_and_has_a_deadline_and_time_zone(docs):
    cron = by_kind(docs, "CronJob")["pipeline"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["startingDeadlineSeconds"] > 0
    assert 1 <= cron["successfulJobsHistoryLimit"] <= 10
    assert 1 <= cron["failedJobsHistoryLimit"] <= 10
    zoneinfo.ZoneInfo(cron["timeZone"])  # raises for an unknown zone
    assert len(cron["schedule"].split()) == 5


def test_batch_runs_read_params_from_the_configmap_and_write_to_the_outputs_volume(docs):
    configmaps = by_kind(docs, "ConfigMap")
    for obj in batch(docs):
        spec = pod_template(obj)["spec"]
        (c,) = spec["containers"]
        assert c["command"] == ["python", "run_all.py"]
        args = c["args"]
        files = [args[i + 1] for i, a in enumerate(args) if a == "-f"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        # the last params file is the ConfigMap's, so the cluster's settings win
        folder, _, key = files[-1].rpartition("/")
        assert key in configmaps[volumes[mounts[folder]]["configMap"]["name"]]["data"]
        for path in files[:-1]:
            assert (REPO / path).is_file(), path  # shipped in the image from params/
        outputs = args[args.index("--outputs") + 1]
        assert volumes[mounts[outputs]]["persistentVolumeClaim"]["claimName"] == "outputs"
        # no fixed --run-id: every run gets its own folder next to the shared history
        assert "--run-id" not in args


def test_configmap_params_are_valid_pipeline_parameters(docs, tmp_path):
    from pipeline import params as pipeline_params

    (cm,) = by_kind(docs, "ConfigMap").values()
    path = tmp_path / "params.yaml"
    path.write_text(cm["data"]["params.yaml"])
    # raises UsageError for a bad name or value
    params = pipeline_params.resolve([(str(path), pipeline_params.load_file(path))])
    data_mount = "/data"
    assert params["data_dir"] == data_mount
    for obj in batch(docs):
        (c,) = pod_template(obj)["spec"]["containers"]
        assert data_mount in {m["mountPath"] for m in c["volumeMounts"]}


def test_gpu_overlay_asks_for_one_gpu_in_limits_with_the_toleration(rendered):
    docs = rendered["gpu"]
    gpu_pods = [jupyter(docs)] + batch(docs)
    selectors = set()
    for obj in gpu_pods:
        spec = pod_template(obj)["spec"]
        (c,) = spec["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        requested = c["resources"].get("requests", {}).get("nvidia.com/gpu")
        assert requested in (None, 1)  # requests, if any, equal limits
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            spec["tolerations"]
        assert spec["nodeSelector"]
        selectors.add(yaml.safe_dump(spec["nodeSelector"]))
        assert not any(e["name"] == "NVIDIA_VISIBLE_DEVICES" for e in c.get("env", []))
    assert len(selectors) == 1  # one node selection for all GPU pods
    for obj in batch(docs):
        (c,) = pod_template(obj)["spec"]["containers"]
        assert "params/gpu.yaml" in c["args"]  # device: cuda, fail when no GPU is seen


def test_cpu_overlay_asks_for_no_gpu(rendered):
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(rendered["cpu"])


def test_gpu_appears_only_in_limits_of_main_containers(docs, workloads):
    for obj in workloads:
        spec = pod_template(obj)["spec"]
        for c in spec.get("initContainers", []):
            assert "nvidia.com/gpu" not in yaml.safe_dump(c["resources"]), c["name"]
        for c in spec["containers"]:
            requests = c["resources"].get("requests", {})
            if "nvidia.com/gpu" in requests:
                assert requests["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


def test_shared_memory_is_an_in_memory_emptydir_within_the_memory_limit(workloads):
    for obj in workloads:
        spec = pod_template(obj)["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            empty = volumes[shm["name"]]["emptyDir"]
            assert empty["medium"] == "Memory"
            assert quantity(empty["sizeLimit"]) < quantity(c["resources"]["limits"]["memory"])


def quantity(text):
    """A Kubernetes memory quantity like 512Mi or 8Gi in bytes."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", str(text)).groups()
    return int(number) * 1024 ** (" KMGT".index(unit[0]) if unit else 0)


def test_every_referenced_claim_configmap_and_secret_exists_or_is_documented(docs, workloads):
    defined = {kind: set(by_kind(docs, kind)) for kind in
               ("PersistentVolumeClaim", "ConfigMap", "Secret")}
    readme = (DEPLOY.parent / "README.md").read_text()
    for obj in workloads:
        spec = pod_template(obj)["spec"]
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in defined["PersistentVolumeClaim"]
            if "configMap" in v:
                assert v["configMap"]["name"] in defined["ConfigMap"]
            assert "secret" not in v  # secrets reach pods only through secretKeyRef below
        for c in all_containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["name"] in defined["ConfigMap"]
                if "secretKeyRef" in ref:
                    name = ref["secretKeyRef"]["name"]
                    # A token never lives in the repository: the Secret is created in the
                    # cluster by `make deploy` (k8s-token), and the README shows the command.
                    assert name in defined["Secret"] or \
                        f"create secret generic {name}" in readme, name
                    assert ref["secretKeyRef"].get("optional") is not True, name
            assert not c.get("envFrom"), c["name"]


def test_network_policy_denies_by_default_and_opens_only_dns_jupyter_and_downloads(docs):
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    dns = policies["allow-dns"]["spec"]
    assert {(p["protocol"], p["port"]) for r in dns["egress"] for p in r["ports"]} == \
        {("UDP", 53), ("TCP", 53)}
    jupyter_labels = pod_template(jupyter(docs))["metadata"]["labels"]
    batch_labels = pod_template(batch(docs)[0])["metadata"]["labels"]
    for name, policy in policies.items():
        spec = policy["spec"]
        selected = spec["podSelector"].get("matchLabels", {})
        for rule in spec.get("ingress", []):
            # ingress only to Jupyter, only on its port
            assert selected.items() <= jupyter_labels.items() and selected, name
            assert [(p["protocol"], p["port"]) for p in rule["ports"]] == [("TCP", 8888)], name
        if name not in ("allow-dns",):
            for rule in spec.get("egress", []):
                # egress beyond DNS only for the batch pods' download step, only to the internet
                assert selected and selected.items() <= batch_labels.items(), name
                assert not selected.items() <= jupyter_labels.items(), name
                for peer in rule["to"]:
                    block = peer["ipBlock"]
                    assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(block["except"]), name
                assert {p["port"] for p in rule["ports"]} <= {80, 443}, name


def test_labels_are_recommended_ones_set_with_labels_not_commonlabels(docs):
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "caffe2torch", doc["metadata"]["name"]
        assert labels["app.kubernetes.io/part-of"] == "caffe2torch"
    for path in DEPLOY.rglob("kustomization.yaml"):
        assert "commonLabels" not in yaml.safe_load(path.read_text()), path


@pytest.mark.parametrize("path", sorted(p.relative_to(DEPLOY).as_posix() for p in
                                        (DEPLOY / "base").glob("*.yaml")
                                        if p.name not in ("kustomization.yaml", "params.yaml")))
def test_base_files_are_named_after_the_kind_they_hold(path):
    kinds = {d["kind"].lower() for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d}
    assert kinds == {path.rsplit("/", 1)[-1].removesuffix(".yaml")}


def test_the_tutorials_template_is_all_there_without_privileged(rendered):
    # The tutorial's pod: a Jupyter server with one GPU, the GPU toleration, privileged; its
    # Service: port 80 to 8888. The gpu overlay (the default) keeps all of it but privileged.
    docs = rendered["gpu"]
    service = by_kind(docs, "Service")["jupyter"]["spec"]["ports"][0]
    spec = pod_template(jupyter(docs))["spec"]
    (c,) = spec["containers"]
    assert (service["port"], c["ports"][0]["containerPort"]) == (80, 8888)
    assert c["command"] == ["jupyter", "lab"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert "privileged" not in yaml.safe_dump(spec)
