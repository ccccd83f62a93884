// CPU kernels: fused linear + log-softmax + NLL (forward/backward) and the Taylor
// saliency reduction. GEMM tiles go to ATen (oneDNN/MKL); the row reductions are
// plain loops compiled for several ISAs (target_clones), so the wheel needs no -march.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define DC_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DC_MULTIVERSION
#endif
// Helpers must be inlined into each ISA clone, or the loops calling them stay scalar.
#define DC_INLINE inline __attribute__((always_inline))

// The CPU kernels take fp32 and bf16 (the dtypes the scorer uses).
#define DC_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

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

// A logit tile row as fp32 with the optional softcap applied; fp32 rows without
// softcap are read in place.
const float* row_as_float(const float* src, float* scratch, int64_t n, float softcap) {
  if (softcap <= 0.0f) return src;
  softcap_row(src, scratch, n, softcap);
  return scratch;
}

const float* row_as_float(const at::BFloat16* src, float* scratch, int64_t n, float softcap) {
  bf16_to_float_row(reinterpret_cast<const uint16_t*>(src), scratch, n);
  if (softcap > 0.0f) softcap_row(scratch, scratch, n, softcap);
  return scratch;
}

void store_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

void store_row(const float* src, at::BFloat16* dst, int64_t n) {
  float_to_bf16_row(src, reinterpret_cast<uint16_t*>(dst), n);
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

// In place: z (capped logits) -> d nll / d raw logit = g * softmax * dcap; the
// caller subtracts the one-hot part at the target.
DC_MULTIVERSION void grad_row(float* z, int64_t n, float lse, float g, float softcap) {
  if (softcap > 0.0f) {
    const float inv = 1.0f / softcap;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float t = z[i] * inv;
      z[i] = g * exp_approx(z[i] - lse) * (1.0f - t * t);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) z[i] = g * exp_approx(z[i] - lse);
  }
}

DC_MULTIVERSION double abs_prod_sum(const float* w, const float* d, int64_t n) {
  // fp32 partial sums over short runs, accumulated in double.
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += 4096) {
    const int64_t i1 = std::min(n, i0 + 4096);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) s += std::fabs(w[i] * d[i]);
    total += s;
  }
  return total;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "linear_nll: hidden [M,H] and weight [V,H] must be 2-D");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "linear_nll: hidden and weight disagree on H");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_nll: hidden and weight dtypes differ");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16,
              "linear_nll (CPU): float32 or bfloat16 expected, got ", hidden.scalar_type());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_nll: targets must be [M]");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "linear_nll: targets must be int64");
  const int64_t V = weight.size(0);
  const int64_t bad = targets.ne(kIgnoreIndex).logical_and(targets.lt(0).logical_or(targets.ge(V))).sum().item<int64_t>();
  TORCH_CHECK(bad == 0, "linear_nll: ", bad, " targets outside [0, ", V, ") and not -100");
}

// Work split: row blocks x vocabulary ranges, enough tasks to occupy every thread
// even for a handful of rows. Each task runs its GEMMs single-threaded (nested
// parallel regions are serial), on tiles that stay in cache.
struct Split {
  int64_t rows, row_blocks, vocab_splits, vocab_per_split, chunk;
};

Split make_split(int64_t M, int64_t V, int64_t chunk) {
  Split s;
  s.chunk = std::min(chunk > 0 ? chunk : kDefaultChunk, std::max<int64_t>(V, 1));
  s.rows = std::min<int64_t>(kRowBlock, std::max<int64_t>(M, 1));
  s.row_blocks = (M + s.rows - 1) / s.rows;
  const int64_t chunks = (V + s.chunk - 1) / s.chunk;
  const int64_t threads = at::get_num_threads();
  s.vocab_splits = std::max<int64_t>(1, std::min(chunks, (threads + s.row_blocks - 1) / s.row_blocks));
  s.vocab_per_split = ((chunks + s.vocab_splits - 1) / s.vocab_splits) * s.chunk;
  return s;
}

