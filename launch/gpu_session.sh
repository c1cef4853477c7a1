#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one run: about 9 minutes on one H100 or H200.
#
#   1. launch/check_norm_kernels.py --quick: the fused In-Place ABN kernels against the reference
#      operations and float64 on CUDA, and their speed (at most 2 minutes);
#   2. launch/bench_train.py: the training-step table (DeepLabV3-R101 OS16, 512x512, batch 12;
#      variants not started after 270 s are recorded as skipped, torch.compile ones come last),
#      appended to docs/benchmarks.md, with a torch.profiler table of the bf16 channels_last step;
#   3. launch/bench_data.py: DataLoader images/s with 1..16 workers and the cores per GPU needed
#      for the fastest step-0 rate measured in 2.
#
# Everything lands in $OUT (default gpu-session-out/): the logs, results.jsonl, table.md,
# profile.txt and the updated benchmarks.md. Usage: OUT=/some/dir bash launch/gpu_session.sh
# CHECK_ARGS, BENCH_TRAIN_ARGS and DATA_ARGS replace or extend the scripts' arguments (e.g. a CPU
# dry run of this file: BENCH_TRAIN_ARGS="--quick --variants ..." with smaller DATA_ARGS).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
CHECK_ARGS=${CHECK_ARGS:---quick}
BENCH_TRAIN_ARGS=${BENCH_TRAIN_ARGS:-}
DATA_ARGS=${DATA_ARGS:---num_images 200 --repeats 2 --workers 1,2,4,8,16}
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "=== $1 ($(( $(date +%s) - start )) s)"; }

stamp "device"
{ nvidia-smi; "$PYTHON" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version())"; } \
    2>&1 | tee "$OUT/device.txt"

stamp "fused In-Place ABN kernels vs reference"
timeout 150 "$PYTHON" launch/check_norm_kernels.py $CHECK_ARGS 2>&1 | tee "$OUT/check_norm_kernels.txt"

stamp "training step"
timeout 390 "$PYTHON" launch/bench_train.py --output_dir "$OUT" --append_docs docs/benchmarks.md \
    --time_budget 270 --profile ours-iabn/os16/bf16/cl/step0 $BENCH_TRAIN_ARGS 2>&1 | tee "$OUT/bench_train.log"
cp docs/benchmarks.md "$OUT/benchmarks.md"

stamp "data pipeline"
step_rate=$("$PYTHON" - "$OUT/results.jsonl" <<'PY'
import json, sys
try:
    rows = [json.loads(line) for line in open(sys.argv[1])]
except OSError:
    rows = []
rates = [r["images_per_s"] for r in rows if r.get("model") == "ours" and r.get("step") == 0 and r.get("images_per_s")]
print(f"{max(rates):.0f}" if rates else "200")
PY
)
timeout 90 "$PYTHON" launch/bench_data.py $DATA_ARGS --step_rate "$step_rate" 2>&1 | tee "$OUT/bench_data.txt"
stamp "done"
