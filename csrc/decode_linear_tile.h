// The decode GEMV kernel, written once and compiled once per instruction set: the
// includer opens a `#pragma GCC target` region and a namespace that defines
//   V (the fp32 vector type), kW (its lane count), vzero(), vfma(a, b, c) = a*b + c,
//   vsum(v), and vload() for const float*, const c10::Half* and const c10::BFloat16*,
// and the macros DC_TILE_INLINE and DC_UNROLL.
// No include guard on purpose.

// out[m * N] = dot(w, x[m]) for one weight row and MB activation rows. Each weight vector
// is loaded (and widened to fp32) once and used MB times. One weight row at a time keeps
// the weight reads a single sequential stream. Measured on Zen 4, one core, fp16 weights
// streamed from DRAM: 4 interleaved rows per tile reached 10 GB/s against 17 for one row;
// two accumulators per activation row (U) 20 GB/s, four only 10.
template <int MB, typename T>
DC_TILE_INLINE void row_dot(const float* x, const T* w, int64_t K, int64_t N, float* out) {
  constexpr int U = MB <= 2 ? 2 : 1;
  V acc[U][MB];
  DC_UNROLL
  for (int u = 0; u < U; ++u)
    DC_UNROLL
    for (int m = 0; m < MB; ++m) acc[u][m] = vzero();
  int64_t k = 0;
  for (; k + U * kW <= K; k += U * kW) {
    DC_UNROLL
    for (int u = 0; u < U; ++u) {
      const V wv = vload(w + k + u * kW);
      DC_UNROLL
      for (int m = 0; m < MB; ++m) acc[u][m] = vfma(wv, vload(x + m * K + k + u * kW), acc[u][m]);
    }
  }
  for (; k + kW <= K; k += kW) {
    const V wv = vload(w + k);
    DC_UNROLL
    for (int m = 0; m < MB; ++m) acc[0][m] = vfma(wv, vload(x + m * K + k), acc[0][m]);
  }
  DC_UNROLL
  for (int m = 0; m < MB; ++m) {
    float s = 0.0f;
    DC_UNROLL
    for (int u = 0; u < U; ++u) s += vsum(acc[u][m]);
    for (int64_t j = k; j < K; ++j) s += static_cast<float>(w[j]) * x[m * K + j];
    out[m * N] = s;
  }
}

// Weight rows [n0, n1) against all M activation rows, four at a time: each weight row is
// read from memory once and from L1 for the later groups of activation rows.
template <typename T>
void rows(const float* x, int64_t M, const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row_dot<4>(x + m * K, w + n * K, K, N, out + m * N + n);
    if (M - m >= 2) {
      row_dot<2>(x + m * K, w + n * K, K, N, out + m * N + n);
      m += 2;
    }
    if (m < M) row_dot<1>(x + m * K, w + n * K, K, N, out + m * N + n);
  }
}
