#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md in one command of at most 395 s (one H100 or H200,
# torch 2.11, no network), so that with the machine's start-up a second try after a fix still fits
# in a 15-minute lease:
#
#   OUT=/some/dir bash launch/gpu_session.sh            # default OUT=gpu-session-out
#   python3 launch/bench_train.py --record /some/dir    # afterwards: the section appended to docs/benchmarks.md
#
# Stages, most important first (a session cut short keeps what the earlier ones wrote), each under
# its own `timeout` (SIGTERM at the limit, SIGKILL 5 s later; then whatever the stage left running,
# e.g. torchrun's workers, is killed):
#   device       15 s  nvidia-smi, GPU, torch / CUDA / cuDNN versions, driver (fails without CUDA)
#   kernels      80 s  check_norm_kernels.py --quick: fused In-Place ABN kernels against the reference
#                      operations and float64, and their speed
#   train_table 110 s  bench_train.py: the training-step table; variants not started after 70 s are
#                      recorded as skipped (torch.compile ones come last); the profile of the bf16
#                      channels-last step right after it is measured
#   resume_bf16  70 s  check_resume.py: a short bf16 training of 2 ranks sharing the GPU (gloo),
#                      killed mid-step and resumed (4 launches: uninterrupted, killed, resumed, and
#                      a second uninterrupted one for CUDA's own run-to-run noise)
#   resume_fp16  60 s  the same in fp16 (the GradScaler's state; the kernels are compiled by then)
#   data         30 s  bench_data.py: DataLoader images/s with 1..16 workers, and the cores per GPU
#                      for the fastest step-0 rate of train_table
# Limits 365 s + 6 x 5 s to kill = 395 s at most.
#
# A failed or timed-out stage does not stop the next ones; the script ends with one line, e.g.
#   gpu_session: FAILED (device ok 4s, kernels ok 41s, train_table timed out 140s, ...)
# (also in $OUT/summary.txt, rewritten after each stage) and exits 1 if any stage did not succeed.
#
# Everything goes to $OUT only: <stage>.txt (each stage's console output, first line "+ <command>"),
# run.json, results.jsonl, table.md and profile.txt (train_table), resume/ (check_resume.py's
# results and logs) and summary.txt. Nothing in the checkout is written: `--record` does that later,
# from these files.
#
# GPU_SESSION_STAGES=kernels,resume_fp16 runs only the stages named (e.g. a retry after a fix).
# PYTHON (default python3) is the interpreter.
# GPU_SESSION_DRY_RUN=1 runs every stage at toy size on the CPU: the eager fused formulation, one
# resnet18 variant at 64 px, check_resume.py --dry_run (reference operations; its 3 launches of 2
# ranks take about 90 s per precision on 2 cores, so its limit is 240 s there), 16 small images.
# About 25 s plus check_resume.py's; tests/test_gpu_session.py runs it with a stand-in for that.
set -uo pipefail
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # before the cd below: OUT is relative to the caller
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAGES=${GPU_SESSION_STAGES:-device,kernels,train_table,resume_bf16,resume_fp16,data}
DRY_RUN=${GPU_SESSION_DRY_RUN:-0}
export PYTHONUNBUFFERED=1
# Seconds per stage (see above), and after a stage's limit, the seconds until SIGKILL.
declare -A LIMIT=([device]=15 [kernels]=80 [train_table]=110 [resume_bf16]=70 [resume_fp16]=60 [data]=30)
KILL_AFTER=5

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    export OMP_NUM_THREADS=1
    KERNELS_ARGS=(--quick --device cpu --eager --shape 2,8,8,8 --repeats 1)
    TRAIN_ARGS=(--quick --device cpu --variants ours-iabn/os16/bf16/cl/step0)
    # Toy runs still launch train.py 3 times with 2 ranks: about 90 s on 2 CPU cores. Reference
    # operations: compiling the fused kernels for the CPU would take minutes more.
    RESUME_ARGS=(--dry_run --device cpu --norm_kernels auto)
    LIMIT[resume_bf16]=240 LIMIT[resume_fp16]=240
    DATA_ARGS=(--num_images 16 --width 80 --height 60 --crop_size 48 --repeats 1 --workers 0,1 --batch_size 4
               --loader_images 16)
