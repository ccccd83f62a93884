// Shared pieces of the CPU head kernels (cpu_ops.cpp: NLL; cpu_kl_ops.cpp: KL): row loops
// over fp32 logit rows, compiled for several ISAs (target_clones) so the wheel needs no
// -march, and the work split that drives ATen GEMM tiles (oneDNN/MKL) over the vocabulary.
// Everything has internal linkage: each including file gets its own copies.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define DC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DC_MULTIVERSION
#endif
// Helpers must be inlined into each ISA clone, or the loops calling them stay scalar.
#define DC_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t kIgnoreIndex = -100;
// Vocabulary chunk: on a 2-core Zen 4 (M=2560, V=49152, H=576) 1024 beat 2048 and
// 4096; a [128 x 1024] tile and its reduction stay in L2.
constexpr int64_t kDefaultChunk = 1024;
constexpr int64_t kRowBlock = 128;

// exp by Cody-Waite reduction and the Cephes polynomial (~2 ulp), clamped to
// [-87, 88]. Rounding uses the 1.5 * 2^23 trick instead of floor(), so the
// function is branch- and call-free and the loops below vectorise on any ISA.
DC_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  constexpr float kMagic = 12582912.0f;
  const float t = x * 1.44269504088896341f + kMagic;
  const float k = t - kMagic;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;  // 2^k
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

DC_INLINE float tanh_approx(float x) {
  x = x > 9.0f ? 9.0f : x;  // tanh(9) == 1 in fp32
  x = x < -9.0f ? -9.0f : x;
  return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f);
}

DC_INLINE float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Round to nearest even, branch-free (the values here are finite).
DC_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

DC_MULTIVERSION void bf16_to_float_row(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

DC_MULTIVERSION void float_to_bf16_row(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

DC_MULTIVERSION void softcap_row(const float* src, float* dst, int64_t n, float softcap) {
  const float inv = 1.0f / softcap;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = softcap * tanh_approx(src[i] * inv);
}

DC_MULTIVERSION float row_max(const float* z, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

DC_MULTIVERSION float row_sum_exp(const float* z, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp_approx(z[i] - shift);
  return s;
}

// One chunk of an online softmax normaliser: running max m and sum s of exp(z - m).
inline void online_lse(const float* z, int64_t n, float& m, float& s) {
  const float m_new = std::max(m, row_max(z, n));
  s = s * exp_approx(m - m_new) + row_sum_exp(z, n, m_new);
  m = m_new;
}

// Logit tiles are fp32 or bf16 (the dtypes the scorer uses) and are read and written a
// row at a time as fp32, so the kernels need no per-dtype instantiation: the dtype
// branch costs once per row of `chunk` elements, next to a GEMM of H times that. A tile's
// rows may lie wider apart than its width (stride(0) >= size(1)): a column slice of a
// whole-vocabulary row buffer is a tile too.

// Row i of a logit tile as fp32 with the optional softcap (c * tanh(z / c)) applied;
// fp32 rows without softcap are read in place, anything else lands in scratch.
inline const float* tile_row(const at::Tensor& tile, int64_t i, float* scratch, float softcap) {
  const int64_t n = tile.size(1), o = i * tile.stride(0);
  if (tile.scalar_type() == at::kFloat) {
    const float* src = tile.const_data_ptr<float>() + o;
    if (softcap <= 0.0f) return src;
    softcap_row(src, scratch, n, softcap);
  } else {
    bf16_to_float_row(reinterpret_cast<const uint16_t*>(tile.const_data_ptr<at::BFloat16>()) + o, scratch, n);
    if (softcap > 0.0f) softcap_row(scratch, scratch, n, softcap);
  }
  return scratch;
}

inline void store_tile_row(const float* src, const at::Tensor& tile, int64_t i) {
  const int64_t n = tile.size(1), o = i * tile.stride(0);
  if (tile.scalar_type() == at::kFloat) {
    std::memcpy(tile.mutable_data_ptr<float>() + o, src, n * sizeof(float));
  } else {
    float_to_bf16_row(src, reinterpret_cast<uint16_t*>(tile.mutable_data_ptr<at::BFloat16>()) + o, n);
  }
}

// Zero is all-zero bits in fp32 and bf16 alike.
inline void zero_tile_row(const at::Tensor& tile, int64_t i) {
  const int64_t e = tile.element_size();
  std::memset(static_cast<char*>(tile.mutable_data_ptr()) + i * tile.stride(0) * e, 0, tile.size(1) * e);
}

// hidden [M, H] and its head weight [V, H]: 2-D, one dtype, fp32 or bf16.
inline void check_head(const at::Tensor& hidden, const at::Tensor& weight, const char* op, const char* hn,
                       const char* wn) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, op, ": ", hn, " [M,H] and ", wn, " [V,H] must be 2-D, got ",
              hidden.dim(), "-D and ", weight.dim(), "-D");
  TORCH_CHECK(hidden.size(1) == weight.size(1), op, ": ", hn, " and ", wn, " disagree on H (", hidden.size(1),
              " vs ", weight.size(1), ")");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), op, ": ", hn, " and ", wn, " dtypes differ (",
              hidden.scalar_type(), " vs ", weight.scalar_type(), ")");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16, op,
              " (CPU): float32 or bfloat16 expected, got ", hidden.scalar_type());
}

