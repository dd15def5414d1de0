#!/usr/bin/env bash
# A Ray cluster on this machine, for trying kiln's multi-node paths (`kiln submit`, SPREAD
# placement) without a cloud: one head node (0 CPUs: it runs the GCS, dashboard and job drivers,
# never training) and N worker nodes with a bounded CPU count each, all on loopback only.
#
#   cluster/local.sh up [--workers N] [--cpus C] [--port P] [--dashboard-port D] [--no-auth]
#   cluster/local.sh status
#   cluster/local.sh down
#
# Token authentication (RAY_AUTH_MODE=token) is on by default: `up` writes a random token to
# $KILN_CLUSTER_DIR/auth_token (default ./.kiln/cluster/auth_token, mode 600) and prints how a
# client exports it. `kiln submit`/`kiln jobs` read that file by themselves when run from the same
# folder. Each node gets its own Ray temp dir, so runtime_env packages (working_dir, py_modules)
# are unpacked once per node, as on a real cluster. `down` stops exactly the processes of this
# cluster (found by its temp root), never other Ray instances on the machine, and checks none is
# left.
set -euo pipefail

STATE="${KILN_CLUSTER_DIR:-.kiln/cluster}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}

find_ray() {
  # The project's virtualenv first: its `python` must be the one job entrypoints run with.
  if [[ -n "${RAY_BIN:-}" ]]; then
    echo "$RAY_BIN"
  elif [[ -x "$REPO/.venv/bin/ray" ]]; then
    echo "$REPO/.venv/bin/ray"
  elif command -v ray >/dev/null; then
    command -v ray
  else
    die "no 'ray' executable: run 'make install' or set RAY_BIN"
  fi
}

cluster_env() {
  local ray
  ray="$(find_ray)"
  RAY="$ray"
  export PATH="$(dirname "$ray"):$PATH"
  export RAY_USAGE_STATS_ENABLED=0
  if [[ "$(cat "$STATE/auth_mode" 2>/dev/null || echo token)" == "token" ]]; then
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$(cd "$STATE" && pwd)/auth_token"
    unset RAY_AUTH_TOKEN
  else
    export RAY_AUTH_MODE=disabled
  fi
}

# Every process of this cluster carries its unique temp root in its command line; children that
# might not (workers forked by a raylet) are found as descendants.
cluster_pids() {
  local root="$1" pids="" frontier next pid
  frontier="$(pgrep -f -- "$root" || true)"
  while [[ -n "$frontier" ]]; do
    pids="$pids $frontier"
    next=""
    for pid in $frontier; do
      next="$next $(pgrep -P "$pid" || true)"
    done
    frontier="$(echo "$next" | xargs -n1 2>/dev/null | sort -u | grep -vxF -f <(echo "$pids" | xargs -n1) || true)"
  done
  echo "$pids" | xargs -n1 2>/dev/null | grep -vx "$$" | sort -u | xargs || true
}

start_node() {
  local name="$1"
  shift
  local log="$STATE/$name.log"
  if ! timeout 120 "$RAY" start "$@" --temp-dir "$TEMP_ROOT/$name" --disable-usage-stats >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    return 1
  fi
}

