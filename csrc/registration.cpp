// Operator schemas of the depthcut library and the Python module stub.
// Device kernels register themselves in cpu_ops.cpp, cpu_decode.cpp, decode_linear.cpp and cuda_ops.cu.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(depthcut, m) {
  // Per-token NLL of hidden @ weight.T without materialising [M, V] logits.
  // softcap <= 0: no softcap; chunk <= 0: the kernel's default vocabulary chunk.
  m.def(
      "linear_nll_forward(Tensor hidden, Tensor weight, Tensor targets, float softcap, int chunk)"
      " -> (Tensor nll, Tensor lse)");
  m.def(
      "linear_nll_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor grad_nll,"
      " float softcap, int chunk) -> Tensor");
  // sum |W * (dy^T x)| without storing the full weight gradient.
  m.def("taylor_saliency(Tensor x, Tensor dy, Tensor weight) -> Tensor");
  // x @ weight.T + bias for a few fp32 rows, fp16/bf16/fp32 weights widened in registers.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The decode-step kernels of triton_kernels/decode.py (same arguments; None -> 0).
  m.def("add_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor y, Tensor h)");
  m.def(
      "rope_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor pos, Tensor(a!) k_cache, Tensor(b!) v_cache,"
      " Tensor cache_pos, int n_q, int n_kv, Tensor? q_norm, Tensor? k_norm, float eps) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor start, Tensor cache_pos, int window,"
      " float scale, float softcap) -> Tensor");
  m.def("swiglu(Tensor gu, bool gelu) -> Tensor");
}

// `import engine._C` only has to load the shared object: the ops live in torch.ops.depthcut.
static struct PyModuleDef depthcut_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&depthcut_module);
}
