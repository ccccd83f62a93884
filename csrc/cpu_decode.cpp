// The decode-step kernels of triton_kernels/decode.py for the CPU (fp32): RMSNorm with
// residual add, RoPE with the KV-cache write, GQA decode attention, and SwiGLU/GeGLU.
// Each is a single pass over a few kilobytes, so what they save is the dozens of ATen
// calls (and their dispatch cost) that the torch references make per block and token.
// Semantics, argument order and HF's cast points are those of the *_ref functions there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <vector>

#include "op_args.h"

namespace {

void check_fp32_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be an fp32 CPU tensor (the CPU decode step runs in fp32)");
}

// y = weight * (h / rms(h)) over rows of the last dim.
void rmsnorm_row(const float* h, const float* w, float* y, int64_t n, double eps) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += h[i] * h[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (h[i] * r);
}

std::tuple<at::Tensor, at::Tensor> add_rmsnorm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                                   const at::Tensor& weight, double eps) {
  check_fp32_cpu(x, "add_rmsnorm", "x");
  check_fp32_cpu(weight, "add_rmsnorm", "weight");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.numel() == n, "add_rmsnorm: weight has ", weight.numel(), " elements for rows of ", n);
  // h is a new tensor even without a residual: an op's outputs may not alias its inputs.
  at::Tensor h;
  if (residual.has_value() && residual->defined()) {
    check_fp32_cpu(*residual, "add_rmsnorm", "residual");
    h = x + *residual;
  } else {
    h = x.clone();
  }
  const at::Tensor hc = h.contiguous(), w = weight.contiguous();
  at::Tensor y = at::empty_like(hc);
  const int64_t rows = hc.numel() / std::max<int64_t>(n, 1);
  const float* hp = hc.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) rmsnorm_row(hp + r * n, wp, yp + r * n, n, eps);
  });
  return {y.view(x.sizes()), h};
}

// Rotate one head by the RoPE row (cos, sin) after an optional per-head RMSNorm.
void rope_head(const float* x, const float* norm, double eps, const float* c, const float* s, float* out,
               int64_t D, float* tmp) {
  if (norm != nullptr) {
    rmsnorm_row(x, norm, tmp, D, eps);
    x = tmp;
  }
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * c[i] + (-x[i + half]) * s[i];
    out[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
}

at::Tensor rope_cache_write_cpu(const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& sin,
                                const at::Tensor& pos, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& cache_pos, int64_t n_q, int64_t n_kv,
                                const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                                double eps) {
  const char* op = "rope_cache_write";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qkv_in, &cos, &sin, &k_cache, &v_cache})
    check_fp32_cpu(*t, op, "qkv, cos, sin and the caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": caches must be contiguous");
  const int64_t B = qkv_in.size(0), D = k_cache.size(-1), S = k_cache.size(2);
  TORCH_CHECK(qkv_in.numel() == B * (n_q + 2 * n_kv) * D, op, ": qkv must be [B, (n_q + 2 n_kv) * D]");
  TORCH_CHECK(cos.size(-1) == D && sin.size(-1) == D, op, ": RoPE tables must have D columns");
  const int64_t p = cache_pos.reshape(-1)[0].item<int64_t>();
  TORCH_CHECK(p >= 0 && p < S, op, ": cache position ", p, " outside the cache of ", S);
  const bool has_norm = q_norm.has_value() && q_norm->defined();
  TORCH_CHECK(has_norm == (k_norm.has_value() && k_norm->defined()), op, ": pass both q_norm and k_norm, or neither");
  at::Tensor qn, kn;
  if (has_norm) {
    qn = q_norm->contiguous();
    kn = k_norm->contiguous();
    check_fp32_cpu(qn, op, "q_norm");
    check_fp32_cpu(kn, op, "k_norm");
    TORCH_CHECK(qn.numel() == D && kn.numel() == D, op, ": q_norm and k_norm must have head_dim elements");
  }
  const at::Tensor qkv = qkv_in.contiguous(), cs = cos.contiguous(), sn = sin.contiguous();
  const at::Tensor pos64 = pos.to(at::kLong).contiguous();
  at::Tensor q = at::empty({B, n_q, D}, qkv.options());
  const float* src = qkv.const_data_ptr<float>();
  float *qp = q.mutable_data_ptr<float>(), *kp = k_cache.mutable_data_ptr<float>(),
        *vp = v_cache.mutable_data_ptr<float>();
  const int64_t* pp = pos64.const_data_ptr<int64_t>();
  const int64_t heads = n_q + 2 * n_kv, rows = cos.size(0);
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / (heads * D)), [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(D);
    for (int64_t b = b0; b < b1; ++b) {
      TORCH_CHECK(pp[b] >= 0 && pp[b] < rows, "rope_cache_write: position ", pp[b], " outside the RoPE table");
      const float* c = cs.const_data_ptr<float>() + pp[b] * D;
      const float* s = sn.const_data_ptr<float>() + pp[b] * D;
      const float* row = src + b * heads * D;
      for (int64_t h = 0; h < n_q; ++h)
        rope_head(row + h * D, has_norm ? qn.const_data_ptr<float>() : nullptr, eps, c, s, qp + (b * n_q + h) * D,
                  D, tmp.data());
      for (int64_t h = 0; h < n_kv; ++h) {
        const int64_t slot = ((b * n_kv + h) * S + p) * D;
        rope_head(row + (n_q + h) * D, has_norm ? kn.const_data_ptr<float>() : nullptr, eps, c, s, kp + slot, D,
                  tmp.data());
        std::copy_n(row + (n_q + n_kv + h) * D, D, vp + slot);
      }
    }
  });
  return q;
}

