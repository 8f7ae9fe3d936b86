#!/usr/bin/env bash
# The GPU run: bash benchmarks/gpu_run.sh [--dry-run] STAGE. A session lent the GPU machine has 15
# minutes of device time in all, the machine's start (1-2 minutes) included: ONE call of `first`
# (the device tool's timeout_s=600) is the whole of it. The other stages are for later sessions.
#   first    versions and the runtime; the CUDA extension built once for the GPU's own architecture
#            (timed); then at once: recvit check --device cuda --quick --dtypes bf16 | pytest -m
#            "gpu and not sanitizer", file by file, 4 files at a time | sanitize_ops.py, then
#            compute-sanitizer memcheck, racecheck and initcheck on it (after a probe that skips them
#            in seconds where the runtime refuses the tool); last, alone, the headline benchmark:
#            Edge-RecViT-B bf16 with the paper's depth profile against DeiT-B and ToMe-B, eager and
#            in a CUDA graph, torch's varlen_attn and the public code's execution, batch 1, 8 and 256
#   check    the same correctness steps in full: setup.py's default build (8.0;9.0+PTX), recvit check
#            at every scale and dtype, every GPU test (the sanitizer ones too)
#   bench    the headline with every implementation (the per-step ones too), then torch.compile's
#   sweep    Tiny and Small in bf16 at every depth profile; a Base training step in bf16
#            (benchmarks/train_step.py); Base in fp16
#   profile  one forward per implementation under the torch profiler, ncu on the triton and cuda
#            forwards; summarised per kernel in profile/profile.md and profile/ncu.md
# Every step runs under `timeout` with its own cap, and the caps are planned so that each step ends
# within the budget (GPU_RUN_BUDGET_S, default 540 s, RESERVE of it kept for packing) even when
# every step before it runs to its cap: the summary's table gives each step's cap and the time by
# which it ends at the latest. What a step measures is written as each measurement completes, so
# a step stopped at its cap still returns its numbers. No step reaches the network.
# Into $OUT (at most 8 files, no folders): summary-STAGE.txt (also printed last), gpu_run-STAGE.tar.gz
# (every step's log and file) and, where the stage made them, check-STAGE.json and the headline's
# bench-STAGE.json / .md; all refreshed after each step or group of steps, so a killed call returns
# what was done.
# --dry-run: the same plan on this machine's CPU at toy sizes; the steps that need the GPU machine
# (the build, compute-sanitizer, ncu) are shown, not run, and so are the GPU command lines of the
# steps run as toys (logs/dry-run.log). CI runs it (tests/test_gpu_run.py, which parses those lines).
# Environment: OUT (default: a new temporary folder), PYTHON (default python3), GPU_RUN_BUDGET_S,
# RECVIT_COMMIT (recorded in the summary: the device machine's copy has no .git), CUDA_HOME (else
# found as csrc/check_compile.sh finds it).
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_run.sh [--dry-run] first|check|bench|sweep|profile" >&2; exit 2; }
DRY=0
if [[ ${1:-} == --dry-run ]]; then DRY=1; shift; fi
[[ $# -eq 1 ]] || usage
STAGE=$1
case "$STAGE" in first|check|bench|sweep|profile) ;; *) usage ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-540}
RESERVE=15  # seconds kept for the summary and the packing
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
AT=0  # when the next step starts at the latest: the caps of the steps before it
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PY LOGS

