#!/usr/bin/env bash
# The study "The claims at eight times the budget" (docs/results.md), every step of its documented commands in
# order, resumable: run it again after a crash or a lost machine and it goes on where it stopped (the jobs skip
# complete stages and resume interrupted Train runs from their checkpoints; a finished PARM search is read back
# from its file, not redone).
#
#   bench/embedded_long.sh /abs/runs            # storage path (absolute: the jobs run in Ray's temporary copy)
#   RUN_NAME=embedded_long PARM_LRS=5e-4,1e-3,2e-3,5e-3 bench/embedded_long.sh /abs/runs
#
# Steps: (0) a local multi-node Ray cluster (cluster/local/start.sh: head + 1 worker, 1 CPU each), kept if one is
# already recorded in $CLUSTER_DIR; (1) `ray job submit` of jobs/train_baselines.py --which arms (the rollouts
# and the two GenARM ARMs); (2) the PARM search (bench/arm_spread.py --search-parm, a plain process) unless
# parm_search.txt already holds its verdict; (3) `ray job submit` of jobs/pipeline.py with the search's
# arm.parm_learning_rate / arm.parm_steps (the largest lr at the most steps when none passed, said in the log);
# (4) the PARM check on the bundle and the docs section (bench/study_section.py) into $RUN/section.md. Each step's
# start and end are logged with the time to $RUN/study.log. The cluster is left running (cluster/local/stop.sh);
# one recorded in $CLUSTER_DIR that no longer answers (the machine restarted) is cleared and started again.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STORAGE="${1:?usage: bench/embedded_long.sh /abs/storage/path}"
[[ "$STORAGE" == /* ]] || { echo "error: storage path must be absolute (got '$STORAGE')" >&2; exit 2; }
RUN_NAME="${RUN_NAME:-embedded_long}"
CONFIG="${CONFIG:-configs/embedded_long.yaml}"
PARM_LRS="${PARM_LRS:-1e-3,2e-3,5e-3}"
PARM_STEPS="${PARM_STEPS:-24,48,96,144,192}"
export CLUSTER_DIR="${CLUSTER_DIR:-/tmp/mage_ray_long}"
RUN="$STORAGE/$RUN_NAME"
PY="$REPO/.venv/bin/python"
cd "$REPO"
mkdir -p "$RUN"
log() { echo "$(date -u +%FT%TZ) $*" | tee -a "$RUN/study.log"; }

if [[ -f "$CLUSTER_DIR/env" ]]; then
  # a cluster recorded by an earlier run: keep it if it answers, else (machine restarted) clear and start anew
  if ! (source "$CLUSTER_DIR/env" && timeout 120 "$REPO/.venv/bin/ray" status --address "$RAY_ADDRESS" >/dev/null 2>&1); then
    log "the cluster recorded in $CLUSTER_DIR does not answer: stopping what is left of it and starting a new one"
    cluster/local/stop.sh || true
    rm -f "$CLUSTER_DIR/env"
  fi
fi
if [[ ! -f "$CLUSTER_DIR/env" ]]; then
  NUM_WORKERS=1 HEAD_CPUS=1 WORKER_CPUS=1 WORKER_GPUS=0 cluster/local/start.sh
  log "cluster started in $CLUSTER_DIR"
fi
# shellcheck disable=SC1091
source "$CLUSTER_DIR/env"
export PATH="$REPO/.venv/bin:$PATH"
common=(storage.storage_path="$STORAGE" storage.run_name="$RUN_NAME")

log "step 1: rollouts and GenARM ARMs"
ray job submit --address "$RAY_DASHBOARD" --working-dir . -- python jobs/train_baselines.py \
  --config "$CONFIG" --which arms "${common[@]}"
log "step 1 done"

if ! grep -q "^smallest passing\|^no learning rate" "$RUN/parm_search.txt" 2>/dev/null; then
  log "step 2: PARM search, lr $PARM_LRS, steps $PARM_STEPS"
  "$PY" bench/arm_spread.py --run "$RUN" --config "$CONFIG" --rollouts "$RUN/rollouts" \
    --search-parm "$PARM_LRS" --parm-steps "$PARM_STEPS" | tee "$RUN/parm_search.txt.part"
  mv "$RUN/parm_search.txt.part" "$RUN/parm_search.txt"
  log "step 2 done"
fi
overrides="$(sed -n 's/^smallest passing:.*overrides: //p' "$RUN/parm_search.txt")"
if [[ -z "$overrides" ]]; then
  lr="${PARM_LRS##*,}"; steps="${PARM_STEPS##*,}"
  overrides="arm.parm_learning_rate=$lr arm.parm_steps=$steps"
  log "no learning rate passed the PARM criterion: the pipeline trains PARM at the largest, $overrides"
fi

log "step 3: the pipeline with $overrides"
# shellcheck disable=SC2086
ray job submit --address "$RAY_DASHBOARD" --working-dir . -- python jobs/pipeline.py \
  --config "$CONFIG" "${common[@]}" $overrides
log "step 3 done"

log "step 4: PARM check on the bundle and the docs section"
"$PY" bench/arm_spread.py --bundle "$RUN/bundle" | tee "$RUN/arm_spread.txt"
"$PY" bench/study_section.py --run "$RUN" --title "The claims at eight times the budget" \
  --command "bench/embedded_long.sh $STORAGE  # step 3: python jobs/pipeline.py --config $CONFIG ${common[*]} $overrides" \
  --spread "$RUN/arm_spread.txt" >"$RUN/section.md"
log "step 4 done: $RUN/section.md"
