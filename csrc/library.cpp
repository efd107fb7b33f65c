// The para_cuda:: op schemas and the Python module para_kernels._C that carries them.
//
// Why a namespace of its own rather than CUDA kernels registered at para::'s CUDA key: the
// para:: ops are Python custom ops whose implementation checks the arguments and then asks
// the one dispatch point (para_kernels/ops/dispatch.py: set_backend / PARA_KERNELS_BACKEND,
// CUDA C++ vs Triton vs reference, warn-once fallback) which backend runs. A kernel at
// para::'s CUDA key would run instead of that implementation, skipping the checks and the
// choice. So the C++ kernels live under para_cuda::, and para_kernels/ops/cuda_ops/
// hands torch.ops.para_cuda.* to the dispatcher as the "cuda" backend.
//
// The schemas are the para:: ones verbatim (tests/test_cuda_build.py compares them), so
// each para_cuda op is a drop-in implementation. The kernels register themselves in
// pool.cpp, generate.cpp and scale.cpp with TORCH_LIBRARY_IMPL(para_cuda, CUDA, m).

#include <Python.h>
#include <cuda_runtime_api.h>  // CUDART_VERSION: the CUDA this file was compiled against
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION: the torch headers used

TORCH_LIBRARY(para_cuda, m) {
  m.def("pool(Tensor hidden, Tensor prompt_start, Tensor prompt_end, str mode, Tensor? w_sa=None) -> Tensor");
  m.def(
      "pool_backward(Tensor grad, Tensor hidden, Tensor prompt_start, Tensor prompt_end, str mode, "
      "Tensor? w_sa) -> (Tensor, Tensor)");
  m.def(
      "generate(Tensor pooled, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, "
      "Tensor adapter_ids, str activation, Tensor? act_params=None) -> Tensor");
  m.def(
      "generate_backward(Tensor grad, Tensor pooled, Tensor w_down, Tensor b_down, Tensor w_up, "
      "Tensor b_up, Tensor adapter_ids, str activation, Tensor? act_params) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("scale(Tensor x, Tensor v, Tensor? token_rows=None) -> Tensor");
  m.def("scale_backward(Tensor grad, Tensor x, Tensor v, Tensor? token_rows) -> (Tensor, Tensor)");
}

// What the binary itself was compiled against, independent of _build_info.json (which the
// Python side checks before loading this module): shown by `python -m para_kernels.info`.
static PyObject* build_info(PyObject*, PyObject*) {
  return Py_BuildValue("{s:s,s:i,s:s}", "torch", TORCH_VERSION, "cudart_version", CUDART_VERSION, "cxx", __VERSION__);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Versions this extension was compiled against."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                             "para_cuda:: op registrations (CUDA C++ kernels of para_kernels)", -1, methods};

// Importing the module runs the static registrations above; the module itself only carries
// build_info.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
