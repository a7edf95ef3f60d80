#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: one head and NUM_WORKERS worker nodes, each its own
# raylet with its own temp dir and ports, each advertising its own logical resources (GPUs here are
# logical: Ray schedules them, nothing touches CUDA), reached at 127.0.0.1. Stop it with
# cluster/local/stop.sh.
#
#   cluster/local/start.sh                       # head (1 CPU) + 2 workers (1 CPU, 1 logical GPU each)
#   NUM_WORKERS=0 HEAD_CPUS=2 cluster/local/start.sh
#   source /tmp/mage_ray_local/env                # then: ray status, python -c 'import ray; ray.init()'
#   ray job submit --address "$RAY_DASHBOARD" --working-dir . -- python jobs/sweep.py --config configs/smoke.yaml \
#       storage.storage_path=/tmp/mage_runs          # absolute: the job runs in a temporary copy Ray deletes
#
# Environment (all optional):
#   CLUSTER_DIR   state + temp dirs of the cluster (default /tmp/mage_ray_local; keep it short: Ray's unix
#                 socket paths live under it)
#   NUM_WORKERS   worker nodes (default 2)      HEAD_CPUS / HEAD_GPUS     head resources (default 1 / 0)
#   WORKER_CPUS   CPUs per worker (default 1)   WORKER_GPUS              logical GPUs per worker (default 1)
#   PORT          head GCS port (default: a free port)
#   DASHBOARD_PORT  dashboard / Jobs API port (default: a free port)
#   RAY           the ray executable (default: .venv/bin/ray of this repo if present, else `ray`)
#   RAY_AUTH_MODE token | disabled (default: token if ~/.ray/auth_token exists, as `ray start` decides)
# Prints RAY_ADDRESS (GCS, for ray.init / ray status), RAY_DASHBOARD (http, for ray job submit) and
# RAY_AUTH_MODE, and writes them to $CLUSTER_DIR/env (`source` it in the shell that talks to the cluster).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray)"; fi
fi
BIN="$(dirname "$RAY")"
PY="$BIN/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"
# Job drivers run `python ...` with the PATH the raylet was started with: put this Ray's python first.
export PATH="$BIN:$PATH"

CLUSTER_DIR="${CLUSTER_DIR:-/tmp/mage_ray_local}"
NUM_WORKERS="${NUM_WORKERS:-2}"
HEAD_CPUS="${HEAD_CPUS:-1}"
HEAD_GPUS="${HEAD_GPUS:-0}"
WORKER_CPUS="${WORKER_CPUS:-1}"
WORKER_GPUS="${WORKER_GPUS:-1}"

if [[ -f "$CLUSTER_DIR/env" ]]; then
  echo "a cluster is already recorded in $CLUSTER_DIR (run cluster/local/stop.sh first)" >&2
  exit 1
fi
# stop.sh ends processes by this directory's path, so it must be a directory of its own.
if [[ -e "$CLUSTER_DIR" && ! -f "$CLUSTER_DIR/.mage_ray_local" && -n "$(ls -A "$CLUSTER_DIR")" ]]; then
  echo "CLUSTER_DIR=$CLUSTER_DIR exists and is not a local-cluster dir; pick a new path" >&2
  exit 1
fi
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR="$(cd "$CLUSTER_DIR" && pwd -P)"   # absolute and resolved, as stop.sh matches it
touch "$CLUSTER_DIR/.mage_ray_local"

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PORT="${PORT:-$(free_port)}"
DASHBOARD_PORT="${DASHBOARD_PORT:-$(free_port)}"
export RAY_USAGE_STATS_ENABLED=0
# A multi-node cluster by design: a shell (or test process) in which a mage_ray job started a private local Ray
# has RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what binds that Ray to loopback), and with it `ray start --address`
# refuses to add a worker node.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1
# Ray 2.60 turns token authentication on for `ray start` when RAY_AUTH_MODE is unset and a token exists in
# ~/.ray/auth_token (a local `ray.init()` creates one). Decide the mode once here and record it in the env
# file, so that clients that source it (ray.init, ray job submit) use the same mode as the cluster.
if [[ -z "${RAY_AUTH_MODE:-}" ]]; then
  if [[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; then RAY_AUTH_MODE=token; else RAY_AUTH_MODE=disabled; fi
fi
export RAY_AUTH_MODE

# Ports every raylet on one machine must not share; the rest (node manager, object manager, worker
# ports) are picked at random by Ray when set to 0. (Ray resolves 127.0.0.1 as a node IP to the machine's
# own address, so nodes register under that; clients reach the GCS at 127.0.0.1:$PORT all the same, and
# the dashboard / Jobs API is bound to 127.0.0.1 only.)
node_ports() {
  echo --node-manager-port=0 --object-manager-port=0 \
    --min-worker-port=0 --max-worker-port=0 \
    --dashboard-agent-listen-port="$(free_port)" --dashboard-agent-grpc-port="$(free_port)" \
    --runtime-env-agent-port="$(free_port)" --metrics-export-port="$(free_port)"
}

cleanup_on_error() {
  echo "start failed; stopping what was started" >&2
  CLUSTER_DIR="$CLUSTER_DIR" "$REPO/cluster/local/stop.sh" >&2 || true
}

# One node: `ray start` with fresh ports, up to 3 tries (a port picked by free_port may be taken by another
# process before Ray binds it; a start can time out on a loaded machine). A failed try's processes are stopped
# (found by the node's own temp dir) and the end of its log is printed.
start_node() {
  local name="$1"; shift
  local try
  for try in 1 2 3; do
    # shellcheck disable=SC2046
    if "$RAY" start "$@" $(node_ports) --temp-dir="$CLUSTER_DIR/$name" --disable-usage-stats \
        >"$CLUSTER_DIR/$name.log" 2>&1; then
      return 0
    fi
    echo "ray start of $name failed (try $try of 3); the end of $CLUSTER_DIR/$name.log:" >&2
    tail -n 15 "$CLUSTER_DIR/$name.log" >&2 || true
    "$PY" "$REPO/cluster/local/ray_procs.py" stop --mark "$CLUSTER_DIR/$name/" --grace-s 2 >&2 || true
  done
  return 1
}
trap cleanup_on_error ERR

for try in 1 2 3; do
  if start_node head --head --port="$PORT" \
      --ray-client-server-port="$(free_port)" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --num-cpus="$HEAD_CPUS" --num-gpus="$HEAD_GPUS"; then
    break
  fi
  [[ $try == 3 ]] && false
  PORT="$(free_port)"; DASHBOARD_PORT="$(free_port)"
done

for i in $(seq 1 "$NUM_WORKERS"); do
  start_node "w$i" --address="127.0.0.1:$PORT" --num-cpus="$WORKER_CPUS" --num-gpus="$WORKER_GPUS"
done
trap - ERR

cat >"$CLUSTER_DIR/env" <<EOF
export RAY_ADDRESS=127.0.0.1:$PORT
export RAY_DASHBOARD=http://127.0.0.1:$DASHBOARD_PORT
export RAY_AUTH_MODE=$RAY_AUTH_MODE
EOF
echo "Ray cluster up: 1 head ($HEAD_CPUS CPU, $HEAD_GPUS GPU) + $NUM_WORKERS worker(s)" \
  "($WORKER_CPUS CPU, $WORKER_GPUS logical GPU each); state in $CLUSTER_DIR"
cat "$CLUSTER_DIR/env"
