#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run on a machine with a CUDA GPU (its python3 holding torch,
# torchvision, onnx, onnxruntime, typer, rich and scikit-learn). From the repository root:
#
#     OUT=out/gpu bash benchmarks/gpu_session.sh
#     OUT=out/gpu CIFAR_TGZ=data/cifar10-jpeg.tar.gz CIFAR_EPOCHS=60 bash benchmarks/gpu_session.sh   # + the CIFAR-10 runs
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

# -- CIFAR-10 (JPEG copy), when the archive travels with the run: CIFAR_TGZ=path/to/cifar10-jpeg.tar.gz --
if [ -n "${CIFAR_TGZ:-}" ] && [ -f "$CIFAR_TGZ" ]; then
  C10=/tmp/cifar10; mkdir -p $C10 && tar -xzf "$CIFAR_TGZ" -C $C10; D=cifar10:$C10/cifar10-jpeg
  E=${CIFAR_EPOCHS:-60}
  step "plain resnet20 on CIFAR-10 (JPEG copy), $E epochs, lr 0.1, batch 128"
  timeout 420 $PY -m gaborprune finetune resnet20 --data $D --epochs $E --lr 0.1 -o $OUT/resnet20-cifar10.pt --force --json "$OUT/resnet20_cifar10.json"
  step "its stem converted with --data, then one fine-tuning epoch (trained defaults)"
  timeout 120 $PY -m gaborprune convert $OUT/resnet20-cifar10.pt --target conv1 --target 're:layer1\.\d\.conv\d' --data $D -o /tmp/r20g.pt --force --json "$OUT/convert_cifar10.json"
  timeout 120 $PY -m gaborprune finetune /tmp/r20g.pt --data $D --epochs 1 -o /tmp/r20g1.pt --force --json "$OUT/convert_finetune_cifar10.json"
  step "the paper's altered ResNet-20 and VGG-16 first layer, one seed, $E epochs (the paper: 160)"
  timeout 600 $PY -m gaborprune reproduce resnet20-altered-cifar10 --data $D --epochs $E --seeds 1 --out $OUT/r20a-repro
  timeout 600 $PY -m gaborprune reproduce vgg16-cifar10 --data $D --epochs $E --seeds 1 --out $OUT/vgg16-repro
fi

step done