# CUDA's folder, found as csrc/check_compile.sh finds its headers: $CUDA_HOME, else /usr/local/cuda,
# else the folder above nvcc's real path (nvcc may be a wrapper outside <cuda>/bin). Exported for
# the build (torch would guess it from `which nvcc`) and recorded in the summary.
find_cuda_home() {
    local nvcc=${NVCC:-$(command -v nvcc || true)} home=${CUDA_HOME:-/usr/local/cuda}
    if [[ -z $nvcc && -x $home/bin/nvcc ]]; then nvcc=$home/bin/nvcc; fi
    if [[ ! -f $home/include/cuda_runtime_api.h && -n $nvcc ]]; then
        home=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    fi
    [[ -f $home/include/cuda_runtime_api.h ]] && echo "$home"
}
if CUDA_HOME=$(find_cuda_home); then
    export CUDA_HOME PATH=$PATH:$CUDA_HOME/bin
    CUDA_USED="CUDA used: CUDA_HOME=$CUDA_HOME, $("$CUDA_HOME/bin/nvcc" --version 2> /dev/null | tail -n 1)"
else
    unset CUDA_HOME
    CUDA_USED="CUDA used: none found (no include/cuda_runtime_api.h in \$CUDA_HOME, /usr/local/cuda or above nvcc)"
