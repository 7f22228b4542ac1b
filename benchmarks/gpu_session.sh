#!/usr/bin/env bash
# One device call that does every GPU check of issues 8 and 9, in order, each
# capped so the whole fits one 10-minute call and its results come back:
#   1. `eicl bench --json`, paper config alone and with --stack 8 (issue 8);
#   2. where the paper config's step spends its time (benchmarks/profile_step.py);
#   3. the quickstart tuning sweep (benchmarks/quickstart_tuning.toml: 8
#      variants x 4 stacked seeds, 8 processes) -- steps to strict ICL;
#   4. the paper config (images_all_exemplars) trained for the time left.
# Needs: the Omniglot cache in runs/data-cache (carry it) and, where tomli-w is
# missing, its wheel in .whl/ (carry it too).
#   OUT=/tmp/out bash benchmarks/gpu_session.sh [seconds budget, default 560]
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-560}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
PY=${PY:-python3}
OUT=${OUT:-/tmp/eicl-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
ls .whl/*.whl >/dev/null 2>&1 && $PY -m pip install --no-deps --no-index -q .whl/*.whl >>"$LOG" 2>&1
export PYTHONPATH=$PWD EICL_DATA_DIR=$PWD/runs/data-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" >>"$LOG" 2>&1
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*" >>"$LOG"; }
# run_for SECONDS LOGFILE CMD...: run CMD in its own process group for at most
# SECONDS, then Ctrl+C the group (runs checkpoint and stop) and kill what is left.
run_for() {
  local seconds=$1 log=$2; shift 2
  setsid "$@" >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq "$seconds"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -INT -- -$pid 2>/dev/null; sleep 8; kill -KILL -- -$pid 2>/dev/null
}

stamp bench
timeout 120 $PY -m eicl_cli.cli bench -c configs/images_all_exemplars.toml --steps 600 --json >>"$OUT/bench.jsonl" 2>>"$LOG"
timeout 90 $PY -m eicl_cli.cli bench -c configs/images_all_exemplars.toml --steps 150 --stack 8 --json >>"$OUT/bench.jsonl" 2>>"$LOG"

stamp profile
timeout 150 $PY benchmarks/profile_step.py configs/images_all_exemplars.toml --steps 30 >"$OUT/profile_paper.txt" 2>>"$LOG"

stamp tuning
TUNE_S=$(( $(left) - 200 )); (( TUNE_S > 240 )) && TUNE_S=240  # 8 processes x 4 stacked runs: about 55 steps/s each on an H100
run_for "$TUNE_S" /tmp/tune.log $PY -m eicl_cli.cli sweep benchmarks/quickstart_tuning.toml --stack 4 --jobs 8 --out /tmp/tune
stamp tuning stopped
tail -5 /tmp/tune.log >>"$LOG"
tar czf "$OUT/tune.tar.gz" --exclude='*.safetensors' -C /tmp tune tune.log

stamp paper
PAPER_S=$(( $(left) - 15 ))
run_for "$PAPER_S" /tmp/paper.log $PY -m eicl_cli.cli train -c configs/images_all_exemplars.toml --out /tmp/paper \
  --set run.checkpoint_every=1000000
stamp paper stopped
tar czf "$OUT/paper.tar.gz" --exclude='*.safetensors' -C /tmp paper paper.log
stamp done
