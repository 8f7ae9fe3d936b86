#!/usr/bin/env bash
# The one-call GPU run: bash benchmarks/gpu_run.sh [--dry-run] STAGE, STAGE one of
#   check    nvidia-smi and versions; build the CUDA extension (timed); recvit check --device cuda;
#            compute-sanitizer memcheck and racecheck on benchmarks/sanitize_ops.py; pytest -m gpu -x
#   bench    the headline: Base, bf16, 224 px, paper profile, batch 1/8/256, every implementation
#   sweep    Tiny and Small (bf16, every depth profile, batch 1-256), Base in fp16; peak memory; a Base
#            training step in bf16 (benchmarks/train_step.py)
#   profile  one forward per implementation under the torch profiler, ncu on the triton and cuda
#            forwards; summarised per kernel in profile/profile.md and profile/ncu.md
# Each stage is one call of the device tool, under 9 minutes (GPU_RUN_BUDGET_S, default 530 s): every
# step runs under `timeout`, capped by what is left of the budget, its output in logs/STEP.log. At
# the end everything is packed into $OUT/gpu_run-STAGE.tar.gz, and $OUT/summary-STAGE.txt (also
# printed last) lists each step's status and time and the lines that matter.
# --dry-run: the same steps on this machine's CPU at toy sizes; the steps that need the GPU machine
# (nvidia-smi, the build, compute-sanitizer, ncu) are shown, not run. CI runs it (tests/test_gpu_run.py).
# Environment: OUT (default: a new temporary folder), PYTHON (default python3), GPU_RUN_BUDGET_S,
# RECVIT_COMMIT (recorded in the summary: the device machine's copy has no .git), CHECK_ARGS (extra
# arguments of recvit check, e.g. --quick).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_run.sh [--dry-run] check|bench|sweep|profile" >&2; exit 2; }
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
[[ $# -eq 1 ]] || usage
STAGE=$1
case "$STAGE" in check|bench|sweep|profile) ;; *) usage ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-530}
RESERVE=20  # seconds kept for packing
if [[ -z ${OUT:-} ]]; then OUT=$(mktemp -d); fi
mkdir -p "$OUT"
NAME=gpu_run-$STAGE
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT  # what matters is packed into $OUT
WORK=$SCRATCH/$NAME
LOGS=$WORK/logs
mkdir -p "$LOGS"
STEPS=$WORK/steps.txt
: > "$STEPS"
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
for tool in nvcc compute-sanitizer ncu; do  # not always on PATH: CUDA's and Nsight Compute's folders
    command -v "$tool" > /dev/null && continue
    for dir in /usr/local/cuda/bin /opt/nvidia/nsight-compute/*; do
        if [[ -x $dir/$tool ]]; then PATH=$PATH:$dir; break; fi
    done
done

# step NAME CAP CMD...: CMD under timeout (CAP s, or what the budget leaves), output in logs/NAME.log.
step() {
    local name=$1 cap=$2 left limit start rc status
    shift 2
    left=$((BUDGET - SECONDS - RESERVE))
    limit=$((cap < left ? cap : left))
    if ((limit < 10)); then
        printf '%-16s %-24s\n' "$name" "skipped: budget spent" >> "$STEPS"
        echo "== $name: skipped, the budget is spent"
        FAILED=1
        return 1
    fi
    echo "== $name (at most ${limit}s): $*"
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out (${limit}s)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%-16s %-24s %5ss\n' "$name" "$status" "$((SECONDS - start))" >> "$STEPS"
    echo "   $status after $((SECONDS - start))s"
    ((rc == 0)) || FAILED=1
    return $rc
}

# gpu_step NAME CAP CMD...: a step that needs the GPU machine; --dry-run shows it instead.
gpu_step() {
    if ((DRY)); then
        printf '%-16s %-24s\n' "$1" "dry run: not run" >> "$STEPS"
        echo "== $1 (dry run, not run): ${*:3}" | tee -a "$LOGS/dry-run.log"
        return 0
    fi
    step "$@"
}

versions() {
    for tool in nvidia-smi nvcc ncu compute-sanitizer; do
        if command -v "$tool" > /dev/null; then
            echo "--- $tool"
            case $tool in
                nvidia-smi) nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
                    --format=csv ;;
                *) "$tool" --version | tail -n 2 ;;
            esac
        else
            echo "--- $tool: not found"
        fi
    done
    echo "--- python"
    "$PY" - <<'EOF'
import platform
from importlib import metadata
import torch

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version('triton')}, GPU: {gpu}")
print(", ".join(f"{name} {version(name)}" for name in
                ("timm", "pytest", "pytest-timeout", "ninja", "setuptools", "pybind11", "matplotlib")))
EOF
}

# The CUDA extension, timed: "8.0;9.0+PTX" (setup.py's default) in the check stage, the GPU's own
# architecture in the others (half the compile). The package is installed editable, without
# build isolation (torch must be visible) and without dependencies (no network there).
build() {
    local arch=$1
    if gpu_step build 240 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -v -e .; then
        ((DRY)) || step import-ext 60 "$PY" -c "import recvit_kernels.cuda._C as ext; print(ext.__file__)"
    fi
}

native_arch() {
    "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "8.0;9.0"
}

echo "gpu_run.sh $STAGE$( ((DRY)) && echo ' --dry-run'): budget ${BUDGET}s, results packed into $OUT"
export -f versions
export PY
step versions 60 bash -c versions

BENCH=("$PY" -m recvit bench --full --no-progress)
# The implementations, read from the bench CLI's help: the torch.compile baselines are timed in a
# step of their own, after the others, so that minutes of compiling cannot cost the headline.
implementations() {
    COLUMNS=10000 "$PY" -m recvit bench --help | grep -o 'subset of: .*' | cut -d: -f2 | tr -d ' ' | tr ',' '\n'
}
export -f implementations
FAST=() COMPILED=()
if [[ $STAGE == bench || $STAGE == sweep ]]; then
    step implementations 60 bash -c implementations
    mapfile -t FAST < <(grep -v '+compile$' "$LOGS/implementations.log")
    mapfile -t COMPILED < <(grep '+compile$' "$LOGS/implementations.log")
    echo "   timed first: ${FAST[*]}; then: ${COMPILED[*]}"
fi
# --dry-run: Tiny at 32 px, batch 2 (no latency percentiles), one thread, two implementations
TOY=(--cpu --scales tiny --dtypes fp32 --img-sizes 32 --batch-sizes 2 --implementations deit-dense packed
     --target-s 0.01 --threads 1 --no-plots)
case $STAGE in
check)
    build "8.0;9.0+PTX"
    if ((DRY)); then
        step check 120 "$PY" -m recvit check --device cpu --quick --only depth_sort pack --json "$WORK/check.json"
        step sanitize-ops 120 "$PY" benchmarks/sanitize_ops.py --device cpu
        step pytest-gpu 120 "$PY" -m pytest -m gpu -q tests --collect-only -p no:cacheprovider
    else
        # shellcheck disable=SC2086  # CHECK_ARGS is a list of words
        step check 200 "$PY" -m recvit check --device cuda --json "$WORK/check.json" ${CHECK_ARGS:-}
        # The caching allocator would hide out-of-bounds accesses inside its pooled blocks.
        for tool in memcheck racecheck; do
            step "$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
                --error-exitcode 1 "$PY" benchmarks/sanitize_ops.py --device cuda
        done
        # Per test: pytest-timeout's --timeout where the plugin imports; `timeout` bounds the whole run.
        PER_TEST=()
        if "$PY" -c "import pytest_timeout" 2> /dev/null; then PER_TEST=(--timeout 120); fi
        step pytest-gpu 300 "$PY" -m pytest -m gpu -x -q -rfEs -p no:cacheprovider "${PER_TEST[@]}" tests
    fi
    ;;
bench)
    build "$(native_arch)"
    if ((DRY)); then
        step bench 120 "${BENCH[@]}" "${TOY[@]}" --profiles paper --out "$WORK/benchmarks/results"
    else
        HEADLINE=(--scales base --dtypes bf16 --img-sizes 224 --profiles paper --batch-sizes 1 8 256)
        step bench 330 "${BENCH[@]}" "${HEADLINE[@]}" ${FAST[0]:+--implementations "${FAST[@]}"} \
            --out "$WORK/benchmarks/results"
        if ((${#COMPILED[@]})); then
            step bench-compile 300 "${BENCH[@]}" "${HEADLINE[@]}" --implementations deit-dense "${COMPILED[@]}" \
                --out "$WORK/benchmarks/results/compile"
        fi
    fi
    ;;
sweep)
    build "$(native_arch)"
    if ((DRY)); then
        step sweep-scales 120 "${BENCH[@]}" "${TOY[@]}" --profiles uniform all-deep \
            --out "$WORK/benchmarks/results/sweep-scales"
        step train-step 120 "$PY" -m benchmarks.train_step --scale tiny --img-size 32 --batch 2 --rounds 1 \
            --out "$WORK/benchmarks/results/train-step-tiny-32"
        step sweep-fp16 120 "${BENCH[@]}" "${TOY[@]}" --profiles paper --out "$WORK/benchmarks/results/sweep-fp16"
    else
        # every depth profile (the harness's default), Tiny and Small, bf16
        step sweep-scales 270 "${BENCH[@]}" --scales tiny small --dtypes bf16 --img-sizes 224 \
            --batch-sizes 1 8 64 256 ${FAST[0]:+--implementations "${FAST[@]}"} \
            --out "$WORK/benchmarks/results/sweep-scales"
        # a training step (forward + backward + AdamW), Base, bf16 autocast: packed, triton, eager, DeiT-B
        step train-step 150 "$PY" -m benchmarks.train_step --scale base --batch 64 --dtype bf16 --rounds 7 \
            --out "$WORK/benchmarks/results/train-step-base-224"
        step sweep-fp16 200 "${BENCH[@]}" --scales base --dtypes fp16 --img-sizes 224 --profiles paper \
            --batch-sizes 1 8 64 256 ${FAST[0]:+--implementations "${FAST[@]}"} \
            --out "$WORK/benchmarks/results/sweep-fp16"
    fi
    ;;
profile)
    build "$(native_arch)"
    PROFILE=("$PY" -m benchmarks.profile_forward --out "$WORK/profile")
    if ((DRY)); then
        step torch-profiler 120 "${PROFILE[@]}" --device cpu --scale tiny --dtype fp32 --batch 1 --img-size 32 \
            --repeats 2 --top 10 --threads 1 --implementations reference packed
    else
        step torch-profiler 240 "${PROFILE[@]}" --device cuda --scale base --dtype bf16 --batch 8
    fi
    METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
    for impl in triton cuda; do
        gpu_step "ncu-$impl" 100 ncu --profile-from-start off --clock-control none --launch-count 300 \
            --metrics "$METRICS" --csv --log-file "$LOGS/ncu-$impl.csv" \
            "${PROFILE[@]}" --ncu --device cuda --scale base --dtype bf16 --batch 8 --implementations "$impl"
    done
    CSVS=("$LOGS"/ncu-*.csv)
    if [[ -e ${CSVS[0]} ]]; then
        step ncu-summary 60 "$PY" -m benchmarks.profile_forward --ncu-summary "${CSVS[@]}" --out "$WORK/profile/ncu.md"
    fi
    ;;
esac

# ---- summary and packing
{
    echo "gpu_run.sh $STAGE$( ((DRY)) && echo ' --dry-run') on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${RECVIT_COMMIT:-unknown (set RECVIT_COMMIT)}"
    grep -h -E '^(python |Cuda compilation)' "$LOGS/versions.log" 2> /dev/null
    grep -h -A1 '^name, driver_version' "$LOGS/versions.log" 2> /dev/null | tail -n 1
    echo
    echo "step             status                   time"
    cat "$STEPS"
    for log in "$LOGS"/check.log "$LOGS"/memcheck.log "$LOGS"/racecheck.log "$LOGS"/pytest-gpu.log \
        "$LOGS"/sanitize-ops.log; do
        [[ -f $log ]] || continue
        echo
        echo "--- $(basename "$log" .log)"
        grep -E '^[0-9]+ passed|^FAILED|ERROR SUMMARY|[0-9]+ (passed|failed|error)|no tests ran|all finite|collected' \
            "$log" | tail -n 25
    done
    for log in "$LOGS"/bench*.log "$LOGS"/sweep-*.log; do
        [[ -f $log ]] || continue
        echo
        echo "--- $(basename "$log" .log) (the end of its log)"
        tail -n 20 "$log"
    done
    if [[ -f $WORK/profile/profile.md ]]; then
        echo
        echo "--- profile"
        grep -E '^(### |Forward:|not profiled)' "$WORK/profile/profile.md"
    fi
    echo
    echo "$NAME.tar.gz: logs/ (every step's output)$(cd "$WORK" && find . -mindepth 1 -maxdepth 1 ! -name logs \
        -printf ', %P' | sort)"
} > "$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/summary-$STAGE.txt"
tar -czf "$OUT/$NAME.tar.gz" -C "$(dirname "$WORK")" "$NAME"
if (($(stat -c %s "$OUT/$NAME.tar.gz") > 15 * 1024 * 1024)); then  # the device returns files up to 16 MiB
    find "$WORK" -name 'trace-*.json' -delete
    echo "(the torch profiler traces were left out: the tarball was over 15 MiB)" >> "$OUT/summary-$STAGE.txt"
    tar -czf "$OUT/$NAME.tar.gz" -C "$(dirname "$WORK")" "$NAME"
fi
echo
cat "$OUT/summary-$STAGE.txt"
echo "packed: $OUT/$NAME.tar.gz ($(du -h "$OUT/$NAME.tar.gz" | cut -f1)), $OUT/summary-$STAGE.txt"
exit $FAILED