fi
for tool in compute-sanitizer ncu; do  # not always on PATH: the toolkit's or Nsight Compute's folder
    command -v "$tool" > /dev/null && continue
    for dir in ${CUDA_HOME:+"$CUDA_HOME/compute-sanitizer"} /opt/nvidia/nsight-compute/*; do
        if [[ -x $dir/$tool ]]; then PATH=$PATH:$dir; break; fi
    done
done

# ---- steps

# record NAME CAP ENDS TIME STATUS: a line of the step table.
record() { printf '%-16s %4s %7s %6s  %s\n' "$@" >> "$STEPS"; }

# step NAME CAP CMD...: CMD under `timeout` (CAP s, less if the budget has less left), its output in
# logs/NAME.log. ON_FAIL=refused marks a failure as the runtime's refusal rather than a failure.
# --dry-run: the caps are the GPU run's, for its plan; the toy runs on a CPU, maybe a busy one, get
# DRY_LIMIT each.
DRY_LIMIT=300
step() {
    local name=$1 cap=$2 limit start rc status
    shift 2
    AT=$((AT + cap))
    limit=$((BUDGET - RESERVE - SECONDS))
    ((limit > cap)) && limit=$cap
    ((DRY)) && limit=$DRY_LIMIT
    if ((limit < 5)); then
        record "$name" "$cap" "$AT" - "skipped: budget spent"
        echo "== $name: skipped, the budget is spent"
        return 1
    fi
    echo "== $name (at most ${limit}s): $*"
    start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="timed out at ${limit}s" ;;
        *) status="${ON_FAIL:-failed} (exit $rc)" ;;
    esac
    record "$name" "$cap" "$AT" "$((SECONDS - start))s" "$status"
    echo "   $name: $status after $((SECONDS - start))s"
    return $rc
}

# gpu_step NAME CAP CMD...: a step that needs the GPU machine; --dry-run shows it instead, each word
# quoted as bash would need it (tests/test_gpu_run.py reads the ncu lines back).
gpu_step() {
    local shown
    if ((DRY)); then
        AT=$((AT + $2))
        record "$1" "$2" "$AT" - "dry run: not run"
        printf -v shown ' %q' "${@:3}"
        echo "== $1 (dry run, not run):$shown" | tee -a "$LOGS/dry-run.log"
        return 0
    fi
    step "$@"
}

# gpu_args NAME CMD...: --dry-run: the command step NAME runs on the GPU machine, quoted as bash would
# need it, into logs/dry-run.log (the dry run times a toy in its place; tests/test_gpu_run.py
# parses each with its program's parser).
gpu_args() {
    local shown
    printf -v shown ' %q' "${@:2}"
    echo "== $1 (on the GPU):$shown" >> "$LOGS/dry-run.log"
}

# skip NAME CAP WHY: a planned step that does not run.
skip() {
    AT=$((AT + $2))
    record "$1" "$2" "$AT" - "skipped: $3"
}

# together LANE...: the lanes (functions running steps one after another) at the same time, each
# with two CPU threads for torch; the next step starts when the last lane ends.
together() {
    local lane
    for lane in "$@"; do (export OMP_NUM_THREADS=2; "$lane") & done
    wait
    AT=$(latest_end)
}

latest_end() { awk 'BEGIN { end = 0 } $3 > end { end = $3 } END { print end }' "$STEPS"; }

# ---- what the steps run

versions() {
    echo "--- runtime: $(uname -srm) (kernel 4.4.0 is gVisor: no compute-sanitizer, no ncu counters)"
    echo "--- $(nproc) CPU cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 2^20 }' /proc/meminfo) memory"
    for tool in nvidia-smi nvcc ncu compute-sanitizer; do
        if command -v "$tool" > /dev/null; then
            echo "--- $tool: $(command -v "$tool")"
            case $tool in
                nvidia-smi) nvidia-smi; nvidia-smi --format=csv \
                    --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,pstate,temperature.gpu ;;
                *) "$tool" --version | tail -n 2 ;;
            esac
        else
            echo "--- $tool: not found"
        fi
    done
    echo "--- python: $(command -v "$PY")"
    "$PY" - <<'EOF'
import platform
from importlib import metadata
import torch

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"

gpu = "none visible"
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    gpu = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version('triton')}, numpy {version('numpy')}, GPU: {gpu}")
print(", ".join(f"{name} {version(name)}" for name in
                ("timm", "torchvision", "pytest", "pytest-timeout", "ninja", "setuptools", "pybind11",
                 "matplotlib")))
EOF
}
export -f versions

# The GPU's compute capability ("9.0"), else (no GPU visible, or CUDA's start hangs) A100's and H100's.
native_arch() {
    timeout --kill-after=5 20 "$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" \
        2> /dev/null || echo "8.0;9.0"
}

# The CUDA extension, built once and timed: editable and in place (recvit_kernels/cuda/_C*.so, which
# every later step imports), without build isolation (torch must be visible), dependencies or an
# index (no network there). Its import is tried whatever pip said: pip can fail after the build
# (installing into the environment) with the extension in place. If it cannot be imported, torch's
# extension folder is pointed at nothing, so that no later step spends minutes on the JIT build: the
# cuda backend is then unavailable, with the reason, everywhere after.
build() {
    local arch=$1
    gpu_step build 150 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index --no-cache-dir --disable-pip-version-check \
        -v -e .
    gpu_step import-ext 15 "$PY" -c "import recvit_kernels.cuda._C as ext; print(ext.__file__)" && return 0
    export TORCH_EXTENSIONS_DIR=/dev/null/no-jit-build-after-a-failed-build
    NO_EXTENSION="the extension was not built or did not import: the cuda backend is unavailable after it (no JIT build)"
}

# recvit check, the table streamed to its log; CHECK_ARGS and CHECK_CAP per stage.
lane_check() {
    if ((DRY)); then
        gpu_args check "$PY" -m recvit check --device cuda "${CHECK_ARGS[@]}" --json "$WORK/check.json"
        step check "$CHECK_CAP" "$PY" -m recvit check --device cpu --quick --only depth_sort pack --dtypes fp32 \
            --json "$WORK/check.json"
    else
        step check "$CHECK_CAP" "$PY" -m recvit check --device cuda "${CHECK_ARGS[@]}" --json "$WORK/check.json"
    fi
}

# The files with GPU tests, those that matter most (and run longest) first: the kernels against
# eager, then the models; then any other.
GPU_TEST_ORDER=(test_cuda_backend test_triton_attention test_prefix_linear test_triton_model test_cuda_model
                test_triton_layer_norm test_triton_mlp test_triton_backward test_launch_budget)
gpu_test_files() {
    local name
    for name in "${GPU_TEST_ORDER[@]}"; do [[ -f tests/$name.py ]] && echo "tests/$name.py"; done
    grep -l 'pytest.mark.gpu' tests/test_*.py | grep -v -x -F -f <(printf 'tests/%s.py\n' "${GPU_TEST_ORDER[@]}")
}

# pytest_file FILE: the file's GPU tests (TEST_MARK), each named in its log as it ends, the file
# under its own cap (TEST_FILE_CAP); --foreground, so that the step's timeout stops it too.
pytest_file() {
    local file=$1 start=$SECONDS rc
    # shellcheck disable=SC2086  # TEST_TIMEOUT_OPTION is empty or two words
    timeout --foreground --kill-after=5 "$TEST_FILE_CAP" "$PY" -m pytest "$file" -m "$TEST_MARK" -v -rfEs \
        -p no:cacheprovider $TEST_TIMEOUT_OPTION > "$LOGS/pytest/$(basename "$file" .py).log" 2>&1
    rc=$?
    echo "$file: exit $rc after $((SECONDS - start))s"  # 5: no test selected, 124: stopped at its cap
    ((rc == 0 || rc == 5))
}
# pytest_files: pytest_file on each file named on stdin, TEST_JOBS at a time; not ok where a file
# is not ok, or where no test passed in any file (every one skipped: CUDA not visible, say). One
# file with every test skipped can be right (a test of two GPUs on one): its result line says so.
pytest_files() {
    local rc
    xargs -P "$TEST_JOBS" -n 1 bash -c 'pytest_file "$1"' _
    rc=$?
    if ! grep -q -s ' PASSED' "$LOGS"/pytest/*.log; then  # -v: each test's line, capped files' too
        echo "no GPU test passed in any file: nothing was tested"
        ((rc)) || rc=1
    fi
    return $rc
}
export -f pytest_file pytest_files

# pytest on the GPU test files, TEST_JOBS files at a time, each on its own (a failure, a crash or
# a hang of one file hides nothing of the others): no -x, and no sanitizer in `first`.
lane_pytest() {
    mkdir -p "$LOGS/pytest"
    mapfile -t files < <(gpu_test_files)
    TEST_TIMEOUT_OPTION=""  # none of these is PYTEST_*: pytest-timeout reads PYTEST_TIMEOUT as its timeout
    if "$PY" -c "import pytest_timeout" 2> /dev/null; then TEST_TIMEOUT_OPTION="--timeout $((TEST_FILE_CAP / 2))"; fi
    export TEST_MARK TEST_FILE_CAP TEST_TIMEOUT_OPTION TEST_JOBS
    if ((DRY)); then
        printf '== pytest_file %s (dry run: collected only, in one process)\n' "${files[@]}" >> "$LOGS/dry-run.log"
        step pytest-gpu "$TEST_CAP" "$PY" -m pytest --collect-only -q -p no:cacheprovider -m "$TEST_MARK" "${files[@]}"
    else
        ON_FAIL="failed: see the files below" step pytest-gpu "$TEST_CAP" bash -c pytest_files \
            < <(printf '%s\n' "${files[@]}")
    fi
}

# sanitize_ops.py alone (every op finite; it warms Triton's cache), then a probe: a tiny torch
# program under memcheck, so that a runtime that refuses the tool costs seconds; then memcheck,
# racecheck and initcheck on sanitize_ops.py at the same time. The caching allocator would hide
# out-of-bounds accesses inside its pooled blocks: it is off.
SANITIZE=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 1)
PROBE='import torch; x = torch.arange(4.0, device="cuda"); print("probe:", (2 * x).sum().item())'
lane_sanitizers() {
    local tool device=cuda
    ((DRY)) && device=cpu
    step sanitize-ops 60 "$PY" benchmarks/sanitize_ops.py --device $device
    if ((!DRY)) && ! command -v compute-sanitizer > /dev/null; then
        skip sanitizer-probe 20 "compute-sanitizer not found"
        for tool in memcheck racecheck initcheck; do (skip "$tool" "$SANITIZER_CAP" "compute-sanitizer not found"); done
        return 0
    fi
    if ! ON_FAIL=refused gpu_step sanitizer-probe 20 "${SANITIZE[@]}" --tool memcheck "$PY" -c "$PROBE"; then
        for tool in memcheck racecheck initcheck; do
            (skip "$tool" "$SANITIZER_CAP" "compute-sanitizer cannot run here (logs/sanitizer-probe.log)")
        done
        return 0
    fi
    for tool in memcheck racecheck initcheck; do
        gpu_step "$tool" "$SANITIZER_CAP" "${SANITIZE[@]}" --tool "$tool" "$PY" benchmarks/sanitize_ops.py \
            --device cuda &
    done
    wait
}

# bench_step NAME CAP ARGS...: recvit bench --full with ARGS, results under results/NAME/<device>/,
# rewritten after each batch; --dry-run: Tiny at 32 px, batch 1 and 2, one thread, DeiT, ToMe, the
# reference and packed (what benchmarks/gpu_results.py's targets can compare on a CPU).
bench_step() {
    local name=$1 cap=$2
    shift 2
    if ((DRY)); then
        gpu_args "$name" "$PY" -m recvit bench --full --no-progress "$@" --out "$WORK/results/$name"
        set -- --cpu --scales tiny --dtypes fp32 --img-sizes 32 --batch-sizes 1 2 --profiles paper \
            --implementations deit-dense tome reference packed --target-s 0.01 --threads 1 --no-plots
    fi
    step "$name" "$cap" "$PY" -m recvit bench --full --no-progress "$@" --out "$WORK/results/$name"
}

# The implementations, read from the bench CLI's help: the torch.compile ones apart (minutes each).
implementations() {
    COLUMNS=10000 "$PY" -m recvit bench --help | grep -o 'subset of: .*' | cut -d: -f2 | tr -d ' ' | tr ',' '\n'
}
export -f implementations
split_implementations() {
    step implementations 20 bash -c implementations
    mapfile -t FAST < <(grep -v '+compile$' "$LOGS/implementations.log")
    mapfile -t COMPILED < <(grep '+compile$' "$LOGS/implementations.log")
    echo "   timed first: ${FAST[*]}; then: ${COMPILED[*]}"
}

# ---- summary and packing

summary() {
    local log
    echo "gpu_run.sh $STAGE$( ((DRY)) && echo ' --dry-run') on $(uname -n), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit ${RECVIT_COMMIT:-unknown (set RECVIT_COMMIT)}"
    echo "budget ${BUDGET}s, ${RESERVE}s of it kept for packing; planned: every step ends by $(latest_end)s at the latest"
    echo "$CUDA_USED"
    grep -h -E '^(python |--- runtime|--- [0-9]+ CPU)' "$LOGS/versions.log" 2> /dev/null
    grep -h -A1 '^name, driver_version' "$LOGS/versions.log" 2> /dev/null | tail -n 1
    [[ -n ${NO_EXTENSION:-} ]] && echo "$NO_EXTENSION"
    echo
    printf '%-16s %4s %7s %6s  %s\n' step cap "ends by" time status
    awk '{ print $3 - $2, $0 }' "$STEPS" | sort -s -n -k1,1 | cut -d' ' -f2-  # by planned start
    for log in build import-ext check sanitize-ops sanitizer-probe memcheck racecheck initcheck pytest-gpu; do
        [[ -f $LOGS/$log.log ]] || continue
        echo
        echo "--- $log"
        grep -h -E '^ *recvit: |Successfully installed|^/.*_C.*\.so$|^[0-9]+ passed|^FAILED|ERROR SUMMARY|RACECHECK SUMMARY|tests collected|^no GPU test passed|all finite|^probe:' \
            "$LOGS/$log.log" | tail -n 25
        [[ $log == pytest-gpu ]] && pytest_results
    done
    # the steps not ok, but pytest's (its results above) and those whose log's end is shown below
    awk '$5 ~ /^(failed|refused|timed)/ && $1 !~ /^(pytest-gpu|headline|compile|sweep-.*|train-step)$/ { print $1 }' \
        "$STEPS" | while read -r log; do
        echo
        echo "--- $log (not ok: the end of its log)"
        tail -n 8 "$LOGS/$log.log"
    done
    for log in "$LOGS"/headline.log "$LOGS"/compile.log "$LOGS"/sweep-*.log "$LOGS"/train-step.log; do
        [[ -f $log ]] || continue
        echo
        echo "--- $(basename "$log" .log) (the end of its log)"
        tail -n 30 "$log"
    done
    if [[ -f $WORK/profile/profile.md ]]; then
        echo
        echo "--- profile"
        grep -E '^(### |Forward:|not profiled)' "$WORK/profile/profile.md"
    fi
    echo
    echo "$NAME.tar.gz: logs/ (every step's output)$(cd "$WORK" && find . -mindepth 1 -maxdepth 1 ! -name logs \
        -printf ', %P' | sort)"
}

# all_skipped LOG: pytest's result line (the log's last) counts skipped tests and no passed one.
all_skipped() {
    local last
    last=$(tail -n 1 "$1")
    [[ $last == *" skipped"* && $last != *" passed"* ]]
}

# One line per test file run: pytest's result line, or how far it got when its cap stopped it;
# then the failed tests.
pytest_results() {
    local log last
    for log in "$LOGS"/pytest/*.log; do
        [[ -f $log ]] || continue
        last=$(tail -n 1 "$log")
        if [[ $last =~ \ in\ [0-9.]+s ]]; then
            echo "tests/$(basename "$log" .log).py: $(sed -E 's/^=+ | =+$//g' <<< "$last")$(all_skipped "$log" &&
                echo ': nothing tested')"
        else
            echo "tests/$(basename "$log" .log).py: stopped by its cap after $(grep -c ' PASSED' "$log") passed," \
                "$(grep -c ' FAILED' "$log") failed"
        fi
    done
    grep -h '^FAILED' "$LOGS"/pytest/*.log 2> /dev/null | head -n 40
}

# The summary, the tarball and the files worth reading without unpacking, into $OUT.
checkpoint() {
    local folder
    summary > "$OUT/summary-$STAGE.txt"
    [[ -f $WORK/check.json ]] && cp "$WORK/check.json" "$OUT/check-$STAGE.json"
    for folder in "$WORK"/results/headline/*/; do
        [[ -f $folder/results.json ]] || continue
        cp "$folder/results.json" "$OUT/bench-$STAGE.json"
        cp "$folder/results.md" "$OUT/bench-$STAGE.md"
    done
    tar -czf "$OUT/$NAME.tar.gz" -C "$SCRATCH" "$NAME"
    if (($(stat -c %s "$OUT/$NAME.tar.gz") > 15 * 1024 * 1024)); then  # the device returns files up to 16 MiB
        find "$WORK" -name 'trace-*.json' -delete
        echo "(the torch profiler traces were left out: the tarball was over 15 MiB)" >> "$OUT/summary-$STAGE.txt"
        tar -czf "$OUT/$NAME.tar.gz" -C "$SCRATCH" "$NAME"
    fi
}

