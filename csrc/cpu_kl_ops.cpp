// CPU kernels of the distillation loss: per-token KL(teacher || student) between the
// softmaxes of two heads' logits, z_s = cap_s(hs @ ws.T) and z_t = cap_t(ht @ wt.T)
// (the hidden sizes may differ, the vocabulary is shared), and its gradient in the
// student's hidden states and head weight. Neither [M, V] logit matrix is held: both
// are streamed in tiles as in the NLL kernels (cpu_ops.cpp), with cpu_rows.h's pieces.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_rows.h"
#include "op_args.h"

namespace {

using depthcut_args::chunk_arg;
using depthcut_args::softcap_arg;

// One chunk of the teacher side of KL_m = sum_v p_t (z_t - z_s) - lse_t + lse_s:
// running max m and sum s of exp(z_t - m), and a = sum exp(z_t - m) * (z_t - z_s),
// both rescaled as m moves.
DC_MULTIVERSION void kl_teacher_row(const float* zt, const float* zs, int64_t n, float& m, float& s, float& a) {
  const float m_new = std::max(m, row_max(zt, n));
  float sum = 0.0f, acc = 0.0f;
#pragma omp simd reduction(+ : sum, acc)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_approx(zt[i] - m_new);
    sum += e;
    acc += e * (zt[i] - zs[i]);
  }
  const float scale = exp_approx(m - m_new);
  s = s * scale + sum;
  a = a * scale + acc;
  m = m_new;
}

// out = g * dKL / d raw student logit = g * (p_s - p_t) * dcap_s, from the capped
// logits. out may be zs.
DC_MULTIVERSION void kl_grad_row(const float* zs, const float* zt, float* out, int64_t n, float lse_s, float lse_t,
                                 float g, float softcap) {
  if (softcap > 0.0f) {
    const float inv = 1.0f / softcap;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float c = zs[i] * inv;
      out[i] = g * (exp_approx(zs[i] - lse_s) - exp_approx(zt[i] - lse_t)) * (1.0f - c * c);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g * (exp_approx(zs[i] - lse_s) - exp_approx(zt[i] - lse_t));
  }
}

struct KlInputs {
  at::Tensor hs, ws, ht, wt, targets;
};

