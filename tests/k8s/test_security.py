"""Pod Security "restricted" and the rest of the baseline, on every rendered pod template."""
from k8s_manifests import all_containers, by_kind, pod_template

RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted"
              for mode in ("enforce", "warn", "audit")}


def test_every_object_lives_in_the_namespace_with_restricted_pod_security(docs):
    namespaces = by_kind(docs, "Namespace")
    assert list(namespaces) == ["caffe2torch"]
    assert RESTRICTED.items() <= namespaces["caffe2torch"]["metadata"]["labels"].items()
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "caffe2torch", doc["metadata"]["name"]


def test_pods_use_a_service_account_without_a_token(docs, workloads):
    accounts = by_kind(docs, "ServiceAccount")
    for obj in workloads:
        spec = pod_template(obj)["spec"]
        assert spec["serviceAccountName"] in accounts
        assert accounts[spec["serviceAccountName"]]["automountServiceAccountToken"] is False
        assert spec["automountServiceAccountToken"] is False


def test_pods_run_as_a_numeric_non_root_user_with_the_runtime_seccomp_profile(workloads):
    for obj in workloads:
        spec = pod_template(obj)["spec"]
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            assert isinstance(ctx[key], int) and ctx[key] >= 10000, (obj["metadata"]["name"], key)
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), (obj["metadata"]["name"], key)
        assert not [v for v in spec["volumes"] if "hostPath" in v]


def test_containers_are_unprivileged_with_all_capabilities_dropped(workloads):
    for obj in workloads:
        for c in all_containers(pod_template(obj)["spec"]):
            ctx = c["securityContext"]
            assert ctx.get("privileged", False) is False, c["name"]
            assert ctx["allowPrivilegeEscalation"] is False, c["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], c["name"]
            assert not ctx["capabilities"].get("add"), c["name"]
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            # The pod's user must not be overridden by a container back to root.
            assert ctx.get("runAsUser", 10001) != 0 and ctx.get("runAsNonRoot", True), c["name"]


def test_privileged_appears_nowhere(docs):
    # The tutorial's template ran its pod privileged: no field of any object may ask for it.
    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                assert not (key == "privileged" and value), "privileged: true"
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)
    walk(docs)


def test_writable_paths_are_emptydirs_for_tmp_and_home(workloads):
    for obj in workloads:
        spec = pod_template(obj)["spec"]
        empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert mounts["/tmp"] in empty and mounts[env["HOME"]] in empty, c["name"]
            for var in ("MPLCONFIGDIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
                assert env[var].startswith(("/tmp/", env["HOME"] + "/")), (c["name"], var)


def test_every_container_has_memory_and_cpu_limits(workloads):
    for obj in workloads:
        for c in all_containers(pod_template(obj)["spec"]):
            res = c["resources"]
            assert res["limits"]["memory"] and res["limits"]["cpu"], c["name"]
            assert res["requests"]["memory"] and res["requests"]["cpu"], c["name"]


def test_images_are_pinned_by_a_tag_other_than_latest(workloads):
    for obj in workloads:
        for c in all_containers(pod_template(obj)["spec"]):
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, c["image"]


def test_no_token_or_secret_in_args_or_plain_env(workloads):
    for obj in workloads:
        for c in all_containers(pod_template(obj)["spec"]):
            words = " ".join(c.get("command", []) + c.get("args", [])).lower()
            assert "token" not in words and "password" not in words, c["name"]
            for e in c.get("env", []):
                if any(s in e["name"].upper() for s in ("TOKEN", "PASSWORD", "SECRET")):
                    assert "secretKeyRef" in e["valueFrom"], (c["name"], e["name"])
