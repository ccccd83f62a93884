// IQ4_NL / IQ4_XS quantisers on the CPU: each weight an index into llama.cpp's fixed 16-level
// non-linear grid, times a per-32 step found by weighted least squares over candidate index
// choices. The numpy reference is engine/iquants.py: this file repeats its float operations in
// the same order (sums as the same halving tree, no fused multiply-adds), so both write the
// same bytes. Rows run in parallel; no CUDA version (a one-off export step). See
// docs/DESIGN.md, "IQ4 quantisers".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "quant_blocks.h"

namespace {

constexpr int kSub = 32;
constexpr int kSuper = 256;
constexpr float kGrid[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr int kCodeLo = -32, kCodeHi = 31;
// TRIES in iquants.py: the peak weight on the grid's top end, then on its bottom end -7 ... +7.
constexpr int kTries = 16;
constexpr float try_level(int k) { return k == 0 ? -kGrid[0] : kGrid[0] + static_cast<float>(k - 8); }

// Index of the grid level nearest v, ties to the upper one (iquants.nearest).
DC_INLINE int nearest(float v) {
  int k = 0;
  for (int j = 0; j < 15; ++j) k += v >= (kGrid[j] + kGrid[j + 1]) * 0.5f;
  return k;
}

// Signed scale of one sub-block, maximising (sum w x g)^2 / sum w g^2; fit_scales in iquants.py.
DC_INLINE float fit_scale(const float* x, const float* w) {
  const float peak = x[peak_index(x, kSub)];
  if (peak == 0.0f) return 0.0f;
  float best = 0.0f, scale = 0.0f, wg[kSub];
  for (int k = 0; k < kTries; ++k) {
    const float inv = try_level(k) / peak;
    float g[kSub];
    for (int i = 0; i < kSub; ++i) {
      g[i] = kGrid[nearest(inv * x[i])];
      wg[i] = w[i] * g[i];
    }
    const float sxg = tree_dot<kSub>(wg, x);
    const float sgg = tree_dot<kSub>(wg, g);
    if (!(sgg > 0.0f)) continue;
    const float s = sxg / sgg;
    const float gain = sxg * s;
    if (gain > best) {
      best = gain;
      scale = s;
    }
  }
  return scale;
}

// Grid indices of a block x[N] on its per-32 steps, and the weighted error; _levels in iquants.py.
template <int N>
DC_INLINE float levels(const float* x, const float* w, const float* steps, uint8_t* idx) {
  float e[N];
  for (int i = 0; i < N; ++i) {
    const float st = steps[i / kSub];
    const int k = nearest(st != 0.0f ? x[i] / st : 0.0f);
    idx[i] = static_cast<uint8_t>(k);
    const float diff = st * kGrid[k] - x[i];
    e[i] = w[i] * diff * diff;
  }
  return tree_sum<N>(e);
}

// The levels on steps d * codes, then one weighted least-squares refit of d, kept where the
// error drops; refit_step in iquants.py.
template <int N>
DC_INLINE void refit_step(const float* x, const float* w, const float* codes, c10::Half& d, uint8_t* idx) {
  constexpr int nsub = N / kSub;
  float steps[nsub];
  for (int j = 0; j < nsub; ++j) steps[j] = static_cast<float>(d) * codes[j];
  const float err = levels<N>(x, w, steps, idx);
  float a[N], wa[N];
  for (int i = 0; i < N; ++i) {
    a[i] = codes[i / kSub] * kGrid[idx[i]];
    wa[i] = w[i] * a[i];
  }
  const float saa = tree_dot<N>(wa, a);
  const float sxa = tree_dot<N>(wa, x);
  if (!(saa > 0.0f)) return;
  const float nd = sxa / saa;
  if (!(std::fabs(nd) <= kHalfMax)) return;
  const c10::Half d2 = half_of(nd);
  for (int j = 0; j < nsub; ++j) steps[j] = static_cast<float>(d2) * codes[j];
  uint8_t idx2[N];
  if (levels<N>(x, w, steps, idx2) < err) {
    std::memcpy(idx, idx2, N);
    d = d2;
  }
}

// x^2, or colw * sqrt(sigma2 + x^2) with sigma2 = 2 mean x^2 of the block; element_weights in iquants.py.
template <int N>
DC_INLINE void element_weights(const float* x, const float* cw, float* w) {
  float xx[N];
  for (int i = 0; i < N; ++i) xx[i] = x[i] * x[i];
  if (!cw) {
    std::memcpy(w, xx, sizeof(xx));
    return;
  }
  const float sigma2 = tree_sum<N>(xx) * (2.0f / N);
  for (int i = 0; i < N; ++i) w[i] = cw[i] * std::sqrt(sigma2 + xx[i]);
}

// qs of one 32-weight sub-block: weight j in the low nibble of byte j, weight j + 16 in the high one.
DC_INLINE void pack_nibbles(const uint8_t* idx, uint8_t* dst) {
  for (int j = 0; j < kSub / 2; ++j) dst[j] = static_cast<uint8_t>(idx[j] | (idx[j + kSub / 2] << 4));
}

// block_iq4_nl: d, qs[16].
DC_MULTIVERSION void quantize_nl(const float* x, const float* cw, uint8_t* dst) {
  float w[kSub];
  element_weights<kSub>(x, cw, w);
  c10::Half d = half_of(fit_scale(x, w));
  const float one = 1.0f;
  uint8_t idx[kSub];
  refit_step<kSub>(x, w, &one, d, idx);
  put_half(dst, d);
  pack_nibbles(idx, dst + 2);
}

// block_iq4_xs: d, scales_h (2 high bits of code j at bit 2j), scales_l (low nibbles, two a byte), qs[128].
DC_MULTIVERSION void quantize_xs(const float* x, const float* cw, uint8_t* dst) {
  constexpr int nsub = kSuper / kSub;
  float w[kSuper], s[nsub], codes[nsub];
  element_weights<kSuper>(x, cw, w);
  for (int j = 0; j < nsub; ++j) s[j] = fit_scale(x + j * kSub, w + j * kSub);
  c10::Half d = half_of(-s[peak_index(s, nsub)] / static_cast<float>(-kCodeLo));
  const float df = static_cast<float>(d);
  for (int j = 0; j < nsub; ++j) {
    codes[j] = df != 0.0f ? round_clamped(s[j] / df, static_cast<float>(kCodeLo), static_cast<float>(kCodeHi)) : 0.0f;
  }
  uint8_t idx[kSuper];
  refit_step<kSuper>(x, w, codes, d, idx);
  put_half(dst, d);
  uint16_t high = 0;
  for (int j = 0; j < nsub; ++j) {
    const int u = static_cast<int>(codes[j]) - kCodeLo;
    high = static_cast<uint16_t>(high | ((u >> 4) << (2 * j)));
    if (j % 2 == 0)
      dst[4 + j / 2] = static_cast<uint8_t>(u & 15);
    else
      dst[4 + j / 2] = static_cast<uint8_t>(dst[4 + j / 2] | ((u & 15) << 4));
  }
  dst[2] = static_cast<uint8_t>(high & 0xFF);
  dst[3] = static_cast<uint8_t>(high >> 8);
  for (int j = 0; j < nsub; ++j) pack_nibbles(idx + j * kSub, dst + 8 + j * (kSub / 2));
}

at::Tensor quantize_iquant_cpu(const at::Tensor& weight_in, c10::string_view qtype_in,
                               const std::optional<at::Tensor>& importance) {
  const std::string qtype(qtype_in);
  TORCH_CHECK(qtype == "iq4_nl" || qtype == "iq4_xs", "quantize_iquant: unknown IQ4 type '", qtype, "'");
  const bool xs = qtype == "iq4_xs";
  const int block = xs ? kSuper : kSub, block_bytes = xs ? 136 : 18;
  TORCH_CHECK(weight_in.dim() == 2, "quantize_iquant: weight must be 2-D");
  const int64_t rows = weight_in.size(0), cols = weight_in.size(1);
  TORCH_CHECK(cols > 0 && cols % block == 0, "quantize_iquant: rows must be a positive multiple of ", block,
              " long, got ", cols);
  const at::Tensor weight = weight_in.to(at::kCPU, at::kFloat).contiguous();
  at::Tensor cw;
  if (importance.has_value()) {
    TORCH_CHECK(importance->dim() == 1 && importance->size(0) == cols, "quantize_iquant: importance must be [", cols,
                "]");
    cw = importance->to(at::kCPU, at::kFloat).contiguous();
  }
  const int64_t blocks = cols / block, bytes = blocks * block_bytes;
  at::Tensor out = at::empty({rows, bytes}, weight.options().dtype(at::kByte));
  const float* src = weight.const_data_ptr<float>();
  const float* colw = cw.defined() ? cw.const_data_ptr<float>() : nullptr;
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const float* x = src + r * cols + b * block;
        const float* c = colw ? colw + b * block : nullptr;
        uint8_t* o = dst + r * bytes + b * block_bytes;
        if (xs)
          quantize_xs(x, c, o);
        else
          quantize_nl(x, c, o);
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("quantize_iquant", &quantize_iquant_cpu);
}
