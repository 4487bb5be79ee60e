#!/usr/bin/env bash
# Debian packages the tests drive for real: Prometheus (metrics checks), nginx (the local stack's gRPC
# load balancer), HAProxy (checks the compose stack's balancer config), openssl (test certificates
# for TLS/mTLS), curl (the docs' REST examples, run by a test), strace (the repository boundary test)
# and h2load from nghttp2-client (the C load generator of benchmarks/h2load.py, driven by a test).
# `make test-deploy` installs its
# own (docker.io, mmdebstrap) in its scripts.
# Also the TrueType/OpenType fonts the digits model is trained on and the unseen fonts its generalisation
# set is rendered from (models/fonts.py lists which is which).
# Idempotent: installs only what is missing. Needs root (or sudo).
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || need+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
# strace: a test watches every file the server and `convserve import` open (the repository boundary).
command -v strace >/dev/null 2>&1 || need+=(strace)
# The font list is shared with the Dockerfile's train stage.
while read -r font; do
  dpkg-query -W -f='${Status}' "$font" 2>/dev/null | grep -q "ok installed" || need+=("$font")
done < "$(dirname "$0")/font-packages.txt"
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: apt-get not found; install ${need[*]} with your package manager" >&2
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
# --no-install-recommends keeps it small; policy-rc.d stops the packages from starting daemons.
printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
$sudo chmod +x /usr/sbin/policy-rc.d
$sudo apt-get install -y -q --no-install-recommends "${need[@]}"
$sudo rm -f /usr/sbin/policy-rc.d
