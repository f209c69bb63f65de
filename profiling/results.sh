#!/usr/bin/env bash
# Regenerate the figures of docs/results.md: four 2-rank runs on digits (sgd, local with the
# static and the dynamic schedule, freeze), then profiling/compare.py -> table + PNGs.
#   bash profiling/results.sh            (about 3 minutes on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-outputs/results}
export OMP_NUM_THREADS=1
COMMON="data=digits model=convnet trainer.epochs=8 wandb.mode=offline wandb.group=results_digits_convnet trainer.progress=false"
rm -rf "$RUNS"
for variant in "sgd mode=sgd" "local_static mode=local schedule=static" \
               "local_dynamic mode=local schedule=dynamic" "freeze mode=freeze"; do
  name=${variant%% *}
  # shellcheck disable=SC2086  # word splitting of the overrides is intended
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 launch/train.py $COMMON ${variant#* } \
    "hydra.run.dir=$RUNS/$name"
done
"$PY" profiling/compare.py "$RUNS/sgd" "$RUNS/local_static" "$RUNS/local_dynamic" "$RUNS/freeze" --out docs/results
