#!/usr/bin/env bash
# Builds a Docker base image from Debian's packages alone, for engines that cannot pull from a registry
# (air-gapped hosts, CI here): mmdebstrap makes a bookworm rootfs, `docker import` loads it.
#   scripts/debian_image.sh TAG [--entrypoint JSON] [--cmd JSON] [--user UID] [--hook CMD] PACKAGE...
# Examples (what `make test-deploy` uses in place of the public images the Dockerfile and compose name):
#   scripts/debian_image.sh convserve-base/python:3.11-bookworm python3 python3-venv python-is-python3
#   scripts/debian_image.sh convserve-base/prometheus:bookworm --entrypoint '["/usr/bin/prometheus"]' \
#     --user 65534 --hook 'mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"' prometheus
# (--hook is an mmdebstrap customize hook: "$1" is the rootfs.)
# Then: docker build --build-arg PYTHON_IMAGE=convserve-base/python:3.11-bookworm .
# The host's CA bundle replaces the image's, so pip inside a build trusts what the host trusts (a proxy's
# CA included); set CA_BUNDLE= (empty) to keep Debian's own. The rootfs tarball is cached under
# $DEBIAN_IMAGE_CACHE by a hash of its inputs, so a rebuild only re-imports it. Needs root.
set -euo pipefail

tag="${1:?usage: debian_image.sh TAG [--entrypoint JSON] [--cmd JSON] [--user UID] [--hook CMD] PACKAGE...}"
shift
entrypoint=""
cmd=""
user=""
hooks=()
while [ $# -gt 0 ]; do
  case "$1" in
    --entrypoint) entrypoint="$2"; shift 2 ;;
    --cmd) cmd="$2"; shift 2 ;;
    --user) user="$2"; shift 2 ;;
    --hook) hooks+=(--customize-hook="$2"); shift 2 ;;
    *) break ;;
  esac
done
packages=(ca-certificates "$@")
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
CA_BUNDLE="${CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
cache="${DEBIAN_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/convserve/debian-images}"

command -v mmdebstrap >/dev/null 2>&1 || {
  command -v apt-get >/dev/null 2>&1 || { echo "debian_image: mmdebstrap missing and no apt-get" >&2; exit 1; }
  timeout 300 apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null
}

ca_sum="none"
[ -n "$CA_BUNDLE" ] && [ -f "$CA_BUNDLE" ] && ca_sum="$(sha256sum <"$CA_BUNDLE" | cut -c1-16)"
key="$(printf '%s\n' "$SUITE" "$MIRROR" "$SECURITY_MIRROR" "$ca_sum" "$(date +%Y-%V)" "${packages[@]}" "${hooks[@]}" \
  | sha256sum | cut -c1-16)"
tarball="$cache/$SUITE-$key.tar"
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
  if [ "$ca_sum" != "none" ]; then
    hooks+=(--customize-hook="copy-in $CA_BUNDLE /etc/ssl/certs/")
  fi
  echo "debian_image: mmdebstrap $SUITE with ${packages[*]}" >&2
  # minbase: apt, dpkg, coreutils, bash, passwd (useradd/groupadd) and the packages asked for.
  # --aptopt: no recommends, the same as an image's `apt-get install --no-install-recommends`.
  timeout 900 mmdebstrap --variant=minbase --format=tar --quiet \
    --aptopt='APT::Install-Recommends "false"' \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "${hooks[@]}" \
    "$SUITE" "$tarball.part" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main"
  mv "$tarball.part" "$tarball"
  # Keys change weekly: drop rootfs tarballs no run has used for two weeks.
  find "$cache" -maxdepth 1 -name '*.tar' -atime +14 -delete 2>/dev/null || true
fi
touch -a "$tarball"

changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
         --change 'ENV LANG=C.UTF-8')
if [ "$ca_sum" != "none" ]; then
  changes+=(--change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt')
fi
[ -n "$entrypoint" ] && changes+=(--change "ENTRYPOINT $entrypoint")
[ -n "$cmd" ] && changes+=(--change "CMD $cmd")
[ -n "$user" ] && changes+=(--change "USER $user")
timeout 300 docker import "${changes[@]}" "$tarball" "$tag" >/dev/null
echo "debian_image: $tag from $tarball" >&2
