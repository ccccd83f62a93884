// CPU kernels: fused linear + log-softmax + NLL (forward, backward with and without
// the head weight gradient, forward with the hidden gradient for a frozen head) and the
// Taylor saliency reduction. The shared row loops and the work split are in cpu_rows.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_rows.h"
#include "op_args.h"

namespace {

using depthcut_args::chunk_arg;
using depthcut_args::softcap_arg;

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

// out = d(g * nll) / d raw logit from the capped logits z: g * softmax * dcap; the
// caller subtracts the one-hot part at the target. out may be z.
DC_MULTIVERSION void nll_grad_row(const float* z, float* out, int64_t n, float lse, float g, float softcap) {
  if (softcap > 0.0f) {
    const float inv = 1.0f / softcap;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float t = z[i] * inv;
      out[i] = g * exp_approx(z[i] - lse) * (1.0f - t * t);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = g * exp_approx(z[i] - lse);
  }
}

// The logit tile g of tile t becomes d(sum_r gp[r] * nll_r) / d raw logits in place, row
// by row: gp[r] * (softmax - onehot(target)) * dcap; rows with gp[r] == 0 (ignored
// targets) become zero. z: scratch of t.nc floats.
void nll_grad_tile(const at::Tensor& g, const Tile& t, const int64_t* tgt, const float* lse, const float* gp,
                   float softcap, float* z) {
  for (int64_t i = 0; i < t.nr; ++i) {
    const int64_t r = t.r0 + i;
    if (gp[r] == 0.0f) {
      zero_tile_row(g, i);
      continue;
    }
    const float* zin = tile_row(g, i, z, softcap);
    const int64_t target = tgt[r];
    const bool hit = target >= t.c0 && target < t.c0 + t.nc;
    const float zt = hit ? zin[target - t.c0] : 0.0f;
    nll_grad_row(zin, z, t.nc, lse[r], gp[r], softcap);
    if (hit) z[target - t.c0] -= gp[r] * (softcap > 0.0f ? 1.0f - (zt / softcap) * (zt / softcap) : 1.0f);
    store_tile_row(z, g, i);
  }
}

std::tuple<at::Tensor, at::Tensor> linear_nll_forward_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets_in,
    std::optional<double> softcap_in, std::optional<int64_t> chunk) {
  constexpr const char* op = "linear_nll_forward";
  check_head(hidden_in, weight_in, op, "hidden", "weight");
  check_targets(targets_in, hidden_in.size(0), weight_in.size(0), op);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0);
  const float softcap = softcap_arg(softcap_in, op);
  const Split sp = make_split(M, V, chunk_arg(chunk, kDefaultChunk, op), /*by_vocab=*/false);
  auto f32 = hidden.options().dtype(at::kFloat);
  // Per vocabulary split: running max, sum of exp relative to it, target logit.
  at::Tensor pmax = at::full({sp.vocab_splits, M}, -std::numeric_limits<float>::infinity(), f32);
  at::Tensor psum = at::zeros({sp.vocab_splits, M}, f32);
  at::Tensor ptgt = at::zeros({sp.vocab_splits, M}, f32);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();

  sweep(sp, [&] {
    return [&, buf = at::empty({sp.rows * sp.chunk}, hidden.options()),
            zrow = std::vector<float>(sp.chunk)](const Tile& t) mutable {
      const at::Tensor tile = logit_tile(buf, hidden, weight, t);
      const int64_t o = t.split * M + t.r0;
      float* mx = pmax.mutable_data_ptr<float>() + o;
      float* sm = psum.mutable_data_ptr<float>() + o;
      float* zt = ptgt.mutable_data_ptr<float>() + o;
      for (int64_t i = 0; i < t.nr; ++i) {
        const float* z = tile_row(tile, i, zrow.data(), softcap);
        online_lse(z, t.nc, mx[i], sm[i]);
        const int64_t target = tgt[t.r0 + i];
        if (target >= t.c0 && target < t.c0 + t.nc) zt[i] = z[target - t.c0];
      }
    };
  });

  at::Tensor lse = merge_lse(pmax, psum);
  at::Tensor nll = (lse - ptgt.sum(0)).masked_fill_(targets.eq(kIgnoreIndex), 0.0);
  return {nll, lse};
}

