#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with what bench/gpu_run.sh needs on a GPU machine
# that has no bitsandbytes and no ../shared: the bitsandbytes wheel (checked
# for its CUDA kernels) and the alpaca records. Carry .whl with the run.
set -eu -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
BNB=${BNB_VERSION:-0.50.2}
mkdir -p .whl
ls .whl/bitsandbytes-"$BNB"-*.whl >/dev/null 2>&1 \
  || "$PY" -m pip download -q --no-deps "bitsandbytes==$BNB" -d .whl/
wheel=$(ls .whl/bitsandbytes-"$BNB"-*.whl | head -1)
kernels=$(unzip -l "$wheel" | grep -c 'libbitsandbytes_cuda.*\.so' || true)
if [ "$kernels" -lt 1 ]; then
  echo "gpu_prepare: $wheel holds no CUDA kernels (libbitsandbytes_cuda*.so)" >&2
  exit 1
fi
echo "gpu_prepare: $wheel: $kernels CUDA kernel libraries:" \
  "$(unzip -l "$wheel" | grep -o 'libbitsandbytes_cuda[0-9]*' | sed 's/libbitsandbytes_//' | tr '\n' ' ')"
# TRL's SFTTrainer side: trl and datasets with the two of their needs the GPU
# image lacks (its python is 3.12: multiprocess ships one wheel per version)
TRL_PKGS=${TRL_PKGS:-"trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"}
if [ -n "$TRL_PKGS" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl/ $TRL_PKGS \
    || echo "gpu_prepare: TRL wheels not fetched: the TRL side will be skipped"
fi
data=../shared/datasets/alpaca/alpaca_data_first2000.json
if [ -f "$data" ]; then
  cp "$data" .whl/
  echo "gpu_prepare: copied $(basename "$data") into .whl/"
else
  echo "gpu_prepare: $data not found: the benchmark will use synthetic tokens"
fi
du -sh .whl