else
    DEVICE=cuda
    KERNELS_ARGS=(--quick --device cuda)
    TRAIN_ARGS=(--device cuda)
    RESUME_ARGS=(--device cuda)
    DATA_ARGS=(--num_images 120 --repeats 1 --workers 1,2,4,8,16 --loader_images 480)
fi

DEVICE_INFO='
import platform, shutil, subprocess, sys
import torch
if shutil.which("nvidia-smi"):
    subprocess.run(["nvidia-smi"], check=False)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"Python {platform.python_version()}")
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.split()
    print(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}, "
          f"{torch.cuda.device_count()} GPU(s), driver {driver[0] if driver else None}")
elif sys.argv[1] == "cuda":
    sys.exit("gpu_session: CUDA is not available to torch")
else:
    print(f"device: CPU ({torch.get_num_threads()} threads)")
'

bound=0
for name in ${STAGES//,/ }; do
    [ -n "${LIMIT[$name]:-}" ] || { echo "gpu_session: unknown stage $name in GPU_SESSION_STAGES" >&2; exit 2; }
    bound=$((bound + LIMIT[$name] + KILL_AFTER))
done
start=$SECONDS
summary=()
failed=0

write_summary() {  # after each stage, so that a session killed from outside leaves how far it got
    local stages
    stages=$(printf '%s, ' "${summary[@]}")
    echo "gpu_session: $1 (${stages%, })" >"$OUT/summary.txt"
}

# Kill what a stage left running: torchrun starts its workers in sessions of their own, which
# timeout's process-group signal misses. They carry the stage's marker in their environment.
reap() {
    local environ pid
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        if grep -qzx "GPU_SESSION_STAGE=$1" "$environ" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; fi
    done
}

# stage NAME COMMAND...: runs COMMAND under its timeout, its output to the console and $OUT/NAME.txt.
stage() {
    local name=$1 limit=${LIMIT[$1]} began=$SECONDS rc status
    shift
    [[ ",$STAGES," == *",$name,"* ]] || return 0
    echo "=== $name (at most ${limit} s; $((SECONDS - start)) s into the session)"
    echo "+ $*" >"$OUT/$name.txt"
    GPU_SESSION_STAGE="$$-$name" timeout -k "$KILL_AFTER" "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    reap "$$-$name"
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;  # SIGTERM at the limit, SIGKILL $KILL_AFTER s later
        *) status="failed ($rc)" ;;
    esac
    [ "$rc" = 0 ] || failed=1
    summary+=("$name $status $((SECONDS - began))s")
    write_summary running
}

echo "gpu_session: stages $STAGES, at most $bound s; outputs in $OUT"
stage device "$PYTHON" - "$DEVICE" <<<"$DEVICE_INFO"
stage kernels "$PYTHON" launch/check_norm_kernels.py "${KERNELS_ARGS[@]}"
stage train_table "$PYTHON" launch/bench_train.py "${TRAIN_ARGS[@]}" --output_dir "$OUT" --time_budget 70 \
    --profile ours-iabn/os16/bf16/cl/step0
for amp in bf16 fp16; do
    stage "resume_$amp" "$PYTHON" launch/check_resume.py --amp "$amp" --nproc 2 "${RESUME_ARGS[@]}" \
        --channels_last --dist_backend gloo --output_dir "$OUT/resume"
done
stage data "$PYTHON" launch/bench_data.py "${DATA_ARGS[@]}" --step_rate_from "$OUT/results.jsonl"

if [ "$failed" = 0 ]; then result=ok; else result=FAILED; fi
write_summary "$result"
cat "$OUT/summary.txt"
exit "$failed"
