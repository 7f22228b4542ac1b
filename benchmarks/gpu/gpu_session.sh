#!/usr/bin/env bash
# One device call that does the GPU checks (speed of one run and of stacked runs), in order, each capped
# so the whole fits one 10-minute call and its results come back:
#   1. `eicl bench --json` of the paper config as it is (on a GPU its layers
#      unrolled, 10 steps per device call), and --stack 8;
#   2. the quickstart config alone and --stack 8, with batch workers (the
#      default on a GPU) and without; the paper config and --stack 8 in
#      bfloat16;
#   3. variants: the paper config with one step per call, --stack 8 with the
#      ResNet's convolutions as GEMMs (embedding.conv_impl = gemm, replacing
#      the grouped convolutions vmap makes), --stack 4, the quickstart with
#      one step per call, the paper config with the loop over layers
#      (transformer.unroll = 1);
#   4. the same paper and quickstart benches for other copies of the package
#      carried in runs/old/eicl_cli (a baseline) and runs/alt/eicl_cli (a
#      variant), where present: A/B on one machine;
#   5. where the paper config's step spends its time (benchmarks/profile_step.py),
#      and its model pass alone, 8 stacked (XLA's convolutions, then GEMMs).
# The speed targets are for an H100: call it with kind nvidia-h100-x1.
# With the plan `paper`, the paper config trains instead (the 10-minute run): it trains in
# runs/gpu-paper (kept on a warm machine between calls) and resumes from there,
# until its training time reaches PAPER_TARGET_S (default 600 s) or the budget
# runs out; the paper and stack-8 benches (as they are and looped) follow if
# at least 150 s are left.
# A 10-minute run needs two calls, as one call may last 600 s at most:
#   call 1 (timeout_s 600):  bash benchmarks/gpu/gpu_session.sh 585 paper
#   call 2 at once (the machine goes back after 30 s idle), with B = the
#   lease's budget_left_s - 40, at most 380, and timeout_s B + 20:
#                            bash benchmarks/gpu/gpu_session.sh B paper
# Needs: the Omniglot cache in runs/data-cache (carry it) and, where tomli-w is
# missing, its wheel in .whl/ (carry it too).
# With the plan `stack`, only what stacking costs (about 6 minutes); with
# `pallas`, the stem's fused kernels checked and benched (7-10 minutes).
#   OUT=/tmp/out bash benchmarks/gpu/gpu_session.sh [seconds budget, default 540] [all|paper|stack|pallas]
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUDGET=${1:-540}
PLAN=${2:-all}
PAPER_TARGET_S=${PAPER_TARGET_S:-600}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# cap N: N seconds, or what is left of the budget (at least 1) if less.
cap() { local l=$(( $(left) - 5 )); l=$(( l < 1 ? 1 : l )); echo $(( $1 < l ? $1 : l )); }
PY=${PY:-python3}
OUT=${OUT:-/tmp/eicl-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$LOG"; }
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/site
fi
export EICL_DATA_DIR=$ROOT/runs/data-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
# Stop at once if the package does not import: the caller can fix and rerun.
if ! $PY -c "import jax, eicl_cli.cli; print('jax', jax.__version__, jax.devices())" >>"$LOG" 2>&1; then
  tail -20 "$LOG"; exit 3
fi
# run_for SECONDS LOGFILE CMD...: run CMD in its own process group for at most
# SECONDS, then Ctrl+C the group (runs checkpoint and stop) and kill what is left.
run_for() {
  local seconds=$1 log=$2; shift 2
  setsid "$@" >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq "$seconds"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -INT -- -$pid 2>/dev/null
  # The steps already queued on the device finish before the checkpoint is
  # written: well under a second on a GPU, several seconds for the paper
  # model on a CPU.
  for _ in $(seq 60); do kill -0 $pid 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- -$pid 2>/dev/null
}
# bench DIR TIMEOUT ARGS...: `eicl bench --json` of the package in DIR.
bench() {
  local dir=$1 limit=$2; shift 2
  (cd "$dir" && timeout "$limit" $PY -m eicl_cli.cli bench --json "$@") 2>>"$LOG"
}
PAPER=$ROOT/configs/images_all_exemplars.toml
# The paper's 12 blocks with the loop over layers (transformer.unroll = 1):
# the default (0) unrolls them on a GPU. The same model, a different
# compiled step (the A/B against earlier versions' default).
LOOPED="--set transformer.unroll=1"
QUICK=$ROOT/configs/quickstart.toml
# The ResNet's convolutions as GEMMs: under vmap (--stack) a batched matmul
# instead of a grouped convolution.
GEMM="--set embedding.conv_impl=gemm"
BF16="--set model.dtype=bfloat16"
# The ResNet stem as two fused Pallas kernels that never write its map.
PALLAS="--set embedding.stem_impl=pallas"
# One training step per device call (the default is 10 on a GPU, where the
# host's fixed price per call, 400+ buffers handed over and back and the
# dispatch, is then paid once per ten steps).
ONE_CALL="--set train.steps_per_call=1"
# Stacked runs' batches drawn in the training process, as before batch
# workers (the default on a GPU: one worker process per run).
NO_WORKERS="--set train.draw_workers=0"

if [ "$PLAN" = paper ]; then
  RUN=$ROOT/runs/gpu-paper
  # Training seconds the run already has (its last logged wall time).
  DONE=$($PY -c "import json,sys; t=[json.loads(l).get('time',0) for l in open(sys.argv[1])]; print(int(max(t)))" \
         "$RUN/metrics.jsonl" 2>/dev/null || echo 0)
  WANT=$(( PAPER_TARGET_S - DONE + 30 ))  # + start-up and compilation
  HAVE=$(( $(left) - 15 ))
  SECONDS_FOR=$(( WANT < HAVE ? WANT : HAVE ))
  stamp "paper: $DONE s done, training for $SECONDS_FOR s more"
  if ls "$RUN"/checkpoints/*.safetensors >/dev/null 2>&1; then
    run_for "$SECONDS_FOR" "$OUT/paper.log" $PY -m eicl_cli.cli train --resume "$RUN"
  else
    run_for "$SECONDS_FOR" "$OUT/paper.log" $PY -m eicl_cli.cli train -c "$PAPER" --out "$RUN" \
      --set run.checkpoint_every=1000000
  fi
  stamp paper stopped
  cp "$RUN/metrics.jsonl" "$RUN/config.toml" "$OUT/" 2>>"$LOG"
  tail -c 2000 "$OUT/paper.log" >>"$LOG"
  if [ "$(left)" -ge 150 ]; then
    stamp bench
    bench "$ROOT" 100 -c "$PAPER" --steps 600 >>"$OUT/bench.jsonl"
    [ "$(left)" -ge 110 ] && bench "$ROOT" 100 -c "$PAPER" --steps 600 $LOOPED >>"$OUT/bench.jsonl"
    [ "$(left)" -ge 60 ] && bench "$ROOT" "$(cap 600)" -c "$PAPER" --steps 150 --stack 8 \
      >>"$OUT/bench.jsonl"
    [ "$(left)" -ge 60 ] && bench "$ROOT" "$(cap 600)" -c "$PAPER" --steps 150 --stack 8 \
      $LOOPED >>"$OUT/bench.jsonl"
  fi
  stamp done
  exit 0
fi

if [ "$PLAN" = pallas ]; then
  # The stem's fused Pallas kernels (embedding.stem_impl = "pallas") against
  # XLA's whole-map stem: first whether they compile and agree on this GPU
  # (values, gradients, statistics) and what the stem alone costs, alone and
  # 8 stacked; then the paper config both ways, 8 stacked with the kernels
  # (float32, then bfloat16), and 8 stacked without them if time is left.
  # 7-10 minutes on a fresh machine; a smaller budget cuts the last benches.
  stamp stem check
  # (and two other tilings of the kernels, to pick the default from)
  PYTHONPATH=$ROOT:${PYTHONPATH:-} timeout "$(cap 120)" $PY -m benchmarks.gpu.stem_check \
    --forms whole,fused --fused-tiles 64x2,32x4 --stack 1,8 >"$OUT/stem_check.jsonl" 2>>"$LOG"
  # In bfloat16 the kernels store the pooled map and read its gradient as
  # bfloat16 (Triton's bf16 stores and loads): one run, against XLA's form.
  PYTHONPATH=$ROOT:${PYTHONPATH:-} timeout "$(cap 45)" $PY -m benchmarks.gpu.stem_check \
    --forms whole,fused --stack 1 --dtype bfloat16 >>"$OUT/stem_check.jsonl" 2>>"$LOG"
  cat "$OUT/stem_check.jsonl" >>"$LOG"
  stamp bench pallas
  # The target pair first (one run and 8 stacked, with the kernels), then
  # one run without them (A/B), the pair in bfloat16 (by XLA's kernel list
  # the likeliest to come within 2x: the fewest bytes per stacked step), and
  # 8 stacked without the kernels.
  bench "$ROOT" "$(cap 100)" -c "$PAPER" --steps 300 $PALLAS >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 130)" -c "$PAPER" --steps 100 --stack 8 $PALLAS >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 100)" -c "$PAPER" --steps 300 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 130)" -c "$PAPER" --steps 100 --stack 8 $PALLAS $BF16 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 100)" -c "$PAPER" --steps 300 $PALLAS $BF16 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 130)" -c "$PAPER" --steps 100 --stack 8 >>"$OUT/bench.jsonl"
  stamp done
  exit 0
fi

if [ "$PLAN" = stack ]; then
  # What stacking costs beside one run, on one machine: the quickstart alone
  # and 8 stacked (a small, latency-bound model), with batch workers and
  # without, and with its convolutions as GEMMs, the paper config alone, 8 stacked in bfloat16 (half the bytes)
  # and 4 stacked. About 6 minutes: on a fresh machine a paper bench needs
  # 60-90 s (compilation, autotuning), a stacked one 90 s or more.
  stamp bench stack plan
  bench "$ROOT" "$(cap 45)" -c "$QUICK" --steps 2000 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 1000 --stack 8 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 1000 --stack 8 $NO_WORKERS >>"$OUT/bench.jsonl"
  # As GEMMs, XLA's kernel list (gpu_program.py) has fewer launches and
  # bytes per step than with the grouped convolutions.
  bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 1000 --stack 8 $GEMM >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 110)" -c "$PAPER" --steps 300 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 130)" -c "$PAPER" --steps 100 --stack 8 $BF16 >>"$OUT/bench.jsonl"
  bench "$ROOT" "$(cap 130)" -c "$PAPER" --steps 100 --stack 4 >>"$OUT/bench.jsonl"
  stamp done
  exit 0
fi

stamp bench
# Most wanted first: the two target figures, then what decides whether
# stacking can come within 2x (bfloat16, a small model); the rest as time
# allows (a paper bench takes 60-90 s with its compilation, a stacked one 90).
bench "$ROOT" "$(cap 110)" -c "$PAPER" --steps 600 >>"$OUT/bench.jsonl"
stamp bench stack
bench "$ROOT" "$(cap 120)" -c "$PAPER" --steps 150 --stack 8 >>"$OUT/bench.jsonl"
stamp bench quickstart
bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 2000 >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 1000 --stack 8 >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 1000 --stack 8 $NO_WORKERS >>"$OUT/bench.jsonl"
stamp bench bfloat16
bench "$ROOT" "$(cap 120)" -c "$PAPER" --steps 150 --stack 8 $BF16 >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 100)" -c "$PAPER" --steps 600 $BF16 >>"$OUT/bench.jsonl"
stamp bench variants
bench "$ROOT" "$(cap 100)" -c "$PAPER" --steps 600 $ONE_CALL >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 110)" -c "$PAPER" --steps 150 --stack 8 $GEMM >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 110)" -c "$PAPER" --steps 150 --stack 4 >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 60)" -c "$QUICK" --steps 2000 $ONE_CALL >>"$OUT/bench.jsonl"
bench "$ROOT" "$(cap 100)" -c "$PAPER" --steps 600 $LOOPED >>"$OUT/bench.jsonl"
for other in runs/old runs/alt; do
  [ -d "$other/eicl_cli" ] || continue
  stamp bench "$other"
  bench "$ROOT/$other" "$(cap 100)" -c "$PAPER" --steps 300 >>"$OUT/bench_$(basename $other).jsonl"
  bench "$ROOT/$other" "$(cap 60)" -c "$QUICK" --steps 1000 >>"$OUT/bench_$(basename $other).jsonl"
done

stamp profile
# Where 8 stacked replicas' time goes, with XLA's convolutions and with GEMMs.
PYTHONPATH=$ROOT:${PYTHONPATH:-} timeout "$(cap 90)" $PY benchmarks/profile_step.py "$PAPER" --model-only \
  --stack 8 --steps 10 >"$OUT/profile_paper_stack8.txt" 2>>"$LOG"
PYTHONPATH=$ROOT:${PYTHONPATH:-} timeout "$(cap 90)" $PY benchmarks/profile_step.py "$PAPER" --model-only \
  --stack 8 --steps 10 $GEMM >"$OUT/profile_paper_stack8_gemm.txt" 2>>"$LOG"
PYTHONPATH=$ROOT:${PYTHONPATH:-} timeout "$(cap 90)" $PY benchmarks/profile_step.py "$PAPER" --steps 30 >"$OUT/profile_paper.txt" 2>>"$LOG"
stamp done