// nll, lse and d(sum nll) / d hidden in one pass, for a frozen head under a loss that is a
// plain sum of NLLs (LoRA; docs/DESIGN.md, "Retraining"). Each task owns a row block and
// holds its logits over the whole vocabulary: chunk by chunk, the logit GEMM and the online
// max/sum while the chunk is in cache; then the buffer becomes the logit gradient in place
// and one GEMM with the weight gives the block's hidden gradient. Two head GEMMs, not the
// three of forward + backward (which recomputes the logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_nll_forward_grad_cpu(
    const at::Tensor& hidden_in, const at::Tensor& weight_in, const at::Tensor& targets_in,
    std::optional<double> softcap_in, std::optional<int64_t> chunk) {
  constexpr const char* op = "linear_nll_forward_grad";
  check_head(hidden_in, weight_in, op, "hidden", "weight");
  check_targets(targets_in, hidden_in.size(0), weight_in.size(0), op);
  TORCH_CHECK(weight_in.size(0) > 0, op, ": weight has no rows (empty vocabulary)");
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0);
  const float softcap = softcap_arg(softcap_in, op);
  const int64_t vchunk = std::min(chunk_arg(chunk, kDefaultChunk, op), V);
  const Split sp = make_row_split(M, V, hidden.element_size());
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor nll = at::empty({M}, f32), lse = at::empty({M}, f32);
  at::Tensor grad_hidden = at::empty_like(hidden);
  // Unit upstream gradient, none for ignored targets.
  const at::Tensor gn = targets.ne(kIgnoreIndex).to(at::kFloat);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float* gp = gn.const_data_ptr<float>();
  float* nllp = nll.mutable_data_ptr<float>();
  float* lsep = lse.mutable_data_ptr<float>();

  sweep(sp, [&] {
    return [&, buf = at::empty({sp.rows * V}, hidden.options()), zrow = std::vector<float>(V),
            mx = std::vector<float>(sp.rows), sm = std::vector<float>(sp.rows),
            zt = std::vector<float>(sp.rows)](const Tile& t) mutable {
      const at::Tensor logits = view2d(buf, t.nr, V);
      const at::Tensor h = hidden.narrow(0, t.r0, t.nr);
      std::fill_n(mx.begin(), t.nr, -std::numeric_limits<float>::infinity());
      std::fill_n(sm.begin(), t.nr, 0.0f);
      std::fill_n(zt.begin(), t.nr, 0.0f);
      for (int64_t c0 = 0; c0 < V; c0 += vchunk) {
        const int64_t nc = std::min(vchunk, V - c0);
        at::Tensor tile = logits.narrow(1, c0, nc);
        at::mm_out(tile, h, weight.narrow(0, c0, nc).t());
        for (int64_t i = 0; i < t.nr; ++i) {
          const float* z = tile_row(tile, i, zrow.data(), softcap);
          online_lse(z, nc, mx[i], sm[i]);
          const int64_t target = tgt[t.r0 + i];
          if (target >= c0 && target < c0 + nc) zt[i] = z[target - c0];
        }
      }
      for (int64_t i = 0, r = t.r0; i < t.nr; ++i, ++r) {
        lsep[r] = mx[i] + std::log(sm[i]);
        nllp[r] = gp[r] != 0.0f ? lsep[r] - zt[i] : 0.0f;
      }
      nll_grad_tile(logits, t, tgt, lsep, gp, softcap, zrow.data());
      at::Tensor grad_rows = grad_hidden.narrow(0, t.r0, t.nr);
      at::mm_out(grad_rows, logits, weight);
    };
  });
  return {nll, lse, grad_hidden};
}

// grad_hidden (hidden's dtype) and, with weight_grad, grad_weight (fp32 [V, H]) of
// sum(grad_nll * nll). Without the weight gradient, tasks are row blocks x vocabulary
// ranges; with it, vocabulary ranges that each loop over all rows.
std::tuple<at::Tensor, at::Tensor> nll_backward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                const at::Tensor& grad_nll_in, std::optional<double> softcap_in,
                                                std::optional<int64_t> chunk, bool weight_grad, const char* op) {
  check_head(hidden_in, weight_in, op, "hidden", "weight");
  check_targets(targets_in, hidden_in.size(0), weight_in.size(0), op);
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const at::Tensor lse = rows_f32(lse_in, M, op, "lse");
  const at::Tensor gn = row_grads(grad_nll_in, targets, op, "grad_nll");
  const float softcap = softcap_arg(softcap_in, op);
  const Split sp = make_split(M, V, chunk_arg(chunk, kDefaultChunk, op), weight_grad);
  auto f32 = hidden.options().dtype(at::kFloat);
  // fp32 partial gradients per vocabulary split, summed at the end.
  at::Tensor partial = at::zeros({sp.vocab_splits, M, H}, f32);
  at::Tensor grad_weight = weight_grad ? at::zeros({V, H}, f32) : at::Tensor();
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const float* lsep = lse.const_data_ptr<float>();
  const float* gp = gn.const_data_ptr<float>();

  sweep(sp, [&] {
    return [&, buf = at::empty({sp.rows * sp.chunk}, hidden.options()),
            step = at::empty({std::max(sp.rows, sp.chunk) * H}, hidden.options()),
            zrow = std::vector<float>(sp.chunk)](const Tile& t) mutable {
      const at::Tensor g = logit_tile(buf, hidden, weight, t);
      nll_grad_tile(g, t, tgt, lsep, gp, softcap, zrow.data());
      add_head_grads(g, hidden, weight, t, partial, grad_weight, step);
    };
  });
  return {partial.sum(0).to(hidden.scalar_type()), grad_weight};
}

at::Tensor linear_nll_backward_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& grad_nll, std::optional<double> softcap, std::optional<int64_t> chunk) {
  return std::get<0>(nll_backward(hidden, weight, targets, lse, grad_nll, softcap, chunk, false,
                                  "linear_nll_backward"));
}

std::tuple<at::Tensor, at::Tensor> linear_nll_backward_full_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, const at::Tensor& lse,
    const at::Tensor& grad_nll, std::optional<double> softcap, std::optional<int64_t> chunk) {
  return nll_backward(hidden, weight, targets, lse, grad_nll, softcap, chunk, true, "linear_nll_backward_full");
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
  m.impl("linear_nll_forward_grad", &linear_nll_forward_grad_cpu);
  m.impl("linear_nll_backward", &linear_nll_backward_cpu);
  m.impl("linear_nll_backward_full", &linear_nll_backward_full_cpu);
  m.impl("taylor_saliency", &taylor_saliency_cpu);
}
