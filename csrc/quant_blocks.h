// Shared pieces of the GGML block quantisers (cpu_kquants.cpp, cpu_legacy_quants.cpp,
// cpu_iquants.cpp), each of which repeats a numpy reference operation for operation: sums as
// the references' halving tree, no fused multiply-adds, round half to even, fp16 stored little
// endian. Everything has internal linkage: each including file gets its own copies.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// a * b + c must round twice, as numpy does: no contraction into FMA.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

// Rounding is a single instruction from SSE4.1 on; the loops vectorise with AVX2.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define DC_MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define DC_MULTIVERSION
#endif
// Helpers must be inlined into each ISA clone, or the loops calling them stay scalar.
#define DC_INLINE inline __attribute__((always_inline))

namespace {

constexpr float kHalfMax = 65504.0f;

// Sum of a[0..N) by halving (N a power of two): the order of kquants.tree_sum.
template <int N>
DC_INLINE float tree_sum(const float* a) {
  float t[N / 2];
  for (int i = 0; i < N / 2; ++i) t[i] = a[i] + a[i + N / 2];
  for (int h = N / 4; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) t[i] = t[i] + t[i + h];
  return t[0];
}

// Sum of a[i] * b[i] over [0, N): the products rounded, then the halving tree (kquants.tree_sum(a * b)).
template <int N>
DC_INLINE float tree_dot(const float* a, const float* b) {
  float t[N];
  for (int i = 0; i < N; ++i) t[i] = a[i] * b[i];
  return tree_sum<N>(t);
}

// np.clip(np.rint(v), lo, hi) for integer bounds: clamp, then round half to even by adding and
// taking away 1.5 * 2^23 (no libm call on baseline x86-64, where nearbyint is one).
DC_INLINE float round_clamped(float v, float lo, float hi) {
  constexpr float kMagic = 12582912.0f;
  return (std::min(std::max(v, lo), hi) + kMagic) - kMagic;
}

// Index of the first largest |v[i]|.
DC_INLINE int peak_index(const float* v, int n) {
  int p = 0;
  for (int i = 1; i < n; ++i)
    if (std::fabs(v[i]) > std::fabs(v[p])) p = i;
  return p;
}

// fp16 of v, +0 for -0 (kquants.fp16).
DC_INLINE c10::Half half_of(float v) { return c10::Half(v + 0.0f); }

DC_INLINE void put_half(uint8_t* dst, c10::Half h) {
  dst[0] = static_cast<uint8_t>(h.x & 0xFF);
  dst[1] = static_cast<uint8_t>(h.x >> 8);
}

}  // namespace
