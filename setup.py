"""Build script. The package is pure Python today; the CUDA C++ extension (csrc/) plugs in
here, built only when a CUDA build of torch and nvcc are present.

torch is a dependency, never downloaded by this script: install it first, then
``pip install -e . --no-build-isolation``.
"""
from setuptools import setup

setup()