at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& start, const at::Tensor& cache_pos, std::optional<int64_t> window_in,
                                double scale, std::optional<double> softcap) {
  const char* op = "decode_attention";
  TORCH_CHECK(!window_in.has_value() || *window_in > 0, op, ": window must be positive when given");
  const int64_t window = window_in.value_or(0);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q_in, &k_cache, &v_cache})
    check_fp32_cpu(*t, op, "q and the caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": caches must be contiguous");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), G = Hq / Hkv;
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(3) == D, op, ": q [B, Hq, D] and caches [B, Hkv, S, D] disagree");
  const int64_t end = cache_pos.reshape(-1)[0].item<int64_t>() + 1;
  TORCH_CHECK(end >= 1 && end <= S, op, ": cache position outside the cache");
  const at::Tensor q = q_in.contiguous(), st = start.to(at::kLong).contiguous();
  at::Tensor out = at::empty_like(q);
  const float *qp = q.const_data_ptr<float>(), *kp = k_cache.const_data_ptr<float>(),
              *vp = v_cache.const_data_ptr<float>();
  float* op_ = out.mutable_data_ptr<float>();
  const int64_t* sp = st.const_data_ptr<int64_t>();
  const float sc = static_cast<float>(scale), cap = depthcut_args::softcap_arg(softcap, op);
  // One task per (row, KV head): its keys and values are read once for the query group.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(G * end * D, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> prob(end);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, kvh = t % Hkv;
      const int64_t lo = std::max<int64_t>(sp[b], window > 0 ? end - window : 0);
      const float* K = kp + t * S * D;
      const float* V = vp + t * S * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t head = (b * Hq + kvh * G + g) * D;
        const float* qh = qp + head;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = lo; j < end; ++j) {
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < D; ++i) s += qh[i] * K[j * D + i];
          s *= sc;
          if (cap > 0.0f) s = std::tanh(s / cap) * cap;
          prob[j] = s;
          mx = std::max(mx, s);
        }
        float sum = 0.0f;
        for (int64_t j = lo; j < end; ++j) sum += (prob[j] = std::exp(prob[j] - mx));
        float* o = op_ + head;
        std::fill_n(o, D, 0.0f);
        for (int64_t j = lo; j < end; ++j) {
          const float pj = prob[j] / sum;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) o[i] += pj * V[j * D + i];
        }
      }
    }
  });
  return out;
}

at::Tensor glu_cpu(const at::Tensor& gu_in, bool gelu) {
  check_fp32_cpu(gu_in, "swiglu", "gu");
  const at::Tensor gu = gu_in.contiguous();
  const int64_t I = gu.size(-1) / 2, rows = gu.numel() / std::max<int64_t>(gu.size(-1), 1);
  auto shape = gu.sizes().vec();
  shape.back() = I;
  at::Tensor out = at::empty(shape, gu.options());
  const float* src = gu.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  constexpr float kAlpha = 0.7978845608028654f;  // sqrt(2 / pi), as in tanh-gelu
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = src + r * 2 * I;
      const float* u = g + I;
      float* o = dst + r * I;
      for (int64_t i = 0; i < I; ++i) {
        const float x = g[i];
        const float a = gelu ? 0.5f * x * (1.0f + std::tanh(kAlpha * (x + 0.044715f * x * x * x)))
                             : x / (1.0f + std::exp(-x));
        o[i] = a * u[i];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("add_rmsnorm", &add_rmsnorm_cpu);
  m.impl("rope_cache_write", &rope_cache_write_cpu);
  m.impl("decode_attention", &decode_attention_cpu);
  m.impl("swiglu", &glu_cpu);
}