up() {
  local workers=2 cpus=1 port=6379 dport=8265 auth=token base
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --workers) workers="$2"; shift 2 ;;
      --cpus) cpus="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      --dashboard-port) dport="$2"; shift 2 ;;
      --no-auth) auth=disabled; shift ;;
      *) usage ;;
    esac
  done
  [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got '$workers'"
  [[ "$cpus" =~ ^[0-9]+$ && "$cpus" -ge 1 ]] || die "--cpus must be >= 1, got '$cpus'"
  if [[ -f "$STATE/temp_root" ]] && [[ -n "$(cluster_pids "$(cat "$STATE/temp_root")")" ]]; then
    die "a cluster from $STATE is already running: 'cluster/local.sh down' first"
  fi
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  echo "$auth" >"$STATE/auth_mode"
  if [[ "$auth" == "token" ]]; then
    (umask 077 && "$REPO/.venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))' \
      >"$STATE/auth_token" 2>/dev/null || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$STATE/auth_token")
  else
    rm -f "$STATE/auth_token"
  fi
  cluster_env
  # Short: Ray's unix socket paths under the temp dir are limited to about 107 characters.
  TEMP_ROOT="$(mktemp -d /tmp/kiln-ray-XXXXXX)"
  echo "$TEMP_ROOT" >"$STATE/temp_root"
  echo "$port" >"$STATE/port"
  echo "$dport" >"$STATE/dashboard_port"
  # Fixed ports per node: the defaults (dashboard agent 52365, client server 10001) would collide
  # between nodes that share one machine.
  base=$((port + 1000))
  local started
  started=$(date +%s)
  start_node head --head --node-ip-address 127.0.0.1 --port "$port" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dport" --include-dashboard true \
    --ray-client-server-port $((base)) --dashboard-agent-listen-port $((base + 1)) \
    --num-cpus 0 --num-gpus 0 || { down; die "the head node failed to start (log above)"; }
  echo "head 127.0.0.1:$port up ($(($(date +%s) - started)) s)"
  local i
  for ((i = 1; i <= workers; i++)); do
    started=$(date +%s)
    start_node "worker-$i" --address "127.0.0.1:$port" --node-ip-address 127.0.0.1 \
      --dashboard-agent-listen-port $((base + 1 + i)) --num-cpus "$cpus" --num-gpus 0 \
      || { down; die "worker-$i failed to start (log above)"; }
    echo "worker-$i up with $cpus CPU ($(($(date +%s) - started)) s)"
  done
  echo
  echo "Ray cluster: head + $workers workers on 127.0.0.1; dashboard and Jobs API at http://127.0.0.1:$dport"
  if [[ "$auth" == "token" ]]; then
    echo "Token auth is on; the token is in $RAY_AUTH_TOKEN_PATH. kiln reads it from there when run in"
    echo "this folder; for other clients (ray, serve, curl) or another folder:"
    echo "  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  fi
  echo "  kiln submit jobs/configs/digits-mlp.yaml --address http://127.0.0.1:$dport --follow"
}

status() {
  [[ -f "$STATE/temp_root" ]] || die "no cluster in $STATE ('cluster/local.sh up' starts one)"
  cluster_env
  local root port
  root="$(cat "$STATE/temp_root")"
  port="$(cat "$STATE/port")"
  if [[ -z "$(cluster_pids "$root")" ]]; then
    die "the cluster in $STATE is not running"
  fi
  echo "Jobs API: http://127.0.0.1:$(cat "$STATE/dashboard_port")   auth: $RAY_AUTH_MODE"
  "$(dirname "$RAY")/python" - "127.0.0.1:$port" <<'EOF'
import sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"]]
print(f"{len(alive)} nodes alive")
for node in sorted(alive, key=lambda n: n["Resources"].get("CPU", 0)):
    cpus, mem = node["Resources"].get("CPU", 0), node["Resources"].get("memory", 0) / 2**30
    role = "head" if cpus == 0 else "worker"
    print(f"  {node['NodeID']}  {node['NodeManagerAddress']}  {role:6}  CPU {cpus:g}  memory {mem:.1f} GiB")
total = ray.cluster_resources()
def shown(key, value):
    return f"{key} {value / 2**30:.1f} GiB" if "memory" in key else f"{key} {value:g}"
print("cluster: " + ", ".join(shown(k, v) for k, v in sorted(total.items()) if "node:" not in k))
ray.shutdown()
EOF
}

down() {
  [[ -f "$STATE/temp_root" ]] || { echo "no cluster in $STATE"; return 0; }
  local root pids left i
  root="$(cat "$STATE/temp_root")"
  pids="$(cluster_pids "$root")"
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
      left="$(cluster_pids "$root")"
      [[ -z "$left" ]] && break
      sleep 0.5
    done
    left="$(cluster_pids "$root")"
    if [[ -n "$left" ]]; then
      # shellcheck disable=SC2086
      kill -KILL $left 2>/dev/null || true
      sleep 1
    fi
  fi
  left="$(cluster_pids "$root")"
  if [[ -n "$left" ]]; then
    echo "local.sh: Ray processes still running after down: $left" >&2
    exit 1
  fi
  rm -rf "$root"
  rm -f "$STATE/temp_root"
  echo "cluster stopped; no Ray process of it is left"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *) usage ;;
esac
