#!/usr/bin/env bash
# The GPU correctness run (written for an H200): everything needed to fix what fails, in one
# run of at most 6 minutes (GPU_CHECK_BUDGET_S, default 360 s), short enough to rerun what
# failed on a machine lent for a short time. Correctness only: speed is `python -m bench`.
#
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh     # on the device
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh      # dry run here, on the CPU (Triton interpreter)
#
# What comes back: $OUT/summary.txt (one line per step, then the failed checks) and
# $OUT/gpu_check.tgz (every log, the checks' .jsonl, validation.md / .json, junit XML).
#
# Plan (seconds from the start; every step has a hard limit, `timeout -k`, and none runs past
# the budget; steps in one row run at once, each in its own process):
#   0      env.txt: nvidia-smi, versions, compute-sanitizer --version, commit
#   0      background: the CUDA extension built for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0,
#          MAX_JOBS=16, PARA_KERNELS_FORCE_BUILD=1), <= 200 s
#   ~2     preflight (<= 45 s): every Triton kernel compiled and launched once at a tiny size,
#          against the fp64 reference (gpu_validate.py smoke)
#   ~45    Triton: the six op x dtype tables, pool_generate stress, streams (<= 90 s)
#   ~135   Triton: inputs above 2^31 elements (one op at a time, <= 40 s each), graphs,
#          determinism; background until the end: pytest on the Triton test files (-v -rs
#          --junitxml, 60 s a test), and the sanitizers one after another (<= 50 s each; one cut
#          by the budget is partial): memcheck Triton, memcheck C++, initcheck Triton, initcheck
#          C++ (once _C loads), synccheck Triton, racecheck Triton
#   build  `_C` must load (fails loudly, never skips); CUDA C++: tables, graphs, determinism
#          (<= 60 s), inputs above 2^31 elements, then pytest on the C++ test files
#   360-15 validation.md, summary.txt, gpu_check.tgz
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT/logs" "$OUT/checks"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
QUICK=${GPU_CHECK_QUICK:-}
BUDGET=${GPU_CHECK_BUDGET_S:-$([ -n "$QUICK" ] && echo 1500 || echo 360)}
START=$SECONDS
LINES="$OUT/logs/summary.lines"  # one line per step, appended by run (also from background steps)
: > "$LINES"
SAN=${GPU_CHECK_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
[ -x "$SAN" ] && [ -z "$QUICK" ] && HAVE_SAN=1 || HAVE_SAN=
VALIDATE=("$PY" scripts/gpu_validate.py)

now() { echo $((SECONDS - START)); }
left() { local t=$(( BUDGET - 15 - $(now) )); (( t < 5 )) && t=5; echo "$t"; }
# at most $1 seconds, and never past the budget
cap() { local t=$1 l; l=$(left); (( t > l )) && t=$l; echo "$t"; }
# run NAME SECONDS CMD...: bounded (SIGTERM, SIGKILL 10 s later), its log in logs/NAME.log, one
# summary line; safe to put in the background with &
run() {
  local name=$1 s t0 rc verdict; s=$(cap "$2"); shift 2; t0=$(now)
  timeout -k 10 "$s" "$@" > "$OUT/logs/$name.log" 2>&1; rc=$?
  case $rc in 0) verdict=ok ;; 124|137) verdict="KILLED at its ${s} s limit" ;; *) verdict="FAILED (rc $rc)" ;; esac
  if [[ $name == san-* ]]; then  # a sanitizer cut by the budget is a partial result, not a failure
    if grep -q "Device not supported\|is not supported" "$OUT/logs/$name.log"; then verdict="unsupported here"; rc=0
    elif (( rc == 124 || rc == 137 )); then verdict="cut at ${s} s (partial)"; rc=0; fi
  fi
  printf '%-28s %-30s %4d s (t=%d)\n' "$name" "$verdict" $(( $(now) - t0 )) "$t0" >> "$LINES"
  echo "== $name: $verdict ($(( $(now) - t0 )) s)"
  return $rc
}
skip() { printf '%-28s skipped: %s\n' "$1" "$2" >> "$LINES"; echo "== $1: skipped ($2)"; }

