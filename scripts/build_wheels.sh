#!/usr/bin/env bash
# Build para_kernels wheels (README, "Wheels").
#
#   scripts/build_wheels.sh        one wheel for the Python, torch and CUDA at hand (PYTHON,
#                                  default .venv/bin/python, else python3) into dist/
#   TORCH=2.10.0 CUDA=12.8 PYTHONS="3.10 3.11 3.12 3.13" scripts/build_wheels.sh
#                                  in a manylinux container (.github/workflows/wheels.yml): per
#                                  Python, a venv with torch for that CUDA from PyTorch's index,
#                                  a build, then auditwheel repair into $DIST (wheelhouse/)
#
# Also read: DIST, TORCH_CUDA_ARCH_LIST (8.0;9.0+PTX), MAX_JOBS, NVCC_THREADS, CCACHE=1,
# PARA_KERNELS_LOCAL_VERSION (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}

build() {  # $1: a Python with torch installed, $2: where the wheel goes
  rm -rf build/lib.* build/bdist.* ./*.egg-info  # stale modules there would go into the wheel
  # --no-build-isolation: the build needs the torch it is for, not a fresh one from PyPI
  "$1" -m pip wheel -q --no-build-isolation --no-deps -w "$2" .
}

if [ -z "${TORCH:-}" ]; then
  PY=${PYTHON:-}
  [ -z "$PY" ] && { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
  build "$PY" "${DIST:-dist}"
  exit
fi

: "${CUDA:?CUDA=12.6|12.8|13.0 goes with TORCH}"
DIST=${DIST:-wheelhouse}
index="https://download.pytorch.org/whl/cu${CUDA/./}"
export PARA_KERNELS_FORCE_BUILD=1  # a release wheel without _C would be a silent downgrade
if [ "${CCACHE:-}" = 1 ]; then     # ccache's g++/c++ links first on PATH; torch runs $PYTORCH_NVCC
  export PATH="/usr/lib64/ccache:$PATH" PYTORCH_NVCC="ccache ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
for py in ${PYTHONS:-3.10 3.11 3.12 3.13}; do
  tag="cp${py/./}"
  env="/tmp/venv-$tag"
  "/opt/python/$tag-$tag/bin/python" -m venv --clear "$env"
  "$env/bin/pip" install -q --upgrade pip "setuptools>=77" wheel ninja
  "$env/bin/pip" install -q "torch==$TORCH" --index-url "$index"
  build "$env/bin/python" "dist-raw/$tag"
  # torch and the CUDA runtime come from the torch wheel beside ours: never bundle them
  auditwheel repair -w "$DIST" --plat "${PLAT:-manylinux_2_28_x86_64}" \
    --exclude 'libc10*.so' --exclude 'libtorch*.so' --exclude 'libcudart.so*' \
    --exclude 'libcuda.so*' --exclude 'libshm.so' "dist-raw/$tag"/para_kernels-*.whl
done
ls -l "$DIST"
