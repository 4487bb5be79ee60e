#!/usr/bin/env bash
# Seconds from a fresh clone of this repository to the first SERVING of `make serve`.
#   bash scripts/time_to_serving.sh [--no-pip-cache]
# Clones HEAD into a temporary folder, runs `make serve` there on the default ports (8000-8002 must be
# free), waits for the server's "serving" line, reports the time and what the .venv holds, and stops it.
set -euo pipefail
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
git clone -q "$src" "$work/convserve"
cd "$work/convserve"
nocache=()
[[ "${1:-}" == "--no-pip-cache" ]] && nocache=(PIP_NO_CACHE_DIR=1)
start=$(date +%s.%N)
env "${nocache[@]}" make serve > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 2400); do
  grep -qE "serving [0-9]+ model version|all [0-9]+ workers serving" "$work/serve.log" && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log"; echo "make serve exited" >&2; exit 1; }
  sleep 0.25
done
end=$(date +%s.%N)
grep -qE "serving [0-9]+ model version|all [0-9]+ workers serving" "$work/serve.log" || { echo "no SERVING in 600 s" >&2; exit 1; }
python3 -c "import sys; print(f'fresh clone to first SERVING: {float(sys.argv[2]) - float(sys.argv[1]):.1f} s ({sys.argv[3]})')" \
  "$start" "$end" "${nocache[*]:-pip cache as it is}"
.venv/bin/python -c "import importlib.util as u; print('torch in .venv:', u.find_spec('torch') is not None)"
du -sh .venv | cut -f1 | sed 's/^/.venv size: /'
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
pkill -TERM -P "$pid" 2>/dev/null || true
