#!/usr/bin/env bash
# GPU device check, one run: `eicl bench --json` for the paper config,
# plain and with 8 stacked runs (plus the small quickstart config stacked).
#
# Data: the real Omniglot cache (45 MB) travels as runs/data-cache/omniglot.safetensors
# (runs/ is git-ignored; copy /work/data-cache/omniglot.safetensors there and
# carry "runs/data-cache"). Without it a synthetic cache of the same shapes is
# drawn first: speed depends only on shapes, not on pixels.
#
#   PY=.venv/bin/python benchmarks/gpu/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
export EICL_DATA_DIR="${EICL_DATA_DIR:-$PWD/runs/data-cache}"
export EICL_COMPILE_CACHE=off  # report real compile times
SET=()
if [ ! -f "$EICL_DATA_DIR/omniglot.safetensors" ]; then
  echo "no Omniglot cache in $EICL_DATA_DIR: drawing a synthetic one" >&2
  $PY -m eicl_cli.cli prepare-data --source synthetic --data-dir "$EICL_DATA_DIR" >&2
  SET=(--set 'data.dataset="synthetic"')
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
$PY -m eicl_cli.cli bench -c configs/images_all_exemplars.toml --steps 600 --json ${SET[@]+"${SET[@]}"}
$PY -m eicl_cli.cli bench -c configs/images_all_exemplars.toml --steps 150 --stack 8 --json ${SET[@]+"${SET[@]}"}
$PY -m eicl_cli.cli bench -c configs/quickstart.toml --steps 600 --json ${SET[@]+"${SET[@]}"}
$PY -m eicl_cli.cli bench -c configs/quickstart.toml --steps 300 --stack 8 --json ${SET[@]+"${SET[@]}"}
