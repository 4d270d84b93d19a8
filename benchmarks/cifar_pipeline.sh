#!/usr/bin/env bash
# The whole pipeline on CIFAR-10 (JPEG copy) ResNet-20, as docs/results.md reports it: convert the
# stem and layer1 (fitted to the trained layers' outputs), fine-tune with the channel pressure,
# prune (BatchNorm recalibration, recovery epochs), export float and int8, evaluate the exported
# files, and bench them interleaved against the unpruned network's exports. From the repository root:
#
#     DATA=cifar10:/work/data/cifar10-jpeg OUT=out/pipeline bash benchmarks/cifar_pipeline.sh
#
# Every command writes its JSON report under $OUT; $OUT/log holds everything printed. Run it alone
# on the machine: the bench at the end times latency (BENCH=0 stops before it, to run it later).
set -euo pipefail
BASE=${BASE:-benchmarks/checkpoints/resnet20-cifar10.pt}
DATA=${DATA:?give DATA=cifar10:DIR}
OUT=${OUT:-out/pipeline}
EPOCHS=${EPOCHS:-2}          # fine-tuning epochs with the pressure
SPARSITY=${SPARSITY:-0.1}    # its strength
RECOVER=${RECOVER:-1}        # recovery epochs after the prune
GP=${GP:-.venv/bin/gaborprune}
mkdir -p "$OUT" && exec > >(tee "$OUT/log") 2>&1
step() { echo; echo "### $*"; date -u +%H:%M:%S; cat /proc/loadavg; }

step "convert conv1 and layer1's six convolutions, fitted to their outputs on 1024 training images"
$GP convert "$BASE" --target conv1 --target 're:layer1\.\d\.conv\d' --data "$DATA" -o "$OUT/converted.pt" --json "$OUT/convert.json" --threads 1 --force
step "fine-tune $EPOCHS epochs with the channel pressure (sparsity $SPARSITY), lr 0.01 without warm-up"
$GP finetune "$OUT/converted.pt" --data "$DATA" --epochs "$EPOCHS" --sparsity "$SPARSITY" --structure channel --lr 0.01 --warmup-epochs 0 \
    -o "$OUT/pressed.pt" --json "$OUT/finetune.json" --threads 1 --force
step "prune at the default threshold, BatchNorm recalibration, $RECOVER recovery epoch(s)"
$GP prune "$OUT/pressed.pt" --data "$DATA" --finetune-epochs "$RECOVER" -o "$OUT/pruned.pt" --json "$OUT/prune.json" --threads 1 --force
step "export: the unpruned network and the pruned one, float and int8 (static, calibrated on training images)"
$GP export "$BASE" -o "$OUT/base.onnx" --dynamic-batch --data "$DATA" --json "$OUT/export_base.json" --threads 1 --force
$GP export "$OUT/pruned.pt" -o "$OUT/pruned.onnx" --dynamic-batch --data "$DATA" --json "$OUT/export_pruned.json" --threads 1 --force
$GP export "$BASE" -o "$OUT/base-int8.onnx" --dynamic-batch --quantize int8 --data "$DATA" --threads 1 --force
$GP export "$OUT/pruned.pt" -o "$OUT/pruned-int8.onnx" --dynamic-batch --quantize int8 --data "$DATA" --threads 1 --force
step "top-1 of the exported files in ONNX Runtime"
for f in base pruned base-int8 pruned-int8; do
  $GP eval "$OUT/$f.onnx" --data "$DATA" --json "$OUT/eval_$f.json" --force
done
[ "${BENCH:-1}" = 1 ] || { step "bench skipped (BENCH=0): run it alone on the machine"; exit 0; }
step "bench: pruned against unpruned, float and int8, batch 1 and 32, one thread, interleaved"
$GP bench "$OUT/pruned.onnx" "$OUT/pruned-int8.onnx" --baseline "$OUT/base.onnx" --baseline "$OUT/base-int8.onnx" \
    --batch-size 1,32 --threads 1 --max-seconds 120 --json "$OUT/bench.json" --force
step done
