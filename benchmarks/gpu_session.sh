#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run on a machine with a CUDA GPU (its python3 holding torch,
# torchvision, onnx, onnxruntime, typer, rich and scikit-learn). From the repository root:
#
#     OUT=out/gpu bash benchmarks/gpu_session.sh
#
# Writes $OUT/log (everything printed) and the benchmarks' JSON. Each step has its own time limit and
# a failing step does not stop the next.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}
PY=${PY:-python3}
mkdir -p "$OUT" && exec > >(tee "$OUT/log") 2>&1
step() { echo; echo "### $*"; date -u +%H:%M:%S; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
nproc; $PY -c "import torch, torchvision, onnxruntime, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__,
'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

step "tests/test_gpu.py (CUDA vs CPU oracles, finetune on CUDA then eval/prune/export on CPU)"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py

step "training step: plain vs Gabor banks, bf16 + channels_last; with the penalty, its kernels recomputed vs reused"
timeout 150 $PY benchmarks/bench_train_step.py --device cuda --batch-size 256 --steps 50 --warmup 10 --sparsity 0.01 --json "$OUT/train_step_cuda.json"

step "CADA vs depthwise on the GPU"
timeout 90 $PY benchmarks/bench_cada.py --device cuda --batch 128 --channels 128 --repeats 50 --json "$OUT/cada_cuda.json"

step "gaborprune finetune on fake:50000 (3x32x32): plain resnet20, then its first 3 convolutions as Gabor banks"
timeout 120 $PY -m gaborprune finetune resnet20 --data fake:50000 --epochs 3 --batch-size 256 -o /tmp/plain.pt --force --json "$OUT/finetune_plain.json"
$PY -m gaborprune convert resnet20 --layers 3 --init random -o /tmp/c.pt --force
timeout 120 $PY -m gaborprune finetune /tmp/c.pt --data fake:50000 --epochs 3 --batch-size 256 --sparsity 0.01 -o /tmp/g.pt --force --json "$OUT/finetune_gabor.json"

step "the same Gabor run with --compile"
timeout 200 $PY -m gaborprune finetune /tmp/c.pt --data fake:50000 --epochs 3 --batch-size 256 --sparsity 0.01 --compile -o /tmp/gc.pt --force --json "$OUT/finetune_gabor_compile.json"
step "cada-ablation on CUDA (bf16 autocast through CADA blocks), three settings, one seed"
timeout 200 $PY -m gaborprune reproduce cada-ablation --data digits --settings dw7,cada7,cada7-none --out /tmp/abl --force

step done
