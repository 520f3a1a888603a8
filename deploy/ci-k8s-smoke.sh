#!/usr/bin/env bash
# CI: `make k8s-smoke` on a Debian machine, as root. Installs the container tools first when they
# are missing (a fresh machine has none); everything else the smoke needs, make test has made.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "ci-k8s-smoke: installing podman buildah runc mmdebstrap (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc mmdebstrap >/dev/null
fi
make k8s-smoke