{
  echo "== gpu_check $(date -u +%FT%TZ), budget ${BUDGET} s, quick=${QUICK:-0}"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  [ -x "$SAN" ] && "$SAN" --version | tail -2 || echo "compute-sanitizer: not found"
  timeout 60 "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count, "memory", p.total_memory >> 30, "GiB")
for name in ("triton", "transformers", "pytest", "pytest_timeout", "xdist", "hypothesis", "setuptools"):
    try:
        print(name, getattr(__import__(name), "__version__", "present"))
    except Exception as e:
        print(name, "MISSING", e)
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ------------------------------------------------------------------ preflight, and the build beside everything
if [ -n "$QUICK" ]; then
  skip build "quick run (make test builds _C on the CPU)"
  BUILD_PID=
else
  # sm_90 only: the GPU at hand, half the nvcc work of the default 8.0;9.0+PTX
  # (if pip itself refuses, e.g. an older setuptools than pyproject asks for: build in place)
  export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 PARA_KERNELS_FORCE_BUILD=1
  { run build 200 "$PY" -m pip install --no-deps --no-build-isolation -v -e . ||
    run build-inplace 200 "$PY" setup.py build_ext --inplace; } &
  BUILD_PID=$!
fi
run preflight-triton-smoke 45 "${VALIDATE[@]}" smoke --backend triton --out "$OUT/checks/smoke-triton.jsonl"

# ------------------------------------------------------------------ Triton, on the GPU beside the build
# the six op tables, the stress and the streams at once (16 CPUs: the JIT compiles in parallel)
pids=()
for op in pool generate pool_generate scale scaled_glu scaled_linear; do
  run "table-triton-$op" 90 "${VALIDATE[@]}" table --op "$op" --backend triton \
    --out "$OUT/checks/table-triton-$op.jsonl" & pids+=($!)
done
run stress-pool_generate 90 "${VALIDATE[@]}" stress --out "$OUT/checks/stress.jsonl" & pids+=($!)
run streams 60 "${VALIDATE[@]}" streams --out "$OUT/checks/streams.jsonl" & pids+=($!)
wait "${pids[@]}"
# inputs above 2^31 elements (4 GB each, with fp32 references): one op at a time
big() {
  local backend=$1 op; shift
  for op in "$@"; do
    run "big-$backend-$op" 40 "${VALIDATE[@]}" table --op "$op" --backend "$backend" --big \
      --out "$OUT/checks/big-$backend-$op.jsonl"
  done
}
pids=()
[ -z "$QUICK" ] && { big triton pool scale scaled_glu & pids+=($!); }
run graphs-triton 45 "${VALIDATE[@]}" graphs --backend triton --out "$OUT/checks/graphs-triton.jsonl" & pids+=($!)
run determinism-triton 30 "${VALIDATE[@]}" determinism --backend triton \
  --out "$OUT/checks/determinism-triton.jsonl" & pids+=($!)
# pytest on the GPU until the budget ends: the Triton test files now, the C++ ones after the build
PYTEST=("$PY" -m pytest -p no:cacheprovider -v -rs)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 60 --timeout-method=thread)
"$PY" -c "import xdist" 2>/dev/null && [ -z "$QUICK" ] && PYTEST+=(-n 4)
if [ -n "$QUICK" ]; then
  triton_tests=(tests/build/test_triton_launch.py tests/ops/test_pool_generate.py -k "out_of_order or launch")
else
  triton_tests=(tests/ops/test_pool_generate.py tests/ops/test_pool.py tests/ops/test_scale.py
                tests/ops/test_generate.py tests/ops/test_scaled_glu.py tests/ops/test_scaled_linear.py
                -k "test_triton_ or cuda-triton")