inline void check_targets(const at::Tensor& targets, int64_t M, int64_t V, const char* op) {
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == M, op, ": targets must be [M] = [", M, "], got ",
              targets.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  const int64_t bad =
      targets.ne(kIgnoreIndex).logical_and(targets.lt(0).logical_or(targets.ge(V))).sum().item<int64_t>();
  TORCH_CHECK(bad == 0, op, ": ", bad, " targets outside [0, ", V, ") and not -100");
}

// A per-row input (lse, upstream gradient) as contiguous fp32 [M].
inline at::Tensor rows_f32(const at::Tensor& t, int64_t M, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == M, op, ": ", name, " must be [M] = [", M, "], got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

// The upstream gradient per row, 0 where the target is ignored (no gradient there).
inline at::Tensor row_grads(const at::Tensor& grad, const at::Tensor& targets, const char* op, const char* name) {
  return rows_f32(grad, targets.size(0), op, name).masked_fill(targets.eq(kIgnoreIndex), 0.0);
}

// Work split over row blocks x vocabulary ranges of whole chunks. by_vocab: each task
// owns one range for all rows, so it alone writes those rows of a weight gradient;
// otherwise tasks are (row block, range) pairs, enough to occupy every thread even for
// a handful of rows. Each task runs its GEMMs single-threaded (nested parallel regions
// are serial), on tiles that stay in cache.
struct Split {
  int64_t M, V, rows, row_blocks, vocab_splits, vocab_per_split, chunk;
  bool by_vocab;
};

inline Split make_split(int64_t M, int64_t V, int64_t chunk, bool by_vocab) {
  Split s;
  s.M = M;
  s.V = V;
  s.by_vocab = by_vocab;
  s.chunk = std::min(chunk, std::max<int64_t>(V, 1));
  s.rows = std::min<int64_t>(kRowBlock, std::max<int64_t>(M, 1));
  s.row_blocks = (M + s.rows - 1) / s.rows;
  const int64_t chunks = std::max<int64_t>(1, (V + s.chunk - 1) / s.chunk);
  const int64_t threads = at::get_num_threads();
  const int64_t want = by_vocab ? threads : (threads + s.row_blocks - 1) / std::max<int64_t>(s.row_blocks, 1);
  const int64_t splits = std::clamp<int64_t>(want, 1, chunks);
  const int64_t per_split = (chunks + splits - 1) / splits;
  s.vocab_splits = (chunks + per_split - 1) / per_split;  // no empty ranges
  s.vocab_per_split = per_split * s.chunk;
  return s;
}

// Whole-vocabulary row blocks: one task, and one tile [rows x V], per row block, whose
// thread holds all of the block's logits in a buffer of rows * V elements of elem_size
// bytes. Rows: at most kWholeRowBlock and as many as kRowBufferBytes allow (fewer for
// large vocabularies), never under kMinRows unless M is smaller; the blocks come in whole
// rounds of the threads where that keeps them at least kMinRows high. On a 2-core Zen 5
// (M=1016, V=49152, H=576) 256 rows beat 128 (bf16 -12%, fp32 -3%) and 512; the budget
// holds fp32 there to 170 rows, which was as fast as 256.
constexpr int64_t kWholeRowBlock = 256;
constexpr int64_t kRowBufferBytes = int64_t{32} << 20;
constexpr int64_t kMinRows = 16;

inline Split make_row_split(int64_t M, int64_t V, int64_t elem_size) {
  const int64_t threads = at::get_num_threads();
  const int64_t cap =
      std::clamp<int64_t>(kRowBufferBytes / std::max<int64_t>(V * elem_size, 1), kMinRows, kWholeRowBlock);
  int64_t blocks = std::max<int64_t>(1, (M + cap - 1) / cap);
  const int64_t balanced = (blocks + threads - 1) / threads * threads;
  if (M / balanced >= kMinRows) blocks = balanced;
  Split s;
  s.M = M;
  s.V = V;
  s.by_vocab = false;
  s.rows = std::max<int64_t>(1, (M + blocks - 1) / blocks);
  s.row_blocks = (M + s.rows - 1) / s.rows;
  s.vocab_splits = 1;
  s.vocab_per_split = s.chunk = std::max<int64_t>(V, 1);
  return s;
}

struct Tile {
  int64_t split, r0, nr, c0, nc;  // vocabulary split; rows [r0, r0 + nr); vocabulary [c0, c0 + nc)
};

// Calls work(tile) for every (row block, vocabulary chunk) tile, in parallel as the
// split says. make_worker() runs once per thread and returns that thread's work
// function, which owns its scratch buffers.
template <typename MakeWorker>
void sweep(const Split& sp, const MakeWorker& make_worker) {
  const int64_t tasks = sp.by_vocab ? sp.vocab_splits : sp.row_blocks * sp.vocab_splits;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the dispatcher's autograd exclusion.
    const at::AutoDispatchBelowAutograd below_autograd;
    auto work = make_worker();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t vs = task % sp.vocab_splits;
      const int64_t rb_lo = sp.by_vocab ? 0 : task / sp.vocab_splits;
      const int64_t rb_hi = sp.by_vocab ? sp.row_blocks : rb_lo + 1;
      const int64_t v_lo = vs * sp.vocab_per_split, v_hi = std::min(sp.V, v_lo + sp.vocab_per_split);
      // Chunk-major: a chunk's weight rows (and weight-gradient rows) stay in cache
      // across the row blocks.
      for (int64_t c0 = v_lo; c0 < v_hi; c0 += sp.chunk) {
        for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
          const int64_t r0 = rb * sp.rows;
          work(Tile{vs, r0, std::min(sp.rows, sp.M - r0), c0, std::min(sp.chunk, v_hi - c0)});
        }
      }
    }
  });
}

