#!/usr/bin/env bash
# Every CUDA path of the real scripts, checked in one short call on a lent GPU (sized to end within
# 4 minutes on an H100): bench/gpu_check.py says which steps, and how to choose some of them.
#   bash bench/gpu_check.sh                  # on the GPU machine, prepared as bench/gpu_env.sh says
#   bash bench/gpu_check.sh train evaluate   # those steps, and the steps they need
#   bash bench/gpu_check.sh --dry-run        # the same sequence, tiny, on this machine's CPU
# The table, the JSON record and every step's output land in bench/results/ (and in $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
case " $* " in
  *" --dry-run "*) ;;  # the local environment has the tokenizer, and the dry run finds its own HellaSwag rows
  *) source bench/gpu_env.sh ;;
esac
exec python3 -m bench.gpu_check "$@"
