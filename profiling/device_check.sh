#!/usr/bin/env bash
# The whole GPU story in one command (issue 20; docs/profiling.md, "device_check.sh"):
#
#   bash profiling/device_check.sh                  # one CUDA GPU: ~8 min (estimate, see docs)
#   DEVICE=cpu bash profiling/device_check.sh       # a tiny version on CPU (< 2 min): the script cannot rot
#
# Writes under $OUT (default docs/bench/device): bench_*.json (profiling/bench.py: ResNet-18 and
# ResNet-50, batch 64 and 256, fp32 and bf16, with and without local.compile, boundaries mid and
# deepest: sgd, local, frozen and ideal, CUDA-event times and max_memory_allocated), train/ (a
# 1-GPU run with the profiler on: in-run speedup, footprint by category), speedup_check.json,
# syncs.json (host syncs under torch.cuda.set_sync_debug_mode("warn")), memory.json and
# memory_{local,sgd}.pickle (allocator snapshots of one local and one SGD step), then
# summary.json and summary.md (the tables and the issue's GPU targets, met or not).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-docs/bench/device}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=disabled
mkdir -p "$OUT"

if [ "$DEVICE" = cpu ]; then
  # The smallest run of every part (about a minute of CPU time; tests/test_device_check.py):
  # convnet at 16x16, the same code paths as the ResNets at a fraction of their CPU time; no compile
  # (its first compile takes minutes on CPU; tests/test_compile.py covers it); speedup_check.py at
  # its minimum (2 epochs: the boundary moves at epoch 1), 8 steps an epoch. Its figures are noise.
  MODELS="convnet"; BATCHES="8"; PRECISIONS="32"; COMPILE="off"; SHAPE=3,16,16; STEPS=1; WARMUP=1
  TRAIN=(trainer.batch_size=8 data.train_size=64 data.test_size=16 trainer.epochs=2
         trainer.max_steps_per_epoch=4 model=convnet)
  CHECK=(--batch 8 --warmup 2 --steps 4 --set model=convnet "data.shape=[${SHAPE}]")
  SPEEDUP=(--epochs 2 --rounds 1 --levers update_every=1 --max-steps-per-epoch 8)
elif [ "$DEVICE" = cuda ]; then
  MODELS="resnet18 resnet50"; BATCHES="64 256"; PRECISIONS="32 bf16"; COMPILE="off on"; SHAPE=3,32,32
  STEPS=10; WARMUP=3
  TRAIN=(trainer.batch_size=256 data.train_size=25600 data.test_size=256 trainer.epochs=3
         trainer.max_steps_per_epoch=100 model=resnet18)
  CHECK=(--batch 64 --warmup 5 --steps 50 --set model=resnet18)
  SPEEDUP=(--epochs 3 --rounds 1)
else
  echo "distlocal: error: DEVICE=$DEVICE; use DEVICE=cuda (default) or DEVICE=cpu" >&2; exit 2
fi

step() { echo "== $(date +%T) $*" >&2; }

# 1. bench.py: every model, batch, precision and compile setting, at the mid and deepest boundary.
for model in $MODELS; do
  n=$("$PY" -c "from distlocal.models import build_model; print(build_model('$model', (${SHAPE}), 10).num_stages)")
  bounds="$(( (n - 1) / 2 )),$(( n - 1 ))"
  for batch in $BATCHES; do
    for prec in $PRECISIONS; do
      for comp in $COMPILE; do
        flags=(); warm=$WARMUP
        if [ "$comp" = on ]; then flags=(--compile); warm=$(( WARMUP + 2 )); fi
        step "bench $model b$batch $prec compile=$comp boundaries $bounds"
        "$PY" profiling/bench.py --model "$model" --data-shape "$SHAPE" --classes 10 --batch-size "$batch" \
          --steps "$STEPS" --warmup "$warm" --device "$DEVICE" --precision "$prec" --boundaries "$bounds" \
          "${flags[@]}" --json "$OUT/bench_${model}_b${batch}_${prec}_compile-${comp}.json" > /dev/null
      done
    done
  done
done

# 2. A training run with the profiler on: in-run speedup, footprint by category (train/summary.json).
step "training run"
rm -rf "$OUT/train"
"$PY" launch/train.py data=synthetic "data.shape=[${SHAPE}]" data.num_classes=10 schedule=static \
  schedule.warmup_epochs=1 schedule.step=5 "trainer.device=$DEVICE" \
  trainer.progress=false checkpoint.enabled=false profiler.enabled=true wandb.mode=disabled \
  "hydra.run.dir=$OUT/train" \
  "${TRAIN[@]}" > "$OUT/train.log" 2>&1

# 3. Does the reported speedup match what the run saves?
step "speedup_check"
"$PY" profiling/speedup_check.py "${SPEEDUP[@]}" --json "$OUT/speedup_check.json" > /dev/null

# 4. Host syncs in steady state, one local step's memory next to one SGD step's, then the summary
# (one process: the trainer is imported once).
step "host syncs, memory snapshots, summary"
"$PY" profiling/device_check.py syncs memory summary --device "$DEVICE" --out "$OUT" "${CHECK[@]}"
