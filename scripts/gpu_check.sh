#!/usr/bin/env bash
# The one prepared device run (H200): environment, build, the whole test suite on the GPU,
# then the benchmarks. Everything lands under $OUT (the device tool brings it back); at most
# 8 files come back, so the benchmark folder is packed into one archive.
#
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh          # on the device
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh           # dry run here: a test subset, bench --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
status=0
step() { echo "== $* ($(date -u +%H:%M:%S))"; }

{
  step environment
  nvidia-smi || echo "no nvidia-smi"
  git rev-parse HEAD 2>/dev/null || true
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "transformers", "safetensors", "peft", "hypothesis"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "MISSING", e)
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step install
# Installs in place and builds the CUDA C++ extension (csrc/); no network is needed.
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { status=1; tail -20 "$OUT/install.log"; }

step tests
if [ -n "${GPU_CHECK_QUICK:-}" ]; then
  tests=(tests/test_ops.py -k "scale or pool" -x)
else
  tests=(tests -m "not real_model and not wheel")  # the wheel test builds a second copy: minutes
fi
"$PY" -m pytest "${tests[@]}" -q -p no:cacheprovider --durations=15 > "$OUT/tests.log" 2>&1 || status=1
tail -25 "$OUT/tests.log"

step memcheck
# the CUDA C++ kernel tests under compute-sanitizer (small shapes only: it is ~100x slower)
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$SAN" ] && [ -z "${GPU_CHECK_QUICK:-}" ]; then
  timeout 420 "$SAN" --tool memcheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_cuda_kernels_pool_scale.py tests/test_cuda_kernels_generate.py -k "not llama and not 4097" \
    > "$OUT/memcheck.log" 2>&1 || status=1
  tail -5 "$OUT/memcheck.log"
else
  echo "compute-sanitizer not found (or quick run): memcheck skipped" | tee "$OUT/memcheck.log"
fi

step racecheck
# a Triton subset under racecheck (shared-memory hazards in the compiled kernels; fp32, small shapes)
if [ -x "$SAN" ] && [ -z "${GPU_CHECK_QUICK:-}" ]; then
  timeout 240 "$SAN" --tool racecheck --error-exitcode 99 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_triton_scale.py tests/test_triton_pool.py tests/test_triton_pool_generate.py \
    -k "float32 and not llama and not property" > "$OUT/racecheck.log" 2>&1 || status=1
  tail -5 "$OUT/racecheck.log"
else
  echo "compute-sanitizer not found (or quick run): racecheck skipped" | tee "$OUT/racecheck.log"
fi

step bench
mode=--full
[ -n "${GPU_CHECK_QUICK:-}" ] && mode=--quick
# bounded, so the archive below is still made if it overruns (the report is written after each
# serving model, so a cut-short run keeps its finished parts)
timeout "${BENCH_TIMEOUT_S:-480}" "$PY" -m bench "$mode" --out "$OUT/bench" > "$OUT/bench.log" 2>&1 || status=1
tail -60 "$OUT/bench.log"
tar czf "$OUT/bench.tgz" -C "$OUT" bench 2>/dev/null && rm -rf "$OUT/bench"

step "done: status $status"
exit $status