std::tuple<at::Tensor, at::Tensor> linear_nll_forward_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets_in, double softcap_d,
    int64_t chunk) {
  check_inputs(hidden_in, weight_in, targets_in);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0);
  const float softcap = static_cast<float>(softcap_d);
  const Split sp = make_split(M, V, chunk);
  auto f32 = hidden.options().dtype(at::kFloat);
  // Per vocabulary split: running max, sum of exp relative to it, target logit.
  at::Tensor pmax = at::empty({sp.vocab_splits, M}, f32);
  at::Tensor psum = at::empty({sp.vocab_splits, M}, f32);
  at::Tensor ptgt = at::zeros({sp.vocab_splits, M}, f32);
  const int64_t* tgt = targets.data_ptr<int64_t>();

  DC_DISPATCH(hidden.scalar_type(), "linear_nll_forward_cpu", [&] {
    at::parallel_for(0, sp.row_blocks * sp.vocab_splits, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the dispatcher's autograd exclusion.
      const at::AutoDispatchBelowAutograd below_autograd;
      at::Tensor tile_buf = at::empty({sp.rows * sp.chunk}, hidden.options());
      std::vector<float> zrow(sp.chunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rb = task / sp.vocab_splits, vs = task % sp.vocab_splits;
        const int64_t r0 = rb * sp.rows, nr = std::min(sp.rows, M - r0);
        const int64_t v_lo = vs * sp.vocab_per_split, v_hi = std::min(V, v_lo + sp.vocab_per_split);
        float* mx = pmax.data_ptr<float>() + vs * M + r0;
        float* sm = psum.data_ptr<float>() + vs * M + r0;
        float* zt = ptgt.data_ptr<float>() + vs * M + r0;
        std::fill(mx, mx + nr, -std::numeric_limits<float>::infinity());
        std::fill(sm, sm + nr, 0.0f);
        const at::Tensor h = hidden.narrow(0, r0, nr);
        for (int64_t c0 = v_lo; c0 < v_hi; c0 += sp.chunk) {
          const int64_t nc = std::min(sp.chunk, v_hi - c0);
          at::Tensor tile = tile_buf.narrow(0, 0, nr * nc).view({nr, nc});
          at::mm_out(tile, h, weight.narrow(0, c0, nc).t());
          const scalar_t* tp = tile.const_data_ptr<scalar_t>();
          for (int64_t i = 0; i < nr; ++i) {
            const float* z = row_as_float(tp + i * nc, zrow.data(), nc, softcap);
            const float m_new = std::max(mx[i], row_max(z, nc));
            sm[i] = sm[i] * exp_approx(mx[i] - m_new) + row_sum_exp(z, nc, m_new);
            mx[i] = m_new;
            const int64_t t = tgt[r0 + i];
            if (t >= c0 && t < c0 + nc) zt[i] = z[t - c0];
          }
        }
      }
    });
  });

  // Merge the vocabulary splits: lse = log sum_k s_k exp(m_k - m).
  at::Tensor m_all = std::get<0>(pmax.max(0));
  at::Tensor lse = (psum * (pmax - m_all.unsqueeze(0)).exp()).sum(0).log_() + m_all;
  at::Tensor nll = (lse - ptgt.sum(0)).masked_fill_(targets.eq(kIgnoreIndex), 0.0);
  return {nll, lse};
}