// Flat per-thread buffer -> its first rows x cols elements as a matrix.
inline at::Tensor view2d(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// The raw logit tile hidden[rows] @ weight[vocabulary].T, in the inputs' dtype, into buf.
inline at::Tensor logit_tile(const at::Tensor& buf, const at::Tensor& hidden, const at::Tensor& weight,
                             const Tile& t) {
  at::Tensor tile = view2d(buf, t.nr, t.nc);
  at::mm_out(tile, hidden.narrow(0, t.r0, t.nr), weight.narrow(0, t.c0, t.nc).t());
  return tile;
}

// acc (fp32) += a @ b. bf16 operands take the reduced-precision GEMM (the fast path)
// into step, of acc's shape, which is then accumulated in fp32.
inline void add_mm(const at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, at::Tensor step) {
  if (a.scalar_type() == at::kFloat) {
    acc.addmm_(a, b);
  } else {
    at::mm_out(step, a, b);
    acc.add_(step);
  }
}

// Gradient of the head: d/d hidden += G @ W into partial[split] (fp32 [splits, M, H],
// summed by the caller) and, when grad_weight is defined, d/dW += G.T @ hidden into
// grad_weight (fp32 [V, H]; the split must be by_vocab so that its rows have one writer).
// step: a flat buffer of max(rows, chunk) * H elements of G's dtype.
inline void add_head_grads(const at::Tensor& g, const at::Tensor& hidden, const at::Tensor& weight, const Tile& t,
                           const at::Tensor& partial, const at::Tensor& grad_weight, const at::Tensor& step) {
  const int64_t H = hidden.size(1);
  const at::Tensor w = weight.narrow(0, t.c0, t.nc);
  add_mm(partial[t.split].narrow(0, t.r0, t.nr), g, w, view2d(step, t.nr, H));
  if (grad_weight.defined()) {
    add_mm(grad_weight.narrow(0, t.c0, t.nc), g.t(), hidden.narrow(0, t.r0, t.nr), view2d(step, t.nc, H));
  }
}

// Per-split online softmax states [splits, M] (max, sum of exp relative to it) -> lse [M]:
// log sum_k s_k exp(m_k - m) + m.
inline at::Tensor merge_lse(const at::Tensor& pmax, const at::Tensor& psum) {
  const at::Tensor m = std::get<0>(pmax.max(0));
  return (psum * (pmax - m.unsqueeze(0)).exp()).sum(0).log_() + m;
}

}  // namespace
