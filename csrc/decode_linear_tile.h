// The decode GEMV kernel, written once and compiled once per instruction set: the
// includer opens a `#pragma GCC target` region and a namespace that defines
//   V (the fp32 vector type), kW (its lane count), vzero(), vfma(a, b, c) = a*b + c,
//   vsum(v), and vload() for const float*, const c10::Half* and const c10::BFloat16*,
// and the macros DC_TILE_INLINE and DC_UNROLL.
// No include guard on purpose.

// out[m * N + r] = dot(w[r], x[m]) for R weight rows and MB activation rows. Each weight
// vector is loaded (and widened to fp32) once and used MB times, each activation vector
// once for R rows; U accumulators per pair hide the FMA latency. The loops are unrolled so
// the R * MB * U accumulators live in registers.
template <int R, int MB, int U, typename T>
DC_TILE_INLINE void tile(const float* x, const T* w, int64_t K, int64_t N, float* out) {
  V acc[R][MB][U];
  DC_UNROLL
  for (int r = 0; r < R; ++r)
    DC_UNROLL
    for (int m = 0; m < MB; ++m)
      DC_UNROLL
      for (int u = 0; u < U; ++u) acc[r][m][u] = vzero();
  int64_t k = 0;
  for (; k + U * kW <= K; k += U * kW) {
    DC_UNROLL
    for (int u = 0; u < U; ++u) {
      V xv[MB];
      DC_UNROLL
      for (int m = 0; m < MB; ++m) xv[m] = vload(x + m * K + k + u * kW);
      DC_UNROLL
      for (int r = 0; r < R; ++r) {
        const V wv = vload(w + r * K + k + u * kW);
        DC_UNROLL
        for (int m = 0; m < MB; ++m) acc[r][m][u] = vfma(wv, xv[m], acc[r][m][u]);
      }
    }
  }
  for (; k + kW <= K; k += kW) {
    V xv[MB];
    DC_UNROLL
    for (int m = 0; m < MB; ++m) xv[m] = vload(x + m * K + k);
    DC_UNROLL
    for (int r = 0; r < R; ++r) {
      const V wv = vload(w + r * K + k);
      DC_UNROLL
      for (int m = 0; m < MB; ++m) acc[r][m][0] = vfma(wv, xv[m], acc[r][m][0]);
    }
  }
  DC_UNROLL
  for (int r = 0; r < R; ++r)
    DC_UNROLL
    for (int m = 0; m < MB; ++m) {
      float s = 0.0f;
      DC_UNROLL
      for (int u = 0; u < U; ++u) s += vsum(acc[r][m][u]);
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(w[r * K + j]) * x[m * K + j];
      out[m * N + r] = s;
    }
}

// R weight rows against all M activation rows, four at a time: the rows are read from
// memory once and from L1 for the later groups of activation rows.
template <int R, typename T>
DC_TILE_INLINE void row_block(const float* x, int64_t M, const T* w, int64_t K, int64_t N, float* out) {
  constexpr int U = R == 1 ? 2 : 1;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<R, 4, 1>(x + m * K, w, K, N, out + m * N);
  if (M - m >= 2) {
    tile<R, 2, U>(x + m * K, w, K, N, out + m * N);
    m += 2;
  }
  if (m < M) tile<R, 1, U>(x + m * K, w, K, N, out + m * N);
}

// Weight rows [n0, n1). With few activation rows the step is bound by reading the weights,
// and one row at a time keeps that a single sequential stream (on Zen 4, one core, fp16
// weights from DRAM: 17 GB/s against 10 for tiles of 4 interleaved rows, and 20 with two
// accumulators per row against 10 with four). From 8 rows on it is bound by loads and
// FMAs, where 4 x 4 tiles need half the loads per FMA (2 cores, a SmolLM2-sized step at
// 16 rows: 46 ms against 71 in fp32; at 4 rows the single rows stay faster).
template <typename T>
void rows(const float* x, int64_t M, const T* w, int64_t K, int64_t N, int64_t n0, int64_t n1, float* out) {
  int64_t n = n0;
  if (M >= 8)
    for (; n + 4 <= n1; n += 4) row_block<4>(x, M, w + n * K, K, N, out + n);
  for (; n < n1; ++n) row_block<1>(x, M, w + n * K, K, N, out + n);
}
