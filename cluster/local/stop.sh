#!/usr/bin/env bash
# Stop the local multi-node cluster started by cluster/local/start.sh, and only that one.
#
#   cluster/local/stop.sh            # CLUSTER_DIR defaults to /tmp/mage_ray_local, as in start.sh
#
# `ray stop` would end every Ray process of this user on the machine (other clusters, other people's
# tests). Instead this ends the processes whose command line names this cluster's temp dirs (GCS, raylets,
# dashboard, log monitors, autoscaler monitor) or its GCS address (the client server), and all their
# descendants (agents and workers, which rename themselves `ray::...`): SIGTERM, then SIGKILL after
# GRACE_S seconds (cluster/local/ray_procs.py).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CLUSTER_DIR="${CLUSTER_DIR:-/tmp/mage_ray_local}"
GRACE_S="${GRACE_S:-5}"
if [[ -z "${PY:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi

if [[ ! -f "$CLUSTER_DIR/.mage_ray_local" ]]; then
  echo "no local cluster at $CLUSTER_DIR (no .mage_ray_local marker)"
  exit 0
fi
CLUSTER_DIR="$(cd "$CLUSTER_DIR" && pwd -P)"

args=(stop --mark "$CLUSTER_DIR/" --grace-s "$GRACE_S")
if [[ -f "$CLUSTER_DIR/env" ]]; then
  port="$(sed -n 's/^export RAY_ADDRESS=.*:\([0-9]*\)$/\1/p' "$CLUSTER_DIR/env")"
  [[ -n "$port" ]] && args+=(--gcs-port "$port")
fi
"$PY" "$HERE/ray_procs.py" "${args[@]}"
rm -f "$CLUSTER_DIR/env"
