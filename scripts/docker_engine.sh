#!/usr/bin/env bash
# A private Docker engine for `make test-deploy` on a machine that runs none (CI, a developer's box).
#   scripts/docker_engine.sh start STATE_DIR   prints the DOCKER_HOST to use (an engine already
#                                              answering is reused and left alone)
#   scripts/docker_engine.sh stop STATE_DIR    stops the engine this script started, removes STATE_DIR
# The engine gets its own data root, exec root and socket under STATE_DIR, no default bridge and no
# iptables rules (--bridge=none --iptables=false): containers reach only networks that compose creates,
# and published ports are forwarded by the userland proxy on the 127.0.0.1 addresses the tests publish.
# Installs Debian's docker.io when dockerd is missing. Needs root. Every wait has a deadline.
set -euo pipefail

cmd="${1:?usage: docker_engine.sh start|stop STATE_DIR}"
state="${2:?usage: docker_engine.sh start|stop STATE_DIR}"
START_TIMEOUT_S="${START_TIMEOUT_S:-60}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"

log() { echo "docker_engine: $*" >&2; }

engine_answers() {  # $1: DOCKER_HOST (empty = the client's default)
  DOCKER_HOST="$1" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

install_engine() {
  command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || { log "dockerd missing and no apt-get: install a Docker engine"; exit 1; }
  log "installing Debian's docker.io"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >/dev/null
  # policy-rc.d keeps the package from starting the system's own engine: this script starts its own.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  timeout 600 apt-get install -y -q --no-install-recommends docker.io >/dev/null || {
    rm -f /usr/sbin/policy-rc.d; log "apt-get install docker.io failed"; exit 1; }
  rm -f /usr/sbin/policy-rc.d
}

start() {
  if [ -z "${DOCKER_HOST:-}" ] && engine_answers ""; then
    log "reusing the running engine"
    echo ""  # the client's default socket
    return 0
  fi
  install_engine
  mkdir -p "$state"
  local sock="unix://$state/docker.sock"
  if [ -f "$state/dockerd.pid" ] && engine_answers "$sock"; then
    echo "$sock"
    return 0
  fi
  log "starting dockerd under $state"
  # setsid: the engine outlives this shell but not `stop`; its own process group is easy to end.
  setsid dockerd \
    --data-root "$state/data" --exec-root "$state/exec" --pidfile "$state/dockerd.pid" \
    --host "$sock" --bridge=none --iptables=false --ip-masq=false \
    >"$state/dockerd.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until engine_answers "$sock"; do
    if [ $SECONDS -ge $deadline ]; then
      log "dockerd did not answer within ${START_TIMEOUT_S}s; its log:"
      tail -n 30 "$state/dockerd.log" >&2 || true
      exit 1
    fi
    sleep 0.5
  done
  echo "$sock"
}

stop() {
  [ -d "$state" ] || return 0
  if [ -f "$state/dockerd.pid" ]; then
    local pid
    pid="$(cat "$state/dockerd.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      local deadline=$((SECONDS + STOP_TIMEOUT_S))
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then
        log "dockerd $pid did not stop within ${STOP_TIMEOUT_S}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
  fi
  # Mounts the engine left behind (overlay layers, the exec root's namespaces) block the removal.
  grep -o " $state/[^ ]*" /proc/mounts | sort -r | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
  rm -rf "$state"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: docker_engine.sh start|stop STATE_DIR" >&2; exit 2 ;;
esac
