#!/usr/bin/env bash
# The one prepared command for a lent GPU: the carried wheels (bitsandbytes,
# TRL), bench/gpu.py under a wall-clock cap, then the GPU tests; all under $OUT.
#
#   here, once:   bash bench/gpu_prepare.sh          (fills .whl/: wheels + alpaca)
#   on the GPU:   bash bench/gpu_run.sh              (carry: .whl)
#
# Budget (a lease is 15 min of device time in all, 10 min a command, the start
# included): the benchmark starts no row after BENCH_LIMIT s and is killed at
# BENCH_CAP s (240/300 s), the tests at TEST_CAP s (150 s): one run ends within
# ~8 min at worst, install included (~6 expected), so with the machine's start
# a rerun of the tests or of a few rows (GPU_RUN_PARTS, BENCH_EXTRA) still fits.
# Works without the repo's .venv (the machine's python3 with torch,
# transformers, peft, accelerate; loralab from src/ via PYTHONPATH).
# GPU_RUN_DRY=1 runs the same script on a CPU (bench --dry-run; GPU tests skip).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out/gpu}
mkdir -p "$OUT"
DRY=${GPU_RUN_DRY:-0}
BENCH_LIMIT=${BENCH_LIMIT:-240}
BENCH_CAP=${BENCH_CAP:-300}
TEST_CAP=${TEST_CAP:-150}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
SITE=/tmp/loralab-site
PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
install() {  # carried wheels into $SITE: all at once, else one by one (a misfit is skipped)
  local pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
             --upgrade --target "$SITE")
  "${pip[@]}" .whl/*.whl 2>/dev/null && return
  for wheel in .whl/*.whl; do
    "${pip[@]}" "$wheel" || echo "gpu_run: $wheel did not install" | tee -a "$OUT/env.txt"
  done
}
if [ "$DRY" != 1 ] || [ "${GPU_RUN_INSTALL:-0}" = 1 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    install
    PYTHONPATH=$PYTHONPATH:$SITE
  fi
  "$PY" -c "import bitsandbytes" 2>/dev/null || echo "gpu_run: no bitsandbytes (run" \
    "bench/gpu_prepare.sh here, carry .whl): the QLoRA rows and tests will fail" | tee -a "$OUT/env.txt"
fi
export PYTHONPATH

{
  echo "python: $PY ($("$PY" --version 2>&1))"
  nvidia-smi 2>&1 | head -20 || true
  "$PY" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "loralab"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as err:  # noqa: BLE001
        print(name, "not importable:", type(err).__name__, err)
EOF
} >>"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

BENCH_ARGS=(--out "$OUT" --time-limit "$BENCH_LIMIT")
TEST_ARGS=(-m gpu)
if [ "$DRY" = 1 ]; then
  BENCH_ARGS+=(--dry-run)
  TEST_ARGS+=(tests/test_gpu.py)  # the dry run proves the wiring; collection of all is the lead's
else
  TEST_ARGS+=(tests --continue-on-collection-errors)
fi

# a rerun can take one part, or fewer rows: GPU_RUN_PARTS=tests, or
# BENCH_EXTRA="--models llama-3.1-8b --methods lora" (added to bench/gpu.py's options)
PARTS=${GPU_RUN_PARTS:-bench tests}
read -r -a EXTRA <<<"${BENCH_EXTRA:-}"
bench_rc=skipped test_rc=skipped
if [[ " $PARTS " == *" bench "* ]]; then
  echo "== bench/gpu.py ${BENCH_ARGS[*]} ${EXTRA[*]} (cap ${BENCH_CAP}s)"
  timeout -k 15 "$BENCH_CAP" "$PY" bench/gpu.py "${BENCH_ARGS[@]}" "${EXTRA[@]}" 2>&1 \
    | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi
if [[ " $PARTS " == *" tests "* ]]; then
  echo "== pytest ${TEST_ARGS[*]} (cap ${TEST_CAP}s)"
  timeout -k 15 "$TEST_CAP" "$PY" -m pytest "${TEST_ARGS[@]}" -q -rs -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.log"
  test_rc=${PIPESTATUS[0]}
fi

echo "gpu_run: bench exit $bench_rc, tests exit $test_rc (124: hit its cap); files in $OUT"
[[ "$bench_rc" =~ ^(0|skipped)$ && "$test_rc" =~ ^(0|skipped)$ ]]