# ---- the stages

echo "gpu_run.sh $STAGE$( ((DRY)) && echo ' --dry-run'): budget ${BUDGET}s, results packed into $OUT"
echo "$CUDA_USED"
step versions 30 bash -c versions
HEADLINE=(--scales base --dtypes bf16 --img-sizes 224 --profiles paper --batch-sizes 1 8 256)
case $STAGE in
first)
    build "$(native_arch)"
    checkpoint
    CHECK_CAP=160 CHECK_ARGS=(--quick --dtypes bf16)
    TEST_CAP=160 TEST_FILE_CAP=120 TEST_JOBS=4 TEST_MARK="gpu and not sanitizer"
    SANITIZER_CAP=80
    together lane_check lane_pytest lane_sanitizers
    checkpoint
    bench_step headline 160 "${HEADLINE[@]}" --implementations deit-dense deit-dense+graph tome tome+graph \
        reference varlen_attn packed packed+graph triton triton+graph cuda cuda+graph
    ;;
check)
    build "8.0;9.0+PTX"
    checkpoint
    CHECK_CAP=330 CHECK_ARGS=()
    TEST_CAP=330 TEST_FILE_CAP=240 TEST_JOBS=4 TEST_MARK=gpu
    SANITIZER_CAP=250
    together lane_check lane_pytest lane_sanitizers
    ;;
