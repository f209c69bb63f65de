#!/usr/bin/env bash
# Converged Fashion-MNIST runs (docs/results.md, "Time to accuracy"): whole epochs of the convnet
# recipe, single-process runs two at a time with one thread each (the fastest use of 2 cores),
# every variant run the same way: 1 process, global batch 64, fp32 (PRECISION=bf16 is 1.75x faster
# for SGD on this CPU, 0.14 vs 0.25 s per step, but the local rule keeps its GEMM in fp32 under
# autocast, so bf16 would handicap local), evaluation every half epoch.
#
#   PHASE=tune  bash profiling/converged.sh   # local.lr x rule on a 10 % validation split, 1 seed
#   PHASE=main  bash profiling/converged.sh   # sgd, freeze, local x SEEDS
#   PHASE=long  bash profiling/converged.sh   # sgd at LONG_EPOCHS: is EPOCHS the plateau?
#   PHASE=switch bash profiling/converged.sh  # early (after 1 epoch) vs late (after half) switch
#   PHASE=tuned bash profiling/converged.sh   # local with TUNED overrides x SEEDS
#   PHASE=lever bash profiling/converged.sh   # local with LEVER (the short-run table's best) x LEVER_SEEDS
#   PHASE=bytes bash profiling/converged.sh   # sgd, freeze, local as short 2-rank runs: bytes per step
#   python profiling/converged_table.py "$RUNS" --clock cpu --out docs/results/converged   # the table
#   python profiling/converged_table.py "$RUNS" --groups main long --targets 91 92   # time to each accuracy
#
# Environment: EPOCHS (3), LONG_EPOCHS (6), PRECISION (32), SEEDS ("0 1 2"), JOBS (2 at a time), RUNS
# (outputs/converged), TUNED (extra overrides of the tuned local variant), EVAL_EVERY (469 steps),
# EXTRA (overrides for every run), LEVER and LEVER_SEEDS (0), LONG_MODES (sgd), LONG_SEEDS (0),
# LONG_GROUP (long), BYTES_GROUP (none), LEVER_GROUP (main; long with EPOCHS=6: beside the long
# group), SWITCH_SEEDS (0) and SWITCH_VARIANTS (all four). A run whose summary.json exists is
# skipped and one with a checkpoint resumes (re-run safe).
# profiling/compare.py reads the run directories: time to a common target on --clock cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# One thread per run: process_time sums a process's threads, so a run with THREADS=2 reports CPU
# seconds that are not comparable to the one-thread runs (its accuracy is; use it for that only).
export OMP_NUM_THREADS=${THREADS:-1} WANDB_MODE=${WANDB_MODE:-disabled}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PHASE=${PHASE:-main}
EPOCHS=${EPOCHS:-3}
LONG_EPOCHS=${LONG_EPOCHS:-6}
PRECISION=${PRECISION:-32}
SEEDS=${SEEDS:-"0 1 2"}
JOBS=${JOBS:-2}
RUNS=${RUNS:-outputs/converged}
EVAL_EVERY=${EVAL_EVERY:-469}
TUNED=${TUNED:-"local.rule=softhebb local.lr=1e-3"}
# The short-run table's best lever (docs/results.md): sample_fraction=0.25 gave the largest in-run
# speedup (1.41x) at sgd's accuracy within one std.
LEVER=${LEVER:-"local.sample_fraction=0.25"}
LEVER_SEEDS=${LEVER_SEEDS:-0}
EXTRA=${EXTRA:-}
# The recipe: fashion_convnet's model and stage schedule (1 epoch of SGD, then one more local stage
# per epoch up to 3 of 6), whole epochs (937 steps), cosine lr over the whole run.
BASE="+experiment=fashion_convnet trainer.max_steps_per_epoch=null trainer.precision=$PRECISION trainer.progress=false"
if "$PY" -c "import dataclasses, sys; from distlocal.config import TrainerConfig
sys.exit(0 if 'eval_every_steps' in {f.name for f in dataclasses.fields(TrainerConfig)} else 1)"; then
  BASE+=" trainer.eval_every_steps=$EVAL_EVERY"
fi

