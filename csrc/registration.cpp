// Operator schemas of the depthcut library and the Python module stub.
// Device kernels register themselves in cpu_ops.cpp, cpu_kl_ops.cpp, cpu_decode.cpp, decode_linear.cpp,
// cpu_kquants.cpp, cpu_legacy_quants.cpp, cpu_iquants.cpp and cuda_ops.cu.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(depthcut, m) {
  // Per-token NLL of hidden @ weight.T without materialising [M, V] logits.
  // softcap: none when absent, else positive; chunk: the kernel's default vocabulary chunk when absent.
  m.def(
      "linear_nll_forward(Tensor hidden, Tensor weight, Tensor targets, float? softcap=None, int? chunk=None)"
      " -> (Tensor nll, Tensor lse)");
  m.def(
      "linear_nll_backward(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor grad_nll,"
      " float? softcap=None, int? chunk=None) -> Tensor");
  // linear_nll_forward and d(sum nll) / d hidden (hidden's dtype; zero rows where ignored) together,
  // for a frozen head: the gradient comes from the forward's logits, none are recomputed (CPU only).
  m.def(
      "linear_nll_forward_grad(Tensor hidden, Tensor weight, Tensor targets, float? softcap=None, int? chunk=None)"
      " -> (Tensor nll, Tensor lse, Tensor grad_hidden)");
  // The same sweep with the head weight gradient too (full training; tied embeddings get it):
  // grad_hidden in hidden's dtype, grad_weight fp32 [V, H].
  m.def(
      "linear_nll_backward_full(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor grad_nll,"
      " float? softcap=None, int? chunk=None) -> (Tensor grad_hidden, Tensor grad_weight)");
  // Per-token KL(teacher || student) of z_s = hs @ ws.T and z_t = ht @ wt.T (each softcapped when its
  // softcap is given; the vocabulary is shared, the hidden sizes need not be), without either [M, V] logit
  // matrix; rows whose target is -100 give 0 and no gradient. All outputs fp32 [M].
  m.def(
      "linear_kl_forward(Tensor hs, Tensor ws, Tensor ht, Tensor wt, Tensor targets, float? softcap_s=None,"
      " float? softcap_t=None, int? chunk=None) -> (Tensor kl, Tensor lse_s, Tensor lse_t)");
  // Gradient of sum(grad_kl * kl) in hs (hs's dtype) and, if need_weight_grad, in ws (fp32 [V, H];
  // else an empty [0]).
  m.def(
      "linear_kl_backward(Tensor hs, Tensor ws, Tensor ht, Tensor wt, Tensor targets, Tensor lse_s, Tensor lse_t,"
      " Tensor grad_kl, float? softcap_s=None, float? softcap_t=None, bool need_weight_grad=False, int? chunk=None)"
      " -> (Tensor grad_hs, Tensor grad_ws)");
  // sum |W * (dy^T x)| without storing the full weight gradient.
  m.def("taylor_saliency(Tensor x, Tensor dy, Tensor weight) -> Tensor");
  // x @ weight.T + bias for a few fp32 rows, fp16/bf16/fp32 weights widened in registers.
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The decode-step kernels of triton_kernels/decode.py (same arguments and defaults).
  m.def("add_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor y, Tensor h)");
  m.def(
      "rope_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor pos, Tensor(a!) k_cache, Tensor(b!) v_cache,"
      " Tensor cache_pos, int n_q, int n_kv, Tensor? q_norm=None, Tensor? k_norm=None, float eps=1e-06) -> Tensor");
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor start, Tensor cache_pos, int? window,"
      " float scale, float? softcap=None) -> Tensor");
  m.def("swiglu(Tensor gu, bool gelu=False) -> Tensor");
  // GGML K-quant super-blocks (qtype q2_k ... q6_k) of fp32 weight [rows, cols], cols a multiple of 256:
  // uint8 [rows, bytes per row]; importance: fp32 [cols] column weights of the squared error (CPU only).
  m.def("quantize_kquant(Tensor weight, str qtype, Tensor? importance=None) -> Tensor");
  // GGML IQ4_NL blocks (32) or IQ4_XS super-blocks (256) of fp32 weight [rows, cols] (cpu_iquants.cpp):
  // uint8 [rows, bytes per row]; importance as for quantize_kquant (CPU only).
  m.def("quantize_iquant(Tensor weight, str qtype, Tensor? importance=None) -> Tensor");
  // GGML legacy blocks of 32 (qtype q4_0, q4_1, q5_0, q5_1, q8_0) of fp32 weight [rows, cols]: llama.cpp's
  // round-to-nearest, or with importance (q4_0, q5_0, q5_1) the weighted scale search (CPU only).
  m.def("quantize_legacy(Tensor weight, str qtype, Tensor? importance=None) -> Tensor");
}

// `import depthcut._C` only has to load the shared object: the ops live in torch.ops.depthcut.
static struct PyModuleDef depthcut_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  return PyModule_Create(&depthcut_module);
}
