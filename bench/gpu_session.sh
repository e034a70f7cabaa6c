#!/usr/bin/env bash
# Everything a GPU machine is needed for, in as few calls as possible (a bare machine with torch, triton,
# nvcc, pytest, pytest-benchmark, hypothesis and transformers, no internet). From the repository root:
#
#   bash bench/gpu_session.sh prepare          # HERE (with internet): fetch the wheels the GPU machine lacks
#   bash bench/gpu_session.sh tests            # THERE: build, env report, GPU test files, then the rest
#   bash bench/gpu_session.sh sanitize         # THERE: build, compute-sanitizer memcheck + racecheck
#   bash bench/gpu_session.sh bench [ARGS...]  # THERE: build, `python -m pyseqpack bench ARGS`
#
# Every step after `prepare` builds first (sm_90 only, to save time) and writes its logs and results under
# $OUT (default /tmp/pyseqpack-gpu); `bench` writes its report folder there too (copy it to bench/results/
# and commit it: it records the device, versions, date and command).
#
# One call per line below, in this order of value (each device `run` with carry=[".whl"], command
# `OUT=$OUT bash bench/gpu_session.sh ...`; --label names the GPU):
#   tests
#   bench --suite ce --quick --label "<GPU name>" -- -k N16384      (the issue's CE goals, V = 32000..151936)
#   bench --suite collate --quick --label "<GPU name>"               (flat-buffer goal; CPU rows time the host)
#   sanitize
# torch.compile compiles once per shape, so the full CE grid is split across calls.
set -uo pipefail
cd "$(dirname "$0")/.."
step=${1:-}
shift || true
OUT=${OUT:-/tmp/pyseqpack-gpu}
WHEELS=(liger-kernel==0.8.5)  # pure Python; quack needs CUTLASS's DSL, not carried
case "$step" in
prepare | tests | sanitize | bench) ;;
*)
    echo "usage: bash bench/gpu_session.sh prepare|tests|sanitize|bench [bench args]" >&2
    exit 2
    ;;
esac

if [ "$step" = prepare ]; then
    ${PYTHON:-python3} -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    echo "now pass carry=[\".whl\"] to the device calls"
    exit
fi

mkdir -p "$OUT"
py=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
# Build and install (pyseqpack's build needs no torch; the CUDA kernels must build here: PYSEQPACK_CUDA=1).
export PYSEQPACK_CUDA=1 PYSEQPACK_CUDA_ARCH=${PYSEQPACK_CUDA_ARCH:-90} MAX_JOBS=${MAX_JOBS:-8}
if ! $py -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"
    exit 1
fi
# Run from outside the checkout so that the installed package (with its compiled modules) is imported.
export PYTHONUNBUFFERED=1 REPO=$PWD
(cd /tmp && $py -m pyseqpack env) | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/env.txt" 2>&1

case "$step" in
tests)
    # The files with GPU tests first (CUDA and Triton-on-CUDA parity, CUDA graphs, >2^31
    # offsets), then the rest of the suite on the GPU machine; each failure is listed (no -x), with a JUnit XML.
    cd /tmp
    gpu_files=(test_pad_shift_mask_cuda.py test_pad_shift_mask_triton.py test_pad_shift_mask.py
               test_cross_entropy_cuda.py test_cross_entropy.py test_cross_entropy_compile.py)
    timeout 330 pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" -m "slow or not slow" \
        --maxfail=30 --durations=15 --junitxml="$OUT/tests-gpu.xml" "${gpu_files[@]/#/$REPO/tests/}" 2>&1 \
        | tee "$OUT/tests-gpu.log" | tail -60
    # The rest, but for the files that never touch a GPU (CI runs them).
    cpu_only=(test_pad_shift_mask_cuda_emulated.py test_cpu_module_other_pythons.py test_bench_cli.py)
    rest=()
    for f in "$REPO"/tests/test_*.py; do
        [[ " ${gpu_files[*]} ${cpu_only[*]} " == *" $(basename "$f") "* ]] || rest+=("$f")
    done
    timeout 240 pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" --maxfail=30 \
        --durations=10 "${rest[@]}" 2>&1 | tee "$OUT/tests-rest.log" | tail -30
    ;;
sanitize)
    # memcheck and racecheck on the native CUDA kernels (the Triton ones are checked by the parity tests).
    # Left out: the >2^31-offset cases (too slow instrumented) and the kernel-selection tests (they read kernel
    # names from torch's profiler, which gets no events under the sanitizer). racecheck skips torch's own
    # kernels (at::native reductions used by the tests, whose shared-memory patterns it reports).
    cd /tmp
    for tool in memcheck racecheck; do
        filter=()
        [ "$tool" = racecheck ] && filter=(--kernel-name-exclude kns=native)
        timeout 240 compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 9 --target-processes all \
            pytest -q -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" \
            "$REPO/tests/test_pad_shift_mask_cuda.py" "$REPO/tests/test_cross_entropy_cuda.py" \
            -k "not 2_pow_31 and not kernel_selection" \
            2>&1 | tail -40 | tee "$OUT/sanitize-$tool.log"
        echo "compute-sanitizer $tool exit: ${PIPESTATUS[0]}" | tee -a "$OUT/sanitize-$tool.log"
    done
    ;;
bench)
    cd /tmp && timeout 540 $py -m pyseqpack bench --bench-dir "$REPO/bench" --out "$OUT/results" "$@" 2>&1 \
        | tee "$OUT/bench.log"
    ;;
esac