at::Tensor linear_nll_backward_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets_in, const at::Tensor& lse_in,
    const at::Tensor& grad_nll_in, double softcap_d, int64_t chunk) {
  check_inputs(hidden_in, weight_in, targets_in);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  TORCH_CHECK(lse_in.numel() == M && grad_nll_in.numel() == M, "linear_nll_backward: lse and grad_nll must be [M]");
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  // Ignored targets get no gradient.
  const at::Tensor gn = grad_nll_in.to(at::kFloat).masked_fill(targets.eq(kIgnoreIndex), 0.0).contiguous();
  const float softcap = static_cast<float>(softcap_d);
  const Split sp = make_split(M, V, chunk);
  // fp32 partial gradients per vocabulary split, summed at the end.
  at::Tensor partial = at::empty({sp.vocab_splits, M, H}, hidden.options().dtype(at::kFloat));
  const int64_t* tgt = targets.data_ptr<int64_t>();
  const float* lsep = lse.data_ptr<float>();
  const float* gp = gn.data_ptr<float>();

  DC_DISPATCH(hidden.scalar_type(), "linear_nll_backward_cpu", [&] {
    at::parallel_for(0, sp.row_blocks * sp.vocab_splits, 1, [&](int64_t begin, int64_t end) {
      // Worker threads do not inherit the dispatcher's autograd exclusion.
      const at::AutoDispatchBelowAutograd below_autograd;
      at::Tensor tile_buf = at::empty({sp.rows * sp.chunk}, hidden.options());
      at::Tensor grad_buf = at::empty({sp.rows * sp.chunk}, hidden.options());
      at::Tensor step = at::empty({sp.rows, H}, hidden.options());
      std::vector<float> zrow(sp.chunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rb = task / sp.vocab_splits, vs = task % sp.vocab_splits;
        const int64_t r0 = rb * sp.rows, nr = std::min(sp.rows, M - r0);
        const int64_t v_lo = vs * sp.vocab_per_split, v_hi = std::min(V, v_lo + sp.vocab_per_split);
        at::Tensor acc = partial[vs].narrow(0, r0, nr);
        acc.zero_();
        const at::Tensor h = hidden.narrow(0, r0, nr);
        for (int64_t c0 = v_lo; c0 < v_hi; c0 += sp.chunk) {
          const int64_t nc = std::min(sp.chunk, v_hi - c0);
          const at::Tensor w = weight.narrow(0, c0, nc);
          at::Tensor tile = tile_buf.narrow(0, 0, nr * nc).view({nr, nc});
          at::Tensor g = grad_buf.narrow(0, 0, nr * nc).view({nr, nc});
          at::mm_out(tile, h, w.t());
          const scalar_t* tp = tile.const_data_ptr<scalar_t>();
          scalar_t* gptr = g.data_ptr<scalar_t>();
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = r0 + i;
            float* z = zrow.data();
            const float* zin = row_as_float(tp + i * nc, z, nc, softcap);
            if (zin != z) std::memcpy(z, zin, nc * sizeof(float));
            const int64_t t = tgt[r];
            const bool hit = t >= c0 && t < c0 + nc;
            const float zt = hit ? z[t - c0] : 0.0f;
            grad_row(z, nc, lsep[r], gp[r], softcap);
            if (hit) {
              const float ct = softcap > 0.0f ? 1.0f - (zt / softcap) * (zt / softcap) : 1.0f;
              z[t - c0] -= gp[r] * ct;
            }
            store_row(z, gptr + i * nc, nc);
          }
          if constexpr (std::is_same_v<scalar_t, float>) {
            acc.addmm_(g, w);
          } else {
            // Reduced-precision GEMM (fast path); its output is accumulated in fp32.
            at::Tensor s = step.narrow(0, 0, nr);
            at::mm_out(s, g, w);
            acc.add_(s);
          }
        }
      }
    });
  });
  return partial.sum(0).to(hidden.scalar_type());
}

at::Tensor taylor_saliency_cpu(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& weight_in) {
  TORCH_CHECK(x_in.dim() == 2 && dy_in.dim() == 2 && weight_in.dim() == 2, "taylor_saliency: 2-D inputs expected");
  TORCH_CHECK(x_in.size(0) == dy_in.size(0), "taylor_saliency: x and dy disagree on M");
  TORCH_CHECK(weight_in.size(0) == dy_in.size(1) && weight_in.size(1) == x_in.size(1),
              "taylor_saliency: weight must be [N, K] for dy [M, N], x [M, K]");
  TORCH_CHECK(x_in.scalar_type() == dy_in.scalar_type(), "taylor_saliency: x and dy dtypes differ");
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const int64_t N = weight.size(0), K = weight.size(1);
  // 64 rows of dW at a time: [64, K] fits in L2 for any realistic K.
  const int64_t nb = std::min<int64_t>(64, std::max<int64_t>(N, 1));
  const int64_t blocks = (N + nb - 1) / nb;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the dispatcher's autograd exclusion.
    const at::AutoDispatchBelowAutograd below_autograd;
    at::Tensor buf = at::empty({nb, K}, x.options());
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * nb, n = std::min(nb, N - n0);
      at::Tensor dw = buf.narrow(0, 0, n);
      // Signed GEMM over all M tokens first; |.| only afterwards.
      at::mm_out(dw, dy.narrow(1, n0, n).t(), x);
      const at::Tensor dw32 = dw.to(at::kFloat).contiguous();
      partial[b] = abs_prod_sum(weight.const_data_ptr<float>() + n0 * K, dw32.const_data_ptr<float>(), n * K);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return at::scalar_tensor(total, x.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("linear_nll_forward", &linear_nll_forward_cpu);
  m.impl("linear_nll_backward", &linear_nll_backward_cpu);
  m.impl("taylor_saliency", &taylor_saliency_cpu);
}