fi
run pytest-triton "$(left)" "${PYTEST[@]}" --junitxml "$OUT/checks/junit-triton.xml" "${triton_tests[@]}" &
PYTEST_PID=$!
# the sanitizers one after another (each instruments a whole process; the spinning pool_generate
# comes last inside each smoke): the C++ kernels' turns wait for _C to load (the marker below)
sanitize() {
  local backend=$1 tool=$2
  if [ "$backend" = cuda ]; then
    while [ ! -f "$OUT/logs/cuda-loaded" ] && [ ! -f "$OUT/logs/cuda-failed" ] && (( $(left) > 20 )); do sleep 2; done
    [ -f "$OUT/logs/cuda-loaded" ] || { skip "san-$tool-cuda" "_C did not load"; return; }
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # every tensor its own allocation: overruns show
  fi
  run "san-$tool-$backend" 50 "$SAN" --tool "$tool" --error-exitcode 99 --print-limit 30 \
    "${VALIDATE[@]}" smoke --backend "$backend"
}
if [ -n "$HAVE_SAN" ]; then
  ( sanitize triton memcheck; sanitize cuda memcheck; sanitize triton initcheck; sanitize cuda initcheck
    sanitize triton synccheck; sanitize triton racecheck ) &
  SAN_PID=$!
else
  skip sanitizers "compute-sanitizer not found or quick run"; SAN_PID=
fi
wait "${pids[@]}"

# ------------------------------------------------------------------ after the build: CUDA C++
if [ -n "$BUILD_PID" ]; then
  wait "$BUILD_PID"
  tail -3 "$OUT/logs/build.log"
  # _C must load: a missing or stale extension fails here, loudly
  run cuda-extension-loads 30 "$PY" -c "
import torch, para_kernels
from para_kernels.ops import cuda_ops as c
assert c.loaded, 'para_kernels._C did not load: ' + str(c.reason)
print('loaded:', c.build_info, 'kernels:', c.kernel_ops())
assert c.is_available(torch.device('cuda')), 'built, but not for this GPU: ' + str(c._gpu_not_supported(torch.device('cuda')))" \
    && touch "$OUT/logs/cuda-loaded" || touch "$OUT/logs/cuda-failed"
  pids=()
  for op in pool generate scale; do
    run "table-cuda-$op" 60 "${VALIDATE[@]}" table --op "$op" --backend cuda \
      --out "$OUT/checks/table-cuda-$op.jsonl" & pids+=($!)
  done
  run graphs-cuda 45 "${VALIDATE[@]}" graphs --backend cuda --out "$OUT/checks/graphs-cuda.jsonl" & pids+=($!)
  run determinism-cuda 30 "${VALIDATE[@]}" determinism --backend cuda \
    --out "$OUT/checks/determinism-cuda.jsonl" & pids+=($!)
  wait "${pids[@]}"
  big cuda pool scale
fi

if [ -n "$BUILD_PID" ] && (( $(left) > 20 )); then
  run pytest-cuda "$(left)" "${PYTEST[@]}" --junitxml "$OUT/checks/junit-cuda.xml" \
    tests/ops/test_pool.py tests/ops/test_scale.py tests/ops/test_generate.py -k "test_cuda_ or cuda-cuda"
fi
wait "$PYTEST_PID"
[ -n "${SAN_PID:-}" ] && wait "$SAN_PID"

# ------------------------------------------------------------------ report
"$PY" scripts/gpu_validate.py report "$OUT/checks" > "$OUT/logs/report.log" 2>&1
cp "$OUT/checks/validation.md" "$OUT/validation.md" 2>/dev/null
status=0
grep -qE "FAILED|KILLED" "$LINES" && status=1
grep -q "| FAIL |" "$OUT/checks/validation.md" 2>/dev/null && status=1
{
  echo "== summary (t=$(now) s of a ${BUDGET} s budget): status $status"
  cat "$LINES"
  echo
  head -1 "$OUT/checks/validation.md" 2>/dev/null
  grep "| FAIL |" "$OUT/checks/validation.md" 2>/dev/null | head -60
  grep -hE "ERROR SUMMARY" "$OUT"/logs/san-*.log 2>/dev/null | sed 's/^/sanitizer: /'
  grep -hE "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT"/logs/pytest-*.log 2>/dev/null | tail -25
} > "$OUT/summary.txt"
tar czf "$OUT/gpu_check.tgz" -C "$OUT" env.txt logs checks 2>/dev/null && rm -rf "$OUT/logs" "$OUT/checks"
cat "$OUT/summary.txt"
exit $status
