#!/usr/bin/env bash
# The Fashion-MNIST benchmark (docs/results.md, section "Fashion-MNIST"): every variant x seed x
# model as a 2-rank torchrun job, then profiling/fashion_table.py -> the marked section of
# docs/results.md + accuracy-vs-wall-time and boundary-vs-epoch plots (profiling/compare.py draws
# them) under docs/results/fashion/<model>/.
#
#   bash profiling/fashion.sh              # default: 3 seeds, convnet (all variants) + vgg11 (sgd,
#                                          # freeze, local); ~45-50 min on 2 idle cores
#   SMOKE=1 bash profiling/fashion.sh      # 1 seed, sgd + local, 2 epochs of 5 steps, convnet only;
#                                          # writes outputs/fashion_smoke/ (docs/ untouched)
#
# Longer or different runs (environment):
#   SEEDS="0 1 2 3 4"   seeds                      MODELS="convnet vgg11"  models (fashion_<model> configs)
#   EPOCHS=N            trainer.epochs             STEPS=N | STEPS=null    trainer.max_steps_per_epoch
#   VARIANTS="..."      convnet variants           DEEP_VARIANTS="..."     variants of the other models
#   NPROC=2             ranks                      RUN_TIMEOUT=1200        seconds per run before it is killed
#   RUNS=outputs/fashion  run root                 DOC=docs/results.md     the doc whose section is rewritten
#   EXTRA="k=v ..."     overrides added to every run
# Variants: sgd freeze local local_ue4 local_sf025 local_se4 local_wsoff local_bf16. local_bf16
# (local.sync_dtype=bf16) is skipped, with a message, while the config has no local.sync_dtype.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 WANDB_MODE=${WANDB_MODE:-offline}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, whatever the venv has installed
ALL_VARIANTS="sgd freeze local local_ue4 local_sf025 local_se4 local_wsoff local_bf16"
if [[ "${SMOKE:-0}" == 1 ]]; then
  SEEDS=${SEEDS:-0}; MODELS=${MODELS:-convnet}; VARIANTS=${VARIANTS:-"sgd local"}
  EPOCHS=${EPOCHS:-2}; STEPS=${STEPS:-5}; RUNS=${RUNS:-outputs/fashion_smoke}
  DOC=${DOC:-$RUNS/results.md}; PLOTS=${PLOTS:-$RUNS/plots}
  SMOKE_SCHEDULE="schedule.warmup_epochs=1"   # 2 epochs: the second one local
  mkdir -p "$RUNS"; cp docs/results.md "$DOC"   # rewrite a copy: the smoke must not touch docs/
else
  SEEDS=${SEEDS:-"0 1 2"}; MODELS=${MODELS:-"convnet vgg11"}; VARIANTS=${VARIANTS:-$ALL_VARIANTS}
  EPOCHS=${EPOCHS:-}; STEPS=${STEPS:-}; RUNS=${RUNS:-outputs/fashion}
  DOC=${DOC:-docs/results.md}; PLOTS=${PLOTS:-docs/results/fashion}; SMOKE_SCHEDULE=""
fi
DEEP_VARIANTS=${DEEP_VARIANTS:-"sgd freeze local"}
NPROC=${NPROC:-2}
RUN_TIMEOUT=${RUN_TIMEOUT:-1200}
EXTRA=${EXTRA:-}

overrides() {  # variant -> its overrides
  case "$1" in
    sgd) echo "mode=sgd" ;;
    freeze) echo "mode=freeze" ;;
    local) echo "mode=local" ;;
    local_ue4) echo "mode=local local.update_every=4" ;;
    local_sf025) echo "mode=local local.sample_fraction=0.25" ;;
    local_se4) echo "mode=local local.sync_every=4" ;;
    local_wsoff) echo "mode=local local.weak_supervision.enabled=false" ;;
    local_bf16) echo "mode=local local.sync_dtype=bf16" ;;
    *) echo "fashion.sh: unknown variant '$1'; valid: $ALL_VARIANTS" >&2; exit 2 ;;
  esac
}

