// decode_linear: x @ weight.T (+ bias) for the few activation rows of a decode step,
// with fp16/bf16/fp32 weights, fp32 activations and fp32 accumulation.
//
// A CPU decode step streams every weight once per token, so its speed is the weight
// bytes over the memory bandwidth. ATen either multiplies in the weight dtype (fp16/
// bf16 activations: the greedy tokens drift from the fp32 model's) or upcasts the
// weight first (twice the traffic). This kernel widens each weight vector in registers
// instead: half the bytes of fp32, the arithmetic of an fp32 model with rounded weights.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DC_X86 1
#endif
#define DC_TILE_INLINE inline __attribute__((always_inline))
#define DC_UNROLL _Pragma("GCC unroll 16")

namespace {

#ifdef DC_X86
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
using V = __m512;
constexpr int64_t kW = 16;
DC_TILE_INLINE V vzero() { return _mm512_setzero_ps(); }
DC_TILE_INLINE V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
DC_TILE_INLINE float vsum(V v) { return _mm512_reduce_add_ps(v); }
DC_TILE_INLINE V vload(const float* p) { return _mm512_loadu_ps(p); }
DC_TILE_INLINE V vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
DC_TILE_INLINE V vload(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
#include "decode_linear_tile.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
using V = __m256;
constexpr int64_t kW = 8;
DC_TILE_INLINE V vzero() { return _mm256_setzero_ps(); }
DC_TILE_INLINE V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
DC_TILE_INLINE float vsum(V v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
DC_TILE_INLINE V vload(const float* p) { return _mm256_loadu_ps(p); }
DC_TILE_INLINE V vload(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
DC_TILE_INLINE V vload(const c10::BFloat16* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
#include "decode_linear_tile.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace portable {  // any other CPU: one lane, same tiles
using V = float;
constexpr int64_t kW = 1;
DC_TILE_INLINE V vzero() { return 0.0f; }
DC_TILE_INLINE V vfma(V a, V b, V c) { return a * b + c; }
DC_TILE_INLINE float vsum(V v) { return v; }
template <typename T>
DC_TILE_INLINE V vload(const T* p) { return static_cast<float>(*p); }
#include "decode_linear_tile.h"
}  // namespace portable

enum class Isa { kAvx512, kAvx2, kPortable };

// The best build this CPU runs; DEPTHCUT_CPU_ISA=avx2|portable caps it (read once), so
// the tests can check every build on one machine.
Isa detect_isa() {
  const char* cap = std::getenv("DEPTHCUT_CPU_ISA");
  const std::string limit = cap ? cap : "";
  if (limit == "portable") return Isa::kPortable;
#ifdef DC_X86
  __builtin_cpu_init();
  if (limit != "avx2" && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kPortable;
}

template <typename T>
void run_rows(Isa isa, const float* x, int64_t M, const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1,
              float* out) {
  switch (isa) {
#ifdef DC_X86
    case Isa::kAvx512: return avx512::rows(x, M, w, K, N, n0, n1, out);
    case Isa::kAvx2: return avx2::rows(x, M, w, K, N, n0, n1, out);
#endif
    default: return portable::rows(x, M, w, K, N, n0, n1, out);
  }
}

// Above this many rows (a prefill) ATen's blocked GEMM is the right tool: the weight is
// upcast and multiplied in fp32. Up to here the tiles beat it (16 rows of a SmolLM2-sized
// step: 46-51 ms against 74-82 in fp32 on 2 Zen 4 cores).
constexpr int64_t kMaxRows = 16;
// 64 weight rows per task: big enough to amortise scheduling, small enough that a
// 576-row projection still splits over the cores.
constexpr int64_t kGrainRows = 64;

at::Tensor decode_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                             const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight_in.dim() == 2, "decode_linear: weight must be [N, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, "decode_linear: x must be fp32");
  const auto wt = weight_in.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kHalf || wt == at::kBFloat16,
              "decode_linear: weight must be fp32, fp16 or bf16");
  const int64_t N = weight_in.size(0), K = weight_in.size(1);
  TORCH_CHECK(x_in.size(-1) == K, "decode_linear: x has ", x_in.size(-1), " features, weight ", K);
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || bias->numel() == N, "decode_linear: bias has ", has_bias ? bias->numel() : 0,
              " elements for ", N, " outputs");
  const c10::optional<at::Tensor> bias32 = has_bias ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
  if (M > kMaxRows) return at::linear(x_in, weight_in.to(at::kFloat), bias32);
  const at::Tensor weight = weight_in.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  static const Isa isa = detect_isa();
  const float* xp = x.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const auto run = [&](const auto* wp) {
    at::parallel_for(0, N, kGrainRows, [&](int64_t n0, int64_t n1) { run_rows(isa, xp, M, wp, K, N, n0, n1, op); });
  };
  if (wt == at::kHalf) run(weight.const_data_ptr<c10::Half>());
  else if (wt == at::kBFloat16) run(weight.const_data_ptr<c10::BFloat16>());
  else run(weight.const_data_ptr<float>());
  if (bias32) out.add_(*bias32);
  auto shape = x_in.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("decode_linear", &decode_linear_cpu);
}
