// K-quant quantisers on the CPU: rows of GGML block_q2_K ... block_q6_K super-blocks, the
// sub-block scales (and low ends) found by weighted least squares over candidate level
// assignments. The numpy reference is engine/kquants.py: this file repeats its float
// operations in the same order (sums as the same halving tree, no fused multiply-adds), so
// both write the same bytes. Rows run in parallel; there is no CUDA version (a one-off export
// step). See docs/DESIGN.md, "K-quant quantisers".
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "quant_blocks.h"

namespace {

constexpr int kQK = 256;

// One type's parameters, as FORMATS in engine/kquants.py: sub-block length, levels lo..hi,
// sub-block scale codes slo..shi, block bytes, candidate offsets start + step * k, k < count.
struct Format {
  const char* name;
  int sub, lo, hi, slo, shi, bytes;
  double start, step;
  int count;
};

constexpr Format kFormats[] = {
    {"q2_k", 16, 0, 3, 0, 15, 84, -0.5, 0.1, 16},    {"q3_k", 16, -4, 3, -32, 31, 110, -0.9, 0.1, 19},
    {"q4_k", 32, 0, 15, 0, 63, 144, -1.0, 0.1, 21},  {"q5_k", 32, 0, 31, 0, 63, 176, -0.5, 0.1, 16},
    {"q6_k", 16, -32, 31, -128, 127, 210, -0.9, 0.1, 19},
};

const Format& format_of(const std::string& qtype) {
  for (const Format& f : kFormats)
    if (qtype == f.name) return f;
  TORCH_CHECK(false, "quantize_kquant: unknown K-quant type '", qtype, "'");
}

float offset(const Format& f, int k) { return static_cast<float>(f.start + f.step * k); }

template <int N>
DC_INLINE float weighted_error(const float* x, const float* w, const float* q, float scale, float low) {
  float e[N];
  for (int i = 0; i < N; ++i) {
    const float diff = scale * q[i] + low - x[i];
    e[i] = w[i] * diff * diff;
  }
  return tree_sum<N>(e);
}

// (scale >= 0, low <= 0) minimising sum w (scale q + low - x)^2; fit_asymmetric in kquants.py.
template <int n>
DC_MULTIVERSION void fit_asymmetric(const float* x, const float* w, const Format& f, float& scale, float& low) {
  const float top = static_cast<float>(f.hi);
  float xlo = x[0], xhi = x[0];
  for (int i = 1; i < n; ++i) {
    xlo = std::min(xlo, x[i]);
    xhi = std::max(xhi, x[i]);
  }
  xlo = std::min(xlo, 0.0f);
  const float span = xhi - xlo;
  const bool live = span > 0.0f;
  float xs[n], q[n], wq[n], tmp[n];
  for (int i = 0; i < n; ++i) xs[i] = x[i] - xlo;
  scale = span / top;
  low = xlo;
  const float t0 = live ? top / span : 0.0f;
  for (int i = 0; i < n; ++i) q[i] = round_clamped(t0 * xs[i], 0.0f, top);
  float best = weighted_error<n>(x, w, q, scale, low);
  for (int i = 0; i < n; ++i) tmp[i] = w[i] * x[i];
  const float sw = tree_sum<n>(w), sx = tree_sum<n>(tmp);
  for (int k = 0; k < f.count; ++k) {
    const float t = live ? (top + offset(f, k)) / span : 0.0f;
    for (int i = 0; i < n; ++i) {
      q[i] = round_clamped(t * xs[i], 0.0f, top);
      wq[i] = w[i] * q[i];
    }
    const float sq = tree_sum<n>(wq);
    const float sqq = tree_dot<n>(wq, q);
    const float sxq = tree_dot<n>(wq, x);
    const float det = sw * sqq - sq * sq;
    if (!(det > 0.0f)) continue;
    float s = (sw * sxq - sx * sq) / det;
    float lo = (sqq * sx - sq * sxq) / det;
    if (lo > 0.0f) {  // the low end must not rise above zero: refit the scale alone
      s = sxq / sqq;
      lo = 0.0f;
    }
    const float err = weighted_error<n>(x, w, q, s, lo);
    if (s >= 0.0f && err < best) {
      best = err;
      scale = s;
      low = lo;
    }
  }
}

// Signed scale maximising (sum w x q)^2 / sum w q^2; fit_symmetric in kquants.py.
template <int n>
DC_MULTIVERSION float fit_symmetric(const float* x, const float* w, const Format& f) {
  const float peak = x[peak_index(x, n)];
  const bool live = peak != 0.0f;
  const float lo = static_cast<float>(f.lo), hi = static_cast<float>(f.hi), top = static_cast<float>(-f.lo);
  float best = 0.0f, scale = 0.0f;
  float q[n], wq[n];
  for (int k = 0; k < f.count; ++k) {
    const float t = live ? -(top + offset(f, k)) / peak : 0.0f;
    for (int i = 0; i < n; ++i) {
      q[i] = round_clamped(t * x[i], lo, hi);
      wq[i] = w[i] * q[i];
    }
    const float sxq = tree_dot<n>(wq, x);
    const float sqq = tree_dot<n>(wq, q);
    if (!(sqq > 0.0f)) continue;
    const float s = sxq / sqq;
    const float gain = sxq * s;
    if (gain > best) {
      best = gain;
      scale = s;
    }
  }
  return scale;
}

float code(float v, float d, int lo, int hi) {
  return d != 0.0f ? round_clamped(v / d, static_cast<float>(lo), static_cast<float>(hi)) : 0.0f;
}

// Packs levels q[groups * per * span] (per = 8 / width values a byte) into groups * span bytes:
// element g*per*span + p*span + j goes to byte g*span + j at bit p*width (pack_bits in kquants.py).
void pack_bits(const uint8_t* q, int count, int groups, int width, uint8_t* dst) {
  const int per = 8 / width, span = count / groups / per;
  for (int g = 0; g < groups; ++g)
    for (int j = 0; j < span; ++j) {
      uint8_t b = 0;
      for (int p = 0; p < per; ++p) b |= static_cast<uint8_t>(q[(g * per + p) * span + j] << (p * width));
      dst[g * span + j] = b;
    }
}

// The 12 scale bytes of Q4_K/Q5_K: eight 6-bit scale codes and eight 6-bit min codes.
void pack_6bit(const uint8_t* sc, const uint8_t* mn, uint8_t* dst) {
  for (int j = 0; j < 4; ++j) {
    dst[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    dst[j + 4] = static_cast<uint8_t>(mn[j] | ((mn[j + 4] >> 4) << 6));
    dst[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
  }
}

// Levels of one sub-block x[SUB] on step (less shift when kShift) and their weighted squared errors e.
template <int SUB, bool kShift>
DC_INLINE void level_sub(const float* x, const float* w, float step, float shift, float lo, float hi, float* q,
                         float* e) {
  if (step != 0.0f) {
    for (int i = 0; i < SUB; ++i) q[i] = round_clamped((kShift ? x[i] + shift : x[i]) / step, lo, hi);
  } else {
    for (int i = 0; i < SUB; ++i) q[i] = 0.0f;
  }
  for (int i = 0; i < SUB; ++i) {
    const float diff = (kShift ? step * q[i] - shift : step * q[i]) - x[i];
    e[i] = w[i] * diff * diff;
  }
}

template <int SUB, bool kShift>
DC_INLINE float level_block(const float* x, const float* w, const float* ls, const float* lm, float d, float dmin,
                            float lo, float hi, float* q) {
  float e[kQK];
  for (int j = 0; j < kQK / SUB; ++j)
    level_sub<SUB, kShift>(x + j * SUB, w + j * SUB, d * ls[j], kShift ? dmin * lm[j] : 0.0f, lo, hi, q + j * SUB,
                           e + j * SUB);
  return tree_sum<kQK>(e);
}

// Levels q[256] (lo..hi) on each sub-block's step d * ls[j] (less its low end dmin * lm[j]
// when lm is given) and their weighted error sum w (value - x)^2; _levels in kquants.py.
DC_MULTIVERSION float levels(const float* x, const float* w, const float* ls, const float* lm, float d, float dmin,
                             const Format& f, float* q) {
  const float lo = static_cast<float>(f.lo), hi = static_cast<float>(f.hi);
  if (f.sub == 32) return level_block<32, true>(x, w, ls, lm, d, dmin, lo, hi, q);  // Q4_K, Q5_K
  if (lm) return level_block<16, true>(x, w, ls, lm, d, dmin, lo, hi, q);           // Q2_K
  return level_block<16, false>(x, w, ls, lm, d, dmin, lo, hi, q);                  // Q3_K, Q6_K
}

// One weighted least-squares refit of the fp16 super-block steps for the chosen codes,
// x ~ d (ls q) - dmin lm, kept where it lowers the error; fills the levels q. refit_steps in kquants.py.
void refit_steps(const float* x, const float* w, const float* ls, const float* lm, c10::Half& d, c10::Half& dmin,
                 const Format& f, float* q) {
  const float err = levels(x, w, ls, lm, static_cast<float>(d), static_cast<float>(dmin), f, q);
  float a[kQK], wa[kQK], t[kQK];
  for (int i = 0; i < kQK; ++i) {
    a[i] = ls[i / f.sub] * q[i];
    wa[i] = w[i] * a[i];
  }
  const float saa = tree_dot<kQK>(wa, a);
  const float sxa = tree_dot<kQK>(wa, x);
  float nd = 0.0f, nm = 0.0f;
  bool ok;
  if (!lm) {
    ok = saa > 0.0f;
    if (ok) nd = sxa / saa;
  } else {
    float wb[kQK];
    for (int i = 0; i < kQK; ++i) {
      wb[i] = w[i] * lm[i / f.sub];
      t[i] = wa[i] * lm[i / f.sub];
    }
    const float sab = tree_sum<kQK>(t);
    for (int i = 0; i < kQK; ++i) t[i] = wb[i] * lm[i / f.sub];
    const float sbb = tree_sum<kQK>(t);
    const float sxb = tree_dot<kQK>(wb, x);
    const float det = saa * sbb - sab * sab;
    ok = det > 0.0f;
    if (ok) {
      nd = (sbb * sxa - sab * sxb) / det;
      nm = (sab * sxa - saa * sxb) / det;
      ok = nd > 0.0f && nm >= 0.0f && nm <= kHalfMax;
    }
  }
  if (!(ok && std::fabs(nd) <= kHalfMax)) return;
  const c10::Half d2 = half_of(nd), m2 = lm ? half_of(nm) : dmin;
  float q2[kQK];
  if (levels(x, w, ls, lm, static_cast<float>(d2), static_cast<float>(m2), f, q2) < err) {
    std::memcpy(q, q2, sizeof(q2));
    d = d2;
    dmin = m2;
  }
}

// Candidate super-block steps: the largest sub-block scale gets code (edge - c); STEP_SHRINK in kquants.py.
constexpr float kStepShrink[] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f};

// The fp16 super-block steps d (and dmin) and the sub-block codes ls (and lm) of the scales s
// (and mins m; null for the symmetric types), lowest weighted error first; choose_codes in kquants.py.
void choose_codes(const float* x, const float* w, const float* s, const float* m, const Format& f, float* ls,
                  float* lm, c10::Half& d, c10::Half& dmin) {
  const int nsub = kQK / f.sub;
  const bool symmetric = m == nullptr;
  const int lo = symmetric ? f.slo : 0;
  const float top = static_cast<float>(f.shi);
  float peak = s[0], mpeak = 0.0f;
  if (symmetric) {
    peak = s[peak_index(s, nsub)];
  } else {
    mpeak = m[0];
    for (int j = 1; j < nsub; ++j) {
      peak = std::max(peak, s[j]);
      mpeak = std::max(mpeak, m[j]);
    }
    dmin = half_of(mpeak / top);
    for (int j = 0; j < nsub; ++j) lm[j] = code(m[j], static_cast<float>(dmin), 0, f.shi);
  }
  float best = std::numeric_limits<float>::infinity(), q[kQK], cand[16];
  for (const float c : kStepShrink) {
    const c10::Half dc = half_of(peak / (symmetric ? static_cast<float>(f.slo) + c : top - c));
    for (int j = 0; j < nsub; ++j) cand[j] = code(s[j], static_cast<float>(dc), lo, f.shi);
    const float err =
        levels(x, w, cand, symmetric ? nullptr : lm, static_cast<float>(dc), static_cast<float>(dmin), f, q);
    if (err < best) {
      best = err;
      d = dc;
      std::memcpy(ls, cand, sizeof(float) * nsub);
    }
  }
  if (symmetric) return;
  for (size_t k = 1; k < sizeof(kStepShrink) / sizeof(float); ++k) {
    const c10::Half mc = half_of(mpeak / (top - kStepShrink[k]));
    for (int j = 0; j < nsub; ++j) cand[j] = code(m[j], static_cast<float>(mc), 0, f.shi);
    const float err = levels(x, w, ls, cand, static_cast<float>(d), static_cast<float>(mc), f, q);
    if (err < best) {
      best = err;
      dmin = mc;
      std::memcpy(lm, cand, sizeof(float) * nsub);
    }
  }
}

// One super-block x[256] (column weights cw or null) into dst[f.bytes]; _blocks in kquants.py.
void quantize_block(const float* x, const float* cw, const Format& f, uint8_t* dst) {
  const char kind = f.name[1];  // '2' ... '6'
  float w[kQK], xx[kQK];
  for (int i = 0; i < kQK; ++i) xx[i] = x[i] * x[i];
  const float sigma2 = tree_sum<kQK>(xx) * (2.0f / kQK);
  for (int i = 0; i < kQK; ++i) {
    w[i] = std::sqrt(sigma2 + xx[i]);
    if (cw) w[i] = cw[i] * w[i];
  }
  const int nsub = kQK / f.sub;
  const bool symmetric = f.lo < 0;
  float scale[16], low[16], ls[16], lm[16], q[kQK];
  c10::Half dh, mh(0.0f);
  if (symmetric) {
    for (int j = 0; j < nsub; ++j) scale[j] = fit_symmetric<16>(x + j * 16, w + j * 16, f);  // Q3_K, Q6_K
  } else {
    for (int j = 0; j < nsub; ++j) {
      if (f.sub == 16)
        fit_asymmetric<16>(x + j * 16, w + j * 16, f, scale[j], low[j]);
      else
        fit_asymmetric<32>(x + j * 32, w + j * 32, f, scale[j], low[j]);
      low[j] = 0.0f - low[j];  // the subtracted min, >= 0
    }
  }
  choose_codes(x, w, scale, symmetric ? nullptr : low, f, ls, lm, dh, mh);
  refit_steps(x, w, ls, symmetric ? nullptr : lm, dh, mh, f, q);
  uint8_t u[kQK], uq[kQK];
  for (int i = 0; i < kQK; ++i) u[i] = static_cast<uint8_t>(static_cast<int>(q[i]) - f.lo);
  if (kind == '3') {  // hmask[32], qs[64], scales[12], d
    for (int i = 0; i < kQK; ++i) uq[i] = u[i] >> 2;
    pack_bits(uq, kQK, 1, 1, dst);
    for (int i = 0; i < kQK; ++i) uq[i] = u[i] & 3;
    pack_bits(uq, kQK, 2, 2, dst + 32);
    uint8_t c[16];
    for (int j = 0; j < 16; ++j) c[j] = static_cast<uint8_t>(static_cast<int>(ls[j]) + 32);
    for (int j = 0; j < 8; ++j) dst[96 + j] = static_cast<uint8_t>((c[j] & 15) | ((c[j + 8] & 15) << 4));
    for (int j = 0; j < 16; ++j) uq[j] = c[j] >> 4;
    pack_bits(uq, 16, 1, 2, dst + 104);
    put_half(dst + 108, dh);
    return;
  }
  if (kind == '6') {  // ql[128], qh[64], scales[16] (int8), d
    for (int i = 0; i < kQK; ++i) uq[i] = u[i] & 15;
    pack_bits(uq, kQK, 2, 4, dst);
    for (int i = 0; i < kQK; ++i) uq[i] = u[i] >> 4;
    pack_bits(uq, kQK, 2, 2, dst + 128);
    for (int j = 0; j < 16; ++j) dst[192 + j] = static_cast<uint8_t>(static_cast<int8_t>(ls[j]));
    put_half(dst + 208, dh);
    return;
  }
  uint8_t cs[16], cm[16];
  for (int j = 0; j < nsub; ++j) {
    cs[j] = static_cast<uint8_t>(ls[j]);
    cm[j] = static_cast<uint8_t>(lm[j]);
  }
  if (kind == '2') {  // scales[16], qs[64], d, dmin
    for (int j = 0; j < 16; ++j) dst[j] = static_cast<uint8_t>(cs[j] | (cm[j] << 4));
    pack_bits(u, kQK, 2, 2, dst + 16);
    put_half(dst + 80, dh);
    put_half(dst + 82, mh);
    return;
  }
  put_half(dst, dh);  // q4_k / q5_k: d, dmin, scales[12], (qh[32],) qs[128]
  put_half(dst + 2, mh);
  pack_6bit(cs, cm, dst + 4);
  uint8_t* qs = dst + 16;
  if (kind == '5') {
    for (int i = 0; i < kQK; ++i) uq[i] = u[i] >> 4;
    pack_bits(uq, kQK, 1, 1, dst + 16);
    qs = dst + 48;
  }
  for (int i = 0; i < kQK; ++i) uq[i] = u[i] & 15;
  pack_bits(uq, kQK, 4, 4, qs);
}

at::Tensor quantize_kquant_cpu(const at::Tensor& weight_in, c10::string_view qtype_in,
                               const std::optional<at::Tensor>& importance) {
  const std::string qtype(qtype_in);
  const Format& f = format_of(qtype);
  TORCH_CHECK(weight_in.dim() == 2, "quantize_kquant: weight must be 2-D");
  const int64_t rows = weight_in.size(0), cols = weight_in.size(1);
  TORCH_CHECK(cols > 0 && cols % kQK == 0, "quantize_kquant: rows must be a positive multiple of 256 long, got ",
              cols);
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  at::Tensor cw;
  if (importance.has_value()) {
    TORCH_CHECK(importance->dim() == 1 && importance->size(0) == cols, "quantize_kquant: importance must be [", cols,
                "]");
    cw = importance->to(at::kCPU, at::kFloat).contiguous();
  }
  const int64_t blocks = cols / kQK, bytes = blocks * f.bytes;
  at::Tensor out = at::empty({rows, bytes}, weight.options().dtype(at::kByte));
  const float* src = weight.const_data_ptr<float>();
  const float* colw = cw.defined() ? cw.const_data_ptr<float>() : nullptr;
  uint8_t* dst = out.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < blocks; ++b)
        quantize_block(src + r * cols + b * kQK, colw ? colw + b * kQK : nullptr, f,
                       dst + r * bytes + b * f.bytes);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("quantize_kquant", &quantize_kquant_cpu);
}