bench)
    build "$(native_arch)"
    split_implementations
    checkpoint
    bench_step headline 180 "${HEADLINE[@]}" ${FAST[0]:+--implementations "${FAST[@]}"}
    checkpoint
    if ((${#COMPILED[@]})); then
        bench_step compile 130 "${HEADLINE[@]}" --implementations deit-dense "${COMPILED[@]}"
    fi
    ;;
sweep)
    build "$(native_arch)"
    split_implementations
    checkpoint
    # every depth profile (the harness's default), Tiny and Small, bf16
    bench_step sweep-scales 120 --scales tiny small --dtypes bf16 --img-sizes 224 --batch-sizes 1 8 64 256 \
        ${FAST[0]:+--implementations "${FAST[@]}"}
    checkpoint
    # a training step (forward + backward + AdamW), Base, bf16 autocast: packed, triton, eager, DeiT-B
    TRAIN=(--scale base --batch 64 --dtype bf16 --rounds 7 --out "$WORK/results/train-step-base-224")
    if ((DRY)); then
        gpu_args train-step "$PY" -m benchmarks.train_step "${TRAIN[@]}"
        TRAIN=(--scale tiny --img-size 32 --batch 2 --rounds 1 --backends packed --out "$WORK/results/train-step-tiny-32")
    fi
    step train-step 70 "$PY" -m benchmarks.train_step "${TRAIN[@]}"
    checkpoint
    bench_step sweep-fp16 120 --scales base --dtypes fp16 --img-sizes 224 --profiles paper \
        --batch-sizes 1 8 64 256 ${FAST[0]:+--implementations "${FAST[@]}"}
    ;;
profile)
    build "$(native_arch)"
    checkpoint
    PROFILE=("$PY" -m benchmarks.profile_forward --out "$WORK/profile")
    ON_GPU=(--device cuda --scale base --dtype bf16 --batch 8)
    if ((DRY)); then
        gpu_args torch-profiler "${PROFILE[@]}" "${ON_GPU[@]}"
        step torch-profiler 170 "${PROFILE[@]}" --device cpu --scale tiny --dtype fp32 --batch 1 --img-size 32 \
            --repeats 2 --top 10 --threads 1 --implementations reference packed
    else
        step torch-profiler 170 "${PROFILE[@]}" "${ON_GPU[@]}"
    fi
    checkpoint
    METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
    for impl in triton cuda; do
        gpu_step "ncu-$impl" 70 ncu --profile-from-start off --clock-control none --launch-count 300 \
            --metrics "$METRICS" --csv --log-file "$LOGS/ncu-$impl.csv" \
            "${PROFILE[@]}" --ncu "${ON_GPU[@]}" --implementations "$impl"
    done
    CSVS=("$LOGS"/ncu-*.csv)
    if [[ -e ${CSVS[0]} ]]; then
        step ncu-summary 20 "$PY" -m benchmarks.profile_forward --ncu-summary "${CSVS[@]}" --out "$WORK/profile/ncu.md"
    fi
    ;;
esac

checkpoint
echo
cat "$OUT/summary-$STAGE.txt"
echo "packed into $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
! grep -q -E '  (failed|timed out|skipped: budget spent)' "$STEPS"