// Checked and contiguous: student hs [M, H], ws [V, H]; teacher ht [M, Ht], wt [V, Ht].
KlInputs kl_inputs(const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt,
                   const at::Tensor& targets, const char* op) {
  check_head(hs, ws, op, "hs", "ws");
  check_head(ht, wt, op, "ht", "wt");
  TORCH_CHECK(hs.size(0) == ht.size(0), op, ": hs and ht disagree on M (", hs.size(0), " vs ", ht.size(0), ")");
  TORCH_CHECK(ws.size(0) == wt.size(0), op, ": ws and wt disagree on V (", ws.size(0), " vs ", wt.size(0), ")");
  check_targets(targets, hs.size(0), ws.size(0), op);
  return {hs.contiguous(), ws.contiguous(), ht.contiguous(), wt.contiguous(), targets.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_kl_forward_cpu(
    const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt, const at::Tensor& targets,
    std::optional<double> softcap_s_in, std::optional<double> softcap_t_in, std::optional<int64_t> chunk) {
  constexpr const char* op = "linear_kl_forward";
  const KlInputs in = kl_inputs(hs, ws, ht, wt, targets, op);
  const int64_t M = in.hs.size(0), V = in.ws.size(0);
  const float softcap_s = softcap_arg(softcap_s_in, op, "softcap_s");
  const float softcap_t = softcap_arg(softcap_t_in, op, "softcap_t");
  const Split sp = make_split(M, V, chunk_arg(chunk, kDefaultChunk, op), /*by_vocab=*/false);
  auto f32 = in.hs.options().dtype(at::kFloat);
  // Per vocabulary split: both online softmax states and the teacher's a.
  const float inf = std::numeric_limits<float>::infinity();
  at::Tensor smax = at::full({sp.vocab_splits, M}, -inf, f32), ssum = at::zeros({sp.vocab_splits, M}, f32);
  at::Tensor tmax = at::full({sp.vocab_splits, M}, -inf, f32), tsum = at::zeros({sp.vocab_splits, M}, f32);
  at::Tensor tacc = at::zeros({sp.vocab_splits, M}, f32);
  float* smx = smax.mutable_data_ptr<float>();
  float* ssm = ssum.mutable_data_ptr<float>();
  float* tmx = tmax.mutable_data_ptr<float>();
  float* tsm = tsum.mutable_data_ptr<float>();
  float* tac = tacc.mutable_data_ptr<float>();

  sweep(sp, [&] {
    return [&, buf_s = at::empty({sp.rows * sp.chunk}, in.hs.options()),
            buf_t = at::empty({sp.rows * sp.chunk}, in.ht.options()), row_s = std::vector<float>(sp.chunk),
            row_t = std::vector<float>(sp.chunk)](const Tile& t) mutable {
      const at::Tensor tile_s = logit_tile(buf_s, in.hs, in.ws, t), tile_t = logit_tile(buf_t, in.ht, in.wt, t);
      for (int64_t i = 0, o = t.split * M + t.r0; i < t.nr; ++i, ++o) {
        const float* zs = tile_row(tile_s, i, row_s.data(), softcap_s);
        const float* zt = tile_row(tile_t, i, row_t.data(), softcap_t);
        online_lse(zs, t.nc, smx[o], ssm[o]);
        kl_teacher_row(zt, zs, t.nc, tmx[o], tsm[o], tac[o]);
      }
    };
  });

  at::Tensor lse_s = merge_lse(smax, ssum), lse_t = merge_lse(tmax, tsum);
  // sum_v p_t (z_t - z_s) = sum_k a_k exp(m_k - lse_t) over the splits k.
  at::Tensor kl = (tacc * (tmax - lse_t.unsqueeze(0)).exp()).sum(0) - lse_t + lse_s;
  kl.masked_fill_(in.targets.eq(kIgnoreIndex), 0.0);
  return {kl, lse_s, lse_t};
}

std::tuple<at::Tensor, at::Tensor> linear_kl_backward_cpu(
    const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& ht, const at::Tensor& wt, const at::Tensor& targets,
    const at::Tensor& lse_s_in, const at::Tensor& lse_t_in, const at::Tensor& grad_kl,
    std::optional<double> softcap_s_in, std::optional<double> softcap_t_in, bool need_weight_grad,
    std::optional<int64_t> chunk) {
  constexpr const char* op = "linear_kl_backward";
  const KlInputs in = kl_inputs(hs, ws, ht, wt, targets, op);
  const int64_t M = in.hs.size(0), V = in.ws.size(0), H = in.hs.size(1);
  const at::Tensor lse_s = rows_f32(lse_s_in, M, op, "lse_s"), lse_t = rows_f32(lse_t_in, M, op, "lse_t");
  const at::Tensor gk = row_grads(grad_kl, in.targets, op, "grad_kl");
  const float softcap_s = softcap_arg(softcap_s_in, op, "softcap_s");
  const float softcap_t = softcap_arg(softcap_t_in, op, "softcap_t");
  const Split sp = make_split(M, V, chunk_arg(chunk, kDefaultChunk, op), need_weight_grad);
  auto f32 = in.hs.options().dtype(at::kFloat);
  at::Tensor partial = at::zeros({sp.vocab_splits, M, H}, f32);
  at::Tensor grad_ws = need_weight_grad ? at::zeros({V, H}, f32) : at::Tensor();
  const float* lsp = lse_s.const_data_ptr<float>();
  const float* ltp = lse_t.const_data_ptr<float>();
  const float* gp = gk.const_data_ptr<float>();

  sweep(sp, [&] {
    return [&, buf_s = at::empty({sp.rows * sp.chunk}, in.hs.options()),
            buf_t = at::empty({sp.rows * sp.chunk}, in.ht.options()),
            step = at::empty({std::max(sp.rows, sp.chunk) * H}, in.hs.options()),
            row_s = std::vector<float>(sp.chunk), row_t = std::vector<float>(sp.chunk)](const Tile& t) mutable {
      // The student's logit tile becomes d/d raw logits in place, row by row.
      const at::Tensor g = logit_tile(buf_s, in.hs, in.ws, t), tile_t = logit_tile(buf_t, in.ht, in.wt, t);
      for (int64_t i = 0; i < t.nr; ++i) {
        const int64_t r = t.r0 + i;
        if (gp[r] == 0.0f) {
          zero_tile_row(g, i);
          continue;
        }
        const float* zs = tile_row(g, i, row_s.data(), softcap_s);
        const float* zt = tile_row(tile_t, i, row_t.data(), softcap_t);
        kl_grad_row(zs, zt, row_s.data(), t.nc, lsp[r], ltp[r], gp[r], softcap_s);
        store_tile_row(row_s.data(), g, i);
      }
      add_head_grads(g, in.hs, in.ws, t, partial, grad_ws, step);
    };
  });
  return {partial.sum(0).to(in.hs.scalar_type()), need_weight_grad ? grad_ws : at::empty({0}, f32)};
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CPU, m) {
  m.impl("linear_kl_forward", &linear_kl_forward_cpu);
  m.impl("linear_kl_backward", &linear_kl_backward_cpu);
}
