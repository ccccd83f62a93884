// The legacy GGML types (blocks of 32 values) on the CPU: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
// Without importance each block is rounded from its extremes exactly as llama.cpp's reference
// quantiser (and the gguf package's numpy copy of it, the test's reference) does; with importance
// (Q4_0, Q5_0, Q5_1: the types K mixes fall back to) the scale is searched by weighted least
// squares, repeating engine/legacy_quants.py operation for operation so that both write the same
// bytes. Rows run in parallel. See docs/DESIGN.md, "GGUF export": "Importance matrix".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "quant_blocks.h"

namespace {

constexpr int kBlock = 32;
constexpr int kTries = 19;  // candidate scales (extreme level + t) / extreme, t = -0.9, -0.8, ..., 0.9
constexpr float kEps = 1e-20f;

struct Legacy {
  const char* name;
  int lo, hi;     // levels of the codes (signed types are stored shifted by -lo)
  bool with_min;  // a second fp16 per block: the low end
  bool fifth_bit;
  bool weighted;  // has the importance-weighted search
  int bytes;
};

constexpr Legacy kTypes[] = {
    {"q4_0", -8, 7, false, false, true, 18},   {"q4_1", 0, 15, true, false, false, 20},
    {"q5_0", -16, 15, false, true, true, 22},  {"q5_1", 0, 31, true, true, true, 24},
    {"q8_0", -128, 127, false, false, false, 34},
};

const Legacy& legacy_of(const std::string& qtype) {
  for (const Legacy& t : kTypes)
    if (qtype == t.name) return t;
  TORCH_CHECK(false, "quantize_legacy: unknown legacy type '", qtype, "'");
}


// v as an fp16 stores it, +0 for -0 (_rounded in legacy_quants.py).
DC_INLINE float half_float(float v) { return static_cast<float>(half_of(v)); }

// fp16 of v as llama.cpp stores it (-0 kept): the plain blocks' bytes are gguf's.
DC_INLINE void put_float(uint8_t* dst, float v) { put_half(dst, c10::Half(v)); }

// min(trunc(v), top) as a code, for v >= 0 (the +0.5 shifts keep it there)
DC_INLINE uint8_t truncated(float v, int top) {
  return static_cast<uint8_t>(std::min(static_cast<int>(std::max(v, 0.0f)), top));
}

// Unsigned codes u[32] after the fp16 scale(s): [qh, the fifth bits of a little-endian uint32,]
// qs, value j in the low and value j + 16 in the high nibble of byte j (Q8_0: one signed byte each).
DC_INLINE void pack(const Legacy& t, const uint8_t* u, uint8_t* dst) {
  if (t.hi == 127) {
    for (int i = 0; i < kBlock; ++i) dst[i] = u[i];
    return;
  }
  if (t.fifth_bit) {
    uint32_t qh = 0;
    for (int i = 0; i < kBlock; ++i) qh |= static_cast<uint32_t>((u[i] >> 4) & 1) << i;
    for (int k = 0; k < 4; ++k) dst[k] = static_cast<uint8_t>(qh >> (8 * k));
    dst += 4;
  }
  for (int j = 0; j < 16; ++j) dst[j] = static_cast<uint8_t>((u[j] & 15) | ((u[j + 16] & 15) << 4));
}

// llama.cpp's round-to-nearest blocks: the scale from the extreme(s), codes truncated after +0.5.
DC_MULTIVERSION void plain_block(const Legacy& t, const float* x, uint8_t* dst) {
  uint8_t u[kBlock];
  if (t.hi == 127) {  // Q8_0: d = max|x| / 127, codes rounded half away from zero
    float amax = 0.0f;
    for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f, id = d == 0.0f ? 0.0f : 1.0f / d;
    for (int i = 0; i < kBlock; ++i) {  // |v| <= 127: floor(|v|) is the int conversion, |v| - floor exact
      const float v = x[i] * id, a = std::fabs(v);
      const int f = static_cast<int>(a), r = f + (a - static_cast<float>(f) >= 0.5f);
      u[i] = static_cast<uint8_t>(static_cast<int8_t>(v < 0.0f ? -r : r));
    }
    put_float(dst, d);
    pack(t, u, dst + 2);
    return;
  }
  if (t.with_min) {  // Q4_1, Q5_1: x ~ d q + min
    float lo = x[0], hi = x[0];
    for (int i = 1; i < kBlock; ++i) {
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    const float d = (hi - lo) / static_cast<float>(t.hi), id = d == 0.0f ? 0.0f : 1.0f / d;
    for (int i = 0; i < kBlock; ++i)
      u[i] = truncated((x[i] - lo) * id + 0.5f, t.hi);
    put_float(dst, d);
    put_float(dst + 2, lo);
    pack(t, u, dst + 4);
    return;
  }
  // Q4_0, Q5_0: the signed extreme maps to the lowest level
  const float d = x[peak_index(x, kBlock)] / static_cast<float>(t.lo), id = d == 0.0f ? 0.0f : 1.0f / d;
  const float shift = 0.5f - static_cast<float>(t.lo);
  for (int i = 0; i < kBlock; ++i)
    u[i] = truncated(x[i] * id + shift, t.hi - t.lo);
  put_float(dst, d);
  pack(t, u, dst + 2);
}

DC_INLINE float try_offset(int k) { return static_cast<float>(k - kTries / 2) * 0.1f; }

// fp16-exact d minimising sum w (d q - x)^2, q = clip(round(x / d), lo, hi); _fit_symmetric.
DC_INLINE float fit_symmetric(const float* x, const float* w, float lo, float hi) {
  const float extreme = x[peak_index(x, kBlock)];
  const float inv = extreme != 0.0f ? 1.0f / extreme : 0.0f;
  float best = -1.0f, best_d = 0.0f, q[kBlock], wq[kBlock];
  for (int k = 0; k < kTries; ++k) {
    const float iscale = (lo - try_offset(k)) * inv;
    for (int i = 0; i < kBlock; ++i) {
      q[i] = round_clamped(x[i] * iscale, lo, hi);
      wq[i] = w[i] * q[i];
    }
    const float sqx = tree_dot<kBlock>(wq, x);
    const float sqq = tree_dot<kBlock>(wq, q), den = std::max(sqq, kEps);
    const float score = sqq > 0.0f ? sqx * sqx / den : 0.0f;
    if (score > best) {
      best = score;
      best_d = sqq > 0.0f ? sqx / den : 0.0f;
    }
  }
  return half_float(best_d);
}

// fp16-exact (d >= 0, m) minimising sum w (d q + m - x)^2, q = round((x - m) / d) in 0..hi;
// _fit_with_min: the block sums in fp32, the 2 x 2 solve in fp64.
DC_INLINE void fit_with_min(const float* x, const float* w, float hi, float& d_out, float& m_out) {
  float low = x[0], high = x[0];
  for (int i = 1; i < kBlock; ++i) {
    low = std::min(low, x[i]);
    high = std::max(high, x[i]);
  }
  const float span = high - low, inv = span > 0.0f ? 1.0f / span : 0.0f;
  float shifted[kBlock], q[kBlock], wq[kBlock], tmp[kBlock];
  for (int i = 0; i < kBlock; ++i) {
    shifted[i] = x[i] - low;
    tmp[i] = w[i] * x[i];
  }
  const double sw = tree_sum<kBlock>(w), swx = tree_sum<kBlock>(tmp);
  for (int i = 0; i < kBlock; ++i) tmp[i] = (w[i] * x[i]) * x[i];
  const double swxx = tree_sum<kBlock>(tmp);
  double best = std::numeric_limits<double>::infinity(), best_d = 0.0, best_m = low;
  for (int k = 0; k < kTries; ++k) {
    const float iscale = (hi + try_offset(k)) * inv;
    for (int i = 0; i < kBlock; ++i) {
      q[i] = round_clamped(shifted[i] * iscale, 0.0f, hi);
      wq[i] = w[i] * q[i];
    }
    const double swq = tree_sum<kBlock>(wq);
    const double swqq = tree_dot<kBlock>(wq, q);
    const double swqx = tree_dot<kBlock>(wq, x);
    const double det = sw * swqq - swq * swq;
    if (!(det > 1e-12 * std::max(sw * swqq, 1e-30))) continue;
    double d = (sw * swqx - swq * swx) / det, m = (swqq * swx - swq * swqx) / det;
    if (d < 0) {
      d = 0;
      m = low;
    }
    const double err = d * d * swqq + 2 * d * m * swq + m * m * sw - 2 * d * swqx - 2 * m * swx + swxx;
    if (err < best) {
      best = err;
      best_d = d;
      best_m = m;
    }
  }
  d_out = half_float(static_cast<float>(best_d));
  m_out = half_float(static_cast<float>(best_m));
}

DC_MULTIVERSION void weighted_block(const Legacy& t, const float* x, const float* w, uint8_t* dst) {
  const float lo = static_cast<float>(t.lo), hi = static_cast<float>(t.hi);
  uint8_t u[kBlock];
  if (t.with_min) {
    float d, m;
    fit_with_min(x, w, hi, d, m);
    for (int i = 0; i < kBlock; ++i) u[i] = static_cast<uint8_t>(d != 0.0f ? round_clamped((x[i] - m) / d, 0.0f, hi) : 0.0f);
    put_float(dst, d);
    put_float(dst + 2, m);
    pack(t, u, dst + 4);
    return;
  }
  const float d = fit_symmetric(x, w, lo, hi);
  for (int i = 0; i < kBlock; ++i)
    u[i] = static_cast<uint8_t>((d != 0.0f ? round_clamped(x[i] / d, lo, hi) : 0.0f) - lo);
  put_float(dst, d);
  pack(t, u, dst + 2);
}

at::Tensor quantize_legacy_cpu(const at::Tensor& weight_in, c10::string_view qtype_in,
                               const std::optional<at::Tensor>& importance) {
  const Legacy& t = legacy_of(std::string(qtype_in));
  TORCH_CHECK(weight_in.dim() == 2, "quantize_legacy: weight must be 2-D");
  const int64_t rows = weight_in.size(0), cols = weight_in.size(1);
  TORCH_CHECK(cols > 0 && cols % kBlock == 0, "quantize_legacy: rows must be a positive multiple of 32 long, got ",
              cols);
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  at::Tensor colw;
  if (importance.has_value()) {
    TORCH_CHECK(t.weighted, "quantize_legacy: ", t.name, " takes no importance");
    TORCH_CHECK(importance->dim() == 1 && importance->size(0) == cols, "quantize_legacy: importance must be [",
                cols, "]");
    colw = importance->to(at::kCPU, at::kFloat).contiguous();
  }
  const int64_t blocks = cols / kBlock, bytes = blocks * t.bytes;
  at::Tensor out = at::empty({rows, bytes}, weight.options().dtype(at::kByte));
  const float* src = weight.const_data_ptr<float>();
  const float* cw = colw.defined() ? colw.const_data_ptr<float>() : nullptr;
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / cols), [&](int64_t r0, int64_t r1) {
    std::vector<float> w(cw ? cols : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = src + r * cols;
      if (cw) {  // w = importance * sqrt(sigma2 + x^2), sigma2 the row's mean x^2 (summed in fp64)
        double sum = 0.0;
        for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(x[c] * x[c]);
        const float sigma2 = static_cast<float>(sum / static_cast<double>(cols));
        for (int64_t c = 0; c < cols; ++c) w[c] = cw[c] * std::sqrt(sigma2 + x[c] * x[c]);
      }
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* block = dst + r * bytes + b * t.bytes;
        if (cw)
          weighted_block(t, x + b * kBlock, w.data() + b * kBlock, block);
        else
          plain_block(t, x + b * kBlock, block);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("quantize_legacy", &quantize_legacy_cpu);
}