jobs_of_phase() {  # one line per run: <run dir> <overrides...>
  case "$PHASE" in
    tune)  # short: 1 SGD epoch, then boundary 3 for one epoch, scored on the validation split
      local t="trainer.epochs=2 data.val_fraction=0.1 schedule.step=3 trainer.seed=0"
      echo "$RUNS/tune/freeze mode=freeze $t"
      for rule in softhebb oja; do for lr in 1e-3 3e-3 1e-2; do
        echo "$RUNS/tune/${rule}_$lr mode=local local.rule=$rule local.lr=$lr $t"
      done; done
      # The grid's trend (a lower rate is better, none beats freeze) continued downwards.
      echo "$RUNS/tune/softhebb_3e-4 mode=local local.rule=softhebb local.lr=3e-4 $t" ;;
    main)
      for seed in $SEEDS; do
        for mode in sgd freeze local; do
          echo "$RUNS/main/$mode/s$seed mode=$mode trainer.epochs=$EPOCHS trainer.seed=$seed"
        done
      done ;;
    long)  # the plateau check: does sgd gain more than 0.3 pt with LONG_EPOCHS? (LONG_MODES="sgd freeze local":
      # the other modes at that length too, one seed)
      # LONG_SEEDS: more seeds at that length; LONG_GROUP: the group directory, e.g. long12 for a
      # second length beside long)
      for seed in ${LONG_SEEDS:-0}; do for mode in ${LONG_MODES:-sgd}; do
        echo "$RUNS/${LONG_GROUP:-long}/$mode/s$seed mode=$mode trainer.epochs=$LONG_EPOCHS trainer.seed=$seed"
      done; done ;;
    tuned)
      for seed in $SEEDS; do
        echo "$RUNS/main/local_tuned/s$seed mode=local $TUNED trainer.epochs=$EPOCHS trainer.seed=$seed"
      done ;;
    lever)
      for seed in $LEVER_SEEDS; do
        echo "$RUNS/${LEVER_GROUP:-main}/local_lever/s$seed mode=local $LEVER trainer.epochs=$EPOCHS trainer.seed=$seed"
      done ;;
    switch)  # all 3 stages at once: after epoch 1 (early) or after half the run, rounded up (late)
      # (SWITCH_SEEDS: seeds; SWITCH_VARIANTS: a subset of freeze_early freeze_late local_early local_late)
      local half=$(((EPOCHS + 1) / 2)) seed variant mode warmup
      if ((half <= 1)); then echo "converged.sh: PHASE=switch needs EPOCHS >= 3 (early and late differ)" >&2; exit 2; fi
      for seed in ${SWITCH_SEEDS:-0}; do
        for variant in ${SWITCH_VARIANTS:-freeze_early freeze_late local_early local_late}; do
          mode=${variant%_*}
          case "$variant" in
            freeze_early|local_early) warmup=1 ;;
            freeze_late|local_late) warmup=$half ;;
            *) echo "converged.sh: unknown SWITCH_VARIANTS entry '$variant'; valid: freeze_early freeze_late local_early local_late" >&2; exit 2 ;;
          esac
          echo "$RUNS/switch/$variant/s$seed mode=$mode trainer.epochs=$EPOCHS schedule.warmup_epochs=$warmup schedule.step=3 trainer.seed=$seed"
        done
      done ;;
    bytes)  # the main recipe's schedule on 10 steps per epoch: the last epoch's bytes per step
      # (BYTES_GROUP=long EPOCHS=6: the bytes of the long group's schedule, read by its table)
      for mode in sgd freeze local; do
        echo "$RUNS/bytes/${BYTES_GROUP:+$BYTES_GROUP/}$mode mode=$mode trainer.epochs=$EPOCHS trainer.max_steps_per_epoch=10 trainer.seed=0"
      done ;;
    *) echo "converged.sh: unknown PHASE '$PHASE'; valid: tune main long switch tuned lever bytes" >&2; exit 2 ;;
  esac
}

run_one() {  # <run dir> <overrides...>
  local dir=$1; shift
  if [[ -f "$dir/summary.json" ]]; then echo "converged.sh: done already: $dir"; return 0; fi
  # A run stopped after an epoch's checkpoint (killed, machine restarted) resumes from it: the
  # checkpoint carries the clocks and time-to-accuracy points, and later metrics rows are dropped.
  local resume=() how=start
  if compgen -G "$dir/checkpoints/*.pt" > /dev/null; then resume=(resume=auto); how=resume
  else rm -rf "$dir" "$dir.log"; mkdir -p "$(dirname "$dir")"; fi
  echo "converged.sh: [$(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg)] $how $dir"
  # shellcheck disable=SC2086  # word splitting of the overrides is intended
  local launch=("$PY" launch/train.py)  # one process; the bytes phase: 2 gloo ranks
  if [[ "$dir" == */bytes/* ]]; then launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node=2 launch/train.py); fi
  if ! "${launch[@]}" $BASE "$@" $EXTRA "${resume[@]}" "hydra.run.dir=$dir" >> "$dir.log" 2>&1; then
    echo "converged.sh: FAILED $dir (log: $dir.log)" >&2; tail -3 "$dir.log" >&2; return 1
  fi
  echo "converged.sh: [$(date -u +%H:%M:%S)] done $dir: $(tail -1 "$dir.log")"
}
export -f run_one
export BASE EXTRA PY

mkdir -p "$RUNS"
{ echo "commit $(git rev-parse --short HEAD) phase $PHASE threads $OMP_NUM_THREADS started $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"; } >> "$RUNS/provenance.txt"
jobs_of_phase | xargs -P "$JOBS" -L 1 bash -c 'run_one "$@"' _
echo "ended $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUNS/provenance.txt"
