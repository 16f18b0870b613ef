#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in one go (a few minutes):
# 124M training at BATCH_SIZE=64 SEQ_LENGTH=1024 in bf16 with torch.compile, HellaSwag scoring of
# the real rows, and generation with and without the key/value cache.
# Prepare the machine's files as bench/gpu_env.sh says, then run `bash bench/gpu.sh` there.
# (bench/gpu_check.sh checks that every CUDA path works; this measures speed.)
# The JSON records land in bench/results/ (and in $OUT when that is set).
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

python3 -m bench.bench_matmul_peak --device cuda --size 8192 --repeats 3
# --baseline 0: a second compiled model would double the compile time; the GPU goal is MFU
python3 -m bench.bench_train --device cuda --configs 124M --batch-size 64 --seq-length 1024 \
  --warmup 3 --steps 5 --repeats 3 --baseline 0
python3 -m bench.bench_hellaswag --device cuda --configs 124M --rows 916 --repeats 2
python3 -m bench.bench_generate --device cuda

if [ -n "${OUT:-}" ]; then cp bench/results/*.json "$OUT"/; fi