has_sync_dtype=$("$PY" -c "import dataclasses
from distlocal.config import LocalConfig
print(int('sync_dtype' in {f.name for f in dataclasses.fields(LocalConfig)}))")
"$PY" -c "from distlocal.config import DataConfig; from distlocal.data import build_datasets
build_datasets(DataConfig(name='fashion_mnist', root='/usr/share/datasets/fashion-mnist'))" \
  || { echo "fashion.sh: Fashion-MNIST is not installed: run 'make data'" >&2; exit 2; }

rm -rf "$RUNS"/convnet "$RUNS"/vgg11 "$RUNS"/resnet18
mkdir -p "$RUNS"
START=$(date -u +%Y-%m-%dT%H:%MZ); LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg); T0=$SECONDS
failed=0
for model in $MODELS; do
  variants=$VARIANTS
  if [[ "$model" != convnet ]]; then variants=$DEEP_VARIANTS; fi
  # Seeds outside, variants inside: a change of machine load spreads over every variant alike.
  for seed in $SEEDS; do
    for variant in $variants; do
      if [[ "$variant" == local_bf16 && "$has_sync_dtype" != 1 ]]; then
        [[ "$seed" == "${SEEDS%% *}" ]] && echo "fashion.sh: skipping local_bf16: this config has no local.sync_dtype"
        continue
      fi
      ov=$(overrides "$variant")
      dir="$RUNS/$model/$variant/s$seed"
      sized=""
      if [[ -n "$EPOCHS" ]]; then sized+=" trainer.epochs=$EPOCHS"; fi
      if [[ -n "$STEPS" ]]; then sized+=" trainer.max_steps_per_epoch=$STEPS"; fi
      echo "fashion.sh: [$((SECONDS - T0))s] $model $variant seed $seed"
      # shellcheck disable=SC2086  # word splitting of the overrides is intended
      if ! timeout "$RUN_TIMEOUT" "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
          launch/train.py "+experiment=fashion_$model" $ov trainer.seed="$seed" $sized $SMOKE_SCHEDULE \
          trainer.progress=false "wandb.name=fashion_${model}_${variant}_s$seed" $EXTRA \
          "hydra.run.dir=$dir" > "$RUNS/$model.$variant.s$seed.log" 2>&1; then
        echo "fashion.sh: FAILED $model $variant seed $seed (log: $RUNS/$model.$variant.s$seed.log)" >&2
        tail -5 "$RUNS/$model.$variant.s$seed.log" >&2
        failed=$((failed + 1))
      fi
    done
  done
done
TOTAL=$((SECONDS - T0)); LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
CMD="bash profiling/fashion.sh"
if [[ "${SMOKE:-0}" == 1 ]]; then CMD="SMOKE=1 $CMD"; fi
if [[ "${SMOKE:-0}" != 1 ]]; then  # name the settings that differ from the defaults
  if [[ "$SEEDS" != "0 1 2" ]]; then CMD="SEEDS=\"$SEEDS\" $CMD"; fi
  if [[ "$MODELS" != "convnet vgg11" ]]; then CMD="MODELS=\"$MODELS\" $CMD"; fi
  if [[ "$VARIANTS" != "$ALL_VARIANTS" ]]; then CMD="VARIANTS=\"$VARIANTS\" $CMD"; fi
  if [[ "$DEEP_VARIANTS" != "sgd freeze local" ]]; then CMD="DEEP_VARIANTS=\"$DEEP_VARIANTS\" $CMD"; fi
  for v in EPOCHS STEPS EXTRA; do
    if [[ -n "${!v}" ]]; then CMD="$v=\"${!v}\" $CMD"; fi
  done
fi
NOTE="Started $START, $TOTAL s in all, $NPROC ranks on $(nproc --all) CPU cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); load average (1, 5, 15 min) $LOAD_START at the start and $LOAD_END at the end (above ~$(nproc --all) the machine was shared and times are inflated)."
if [[ $failed -gt 0 ]]; then NOTE="$NOTE $failed run(s) failed and are missing from the table."; fi
"$PY" profiling/fashion_table.py "$RUNS" --doc "$DOC" --plots "$PLOTS" --command "$CMD" \
  --order $ALL_VARIANTS --note "$NOTE"
echo "fashion.sh: $TOTAL s; section rewritten in $DOC, plots in $PLOTS"
[[ $failed -eq 0 ]]
