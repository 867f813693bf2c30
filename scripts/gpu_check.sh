#!/usr/bin/env bash
# The GPU check: every GPU-only measurement of polyattn in one call, written into one folder.
#
#   scripts/gpu_check.sh [OUT]            on a machine with a CUDA GPU (sized for 8 minutes on an H100; not yet run on one)
#   scripts/gpu_check.sh --dry-run [OUT]  on CPU: each step starts and runs at toy size
#
# Steps (each logged to OUT/<step>.log, its exit status and seconds to OUT/summary.txt; a failing
# step does not stop the next):
#   env       GPU, driver, torch, triton
#   tests     pytest -m gpu: triton, sdpa, linear (and varlen where present) against the reference,
#             fp32 and bf16, values and gradients, masks, causal
#   kernels   polyattn kernels for the GPU's target: registers, spills, shared memory of every config
#   bench     polyattn bench --config configs/bench/gpu.yaml: x^p/sqrt(N) under triton and linear
#             against SDPA softmax (FlashAttention), fwd, bwd and fwd+bwd, causal and not
#   vit_small polyattn bench --model vit_small: training-step throughput
# Environment: STEP_TIMEOUT (seconds per step, default 420), KERNEL_TARGETS (default: the GPU's own,
# sm_90 without a GPU), PYTHON (default python).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
OUT="${1:-${OUT:-runs/gpu_check}}"
PY="${PYTHON:-python}"
STEP_TIMEOUT="${STEP_TIMEOUT:-420}"
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: run scripts/gpu_check.sh --dry-run to check that every step starts" >&2
  exit 2
fi

step() {  # step NAME COMMAND...: run with a timeout, log, record status and seconds
  local name="$1"
  shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
}

step env bash -c "nvidia-smi || true; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; git log -1 --oneline"

if [ "$DRY" = 1 ]; then
  TARGETS="${KERNEL_TARGETS:-sm_90}"
  step tests env POLYATTN_GPU_TEST_DEVICE=cpu "$PY" -m pytest tests/test_gpu.py -m gpu -q -rs -k "sdpa and fp32" \
    --junitxml="$OUT/tests.xml"
  step kernels "$PY" -m polyattn kernels --target "$TARGETS" --quick --out "$OUT/kernels" --no-progress
  step bench "$PY" -m polyattn bench --config configs/bench/gpu.yaml --device cpu --dtype float32 --ns 128 \
    --ds 16 --ps 3 --repeats 1 --no-plots --no-progress --out "$OUT/bench"
  step vit_small "$PY" -m polyattn bench --model vit_small --config configs/bench/vit_small_gpu.yaml --device cpu \
    --img-size 32 --batch-size 2 --steps 1 --amp off --no-progress --out "$OUT/vit_small"
else
  TARGETS="${KERNEL_TARGETS:-$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"sm_{a}{b}")')}"
  step tests "$PY" -m pytest -m gpu -q -rs --junitxml="$OUT/tests.xml"
  step kernels "$PY" -m polyattn kernels --target "$TARGETS" --out "$OUT/kernels" --no-progress
  step bench "$PY" -m polyattn bench --config configs/bench/gpu.yaml --no-progress --out "$OUT/bench"
  step vit_small "$PY" -m polyattn bench --model vit_small --config configs/bench/vit_small_gpu.yaml --no-progress \
    --out "$OUT/vit_small"
fi

echo "wrote $OUT (summary.txt, one log per step, kernels/, bench/, vit_small/)"
if grep -q ": exit [^0]" "$OUT/summary.txt"; then
  exit 1
fi
