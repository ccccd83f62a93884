// CUDA kernels of the depthcut ops: cuBLAS GEMM tiles (fp32 output even for bf16
// inputs, via mm.dtype) plus custom row kernels for the online logsumexp, target
// gather and gradient epilogue, and a reduction kernel for the Taylor saliency.
// Default dispatch on CUDA is Triton (engine/ops.py); these run with
// DEPTHCUT_BACKEND=ext or through torch.ops.depthcut directly.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "op_args.h"

namespace {

using depthcut_args::check_device;
using depthcut_args::chunk_arg;
using depthcut_args::softcap_arg;

constexpr int64_t kIgnoreIndex = -100;
constexpr int kThreads = 256;
// Logit tiles hold at most this many fp32 elements (128 MiB).
constexpr int64_t kTileElems = int64_t(1) << 25;
constexpr int64_t kDefaultChunk = 8192;

__device__ __forceinline__ float cap(float z, float softcap) {
  return softcap > 0.f ? softcap * tanhf(z / softcap) : z;
}

// Block-wide max / sum for blockDim.x == kThreads; the result is valid in every thread.
template <bool kMax>
__device__ float block_reduce(float v, float* smem) {
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffff, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? smem[lane] : (kMax ? -INFINITY : 0.f);
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffff, v, off);
    v = kMax ? fmaxf(v, o) : v + o;
  }
  __syncthreads();  // smem is reused by the next reduction
  return v;
}

// One block per row of a [rows, n] fp32 logit tile: merge the tile into the
// running (max, sum of exp) of that row and pick up the target logit.
__global__ void lse_update_kernel(const float* __restrict__ tile, int64_t n, const int64_t* __restrict__ targets,
                                  int64_t c0, float softcap, float* __restrict__ run_max,
                                  float* __restrict__ run_sum, float* __restrict__ tgt_logit) {
  __shared__ float smem[kThreads / 32];
  const int64_t row = blockIdx.x;
  const float* z = tile + row * n;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) m = fmaxf(m, cap(z[i], softcap));
  m = block_reduce<true>(m, smem);
  const float m_new = fmaxf(m, run_max[row]);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += __expf(cap(z[i], softcap) - m_new);
  s = block_reduce<false>(s, smem);
  if (threadIdx.x == 0) {
    run_sum[row] = run_sum[row] * __expf(run_max[row] - m_new) + s;
    run_max[row] = m_new;
    const int64_t t = targets[row];
    if (t >= c0 && t < c0 + n) tgt_logit[row] = cap(z[t - c0], softcap);
  }
}

// d nll / d raw logit = g * (softmax - onehot) * dcap over a [rows, n] tile.
template <typename scalar_t>
__global__ void grad_tile_kernel(const float* __restrict__ tile, int64_t n, const int64_t* __restrict__ targets,
                                 int64_t c0, const float* __restrict__ lse, const float* __restrict__ grad_nll,
                                 float softcap, scalar_t* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  const float g = t == kIgnoreIndex ? 0.f : grad_nll[row];
  const float l = lse[row];
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float z = cap(tile[row * n + i], softcap);
    float d = __expf(z - l) - (c0 + i == t ? 1.f : 0.f);
    if (softcap > 0.f) d *= 1.f - (z / softcap) * (z / softcap);
    out[row * n + i] = static_cast<scalar_t>(g * d);
  }
}

// Per-block partial sums of |w * dw| (fixed order, hence deterministic).
__global__ void abs_prod_kernel(const float* __restrict__ w, const float* __restrict__ dw, int64_t n,
                                float* __restrict__ partial) {
  __shared__ float smem[kThreads / 32];
  float s = 0.f;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    s += fabsf(w[i] * dw[i]);
  s = block_reduce<false>(s, smem);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Logit GEMM with fp32 output for any input dtype (cuBLAS accumulates in fp32).
void mm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) at::mm_out(out, a, b);
  else at::mm_out(out, a, b, at::kFloat);
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.is_cuda(), "linear_nll: hidden must be a CUDA tensor");
  check_device({&weight, &targets}, hidden.device(), "linear_nll");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_nll: hidden [M,H] and weight [V,H] expected");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_nll: hidden and weight dtypes differ");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0) && targets.scalar_type() == at::kLong,
              "linear_nll: targets must be int64 [M]");
  const int64_t bad =
      targets.ne(kIgnoreIndex).logical_and(targets.lt(0).logical_or(targets.ge(weight.size(0)))).sum().item<int64_t>();
  TORCH_CHECK(bad == 0, "linear_nll: ", bad, " targets outside [0, ", weight.size(0), ") and not -100");
}

struct Tiles {
  int64_t rows, chunk;
};

Tiles make_tiles(int64_t M, int64_t V, const std::optional<int64_t>& chunk) {
  Tiles t;
  t.chunk = std::min(chunk_arg(chunk, kDefaultChunk, "linear_nll"), std::max<int64_t>(V, 1));
  t.rows = std::max<int64_t>(1, std::min(M, kTileElems / t.chunk));
  return t;
}

std::tuple<at::Tensor, at::Tensor> linear_nll_forward_cuda(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                          const at::Tensor& targets_in,
                                                          std::optional<double> softcap_in,
                                                          std::optional<int64_t> chunk) {
  check_inputs(hidden_in, weight_in, targets_in);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0);
  const float softcap = softcap_arg(softcap_in, "linear_nll_forward");
  const Tiles tl = make_tiles(M, V, chunk);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor run_max = at::full({M}, -INFINITY, f32);
  at::Tensor run_sum = at::zeros({M}, f32);
  at::Tensor tgt = at::zeros({M}, f32);
  at::Tensor buf = at::empty({tl.rows * tl.chunk}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < M; r0 += tl.rows) {
    const int64_t nr = std::min(tl.rows, M - r0);
    for (int64_t c0 = 0; c0 < V; c0 += tl.chunk) {
      const int64_t nc = std::min(tl.chunk, V - c0);
      at::Tensor tile = buf.narrow(0, 0, nr * nc).view({nr, nc});
      mm_f32(tile, hidden.narrow(0, r0, nr), weight.narrow(0, c0, nc).t());
      lse_update_kernel<<<nr, kThreads, 0, stream>>>(tile.data_ptr<float>(), nc, targets.data_ptr<int64_t>() + r0,
                                                     c0, softcap, run_max.data_ptr<float>() + r0,
                                                     run_sum.data_ptr<float>() + r0, tgt.data_ptr<float>() + r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  at::Tensor lse = run_sum.log() + run_max;
  at::Tensor nll = (lse - tgt).masked_fill_(targets.eq(kIgnoreIndex), 0.0);
  return {nll, lse};
}

at::Tensor linear_nll_backward_cuda(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                    const at::Tensor& targets_in, const at::Tensor& lse_in,
                                    const at::Tensor& grad_nll_in, std::optional<double> softcap_in,
                                    std::optional<int64_t> chunk) {
  check_inputs(hidden_in, weight_in, targets_in);
  check_device({&lse_in, &grad_nll_in}, hidden_in.device(), "linear_nll_backward");
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous(), targets = targets_in.contiguous();
  const int64_t M = hidden.size(0), V = weight.size(0), H = hidden.size(1);
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous(), gn = grad_nll_in.to(at::kFloat).contiguous();
  const float softcap = softcap_arg(softcap_in, "linear_nll_backward");
  const Tiles tl = make_tiles(M, V, chunk);
  at::Tensor acc = at::zeros({M, H}, hidden.options().dtype(at::kFloat));
  at::Tensor step = at::empty({tl.rows, H}, acc.options());
  at::Tensor buf = at::empty({tl.rows * tl.chunk}, acc.options());
  at::Tensor gbuf = at::empty({tl.rows * tl.chunk}, hidden.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden.scalar_type(), "linear_nll_backward_cuda", [&] {
    for (int64_t r0 = 0; r0 < M; r0 += tl.rows) {
      const int64_t nr = std::min(tl.rows, M - r0);
      for (int64_t c0 = 0; c0 < V; c0 += tl.chunk) {
        const int64_t nc = std::min(tl.chunk, V - c0);
        const at::Tensor w = weight.narrow(0, c0, nc);
        at::Tensor tile = buf.narrow(0, 0, nr * nc).view({nr, nc});
        at::Tensor g = gbuf.narrow(0, 0, nr * nc).view({nr, nc});
        mm_f32(tile, hidden.narrow(0, r0, nr), w.t());
        grad_tile_kernel<scalar_t><<<nr, kThreads, 0, stream>>>(
            tile.data_ptr<float>(), nc, targets.data_ptr<int64_t>() + r0, c0, lse.data_ptr<float>() + r0,
            gn.data_ptr<float>() + r0, softcap, g.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        at::Tensor s = step.narrow(0, 0, nr);
        mm_f32(s, g, w);
        acc.narrow(0, r0, nr).add_(s);
      }
    }
  });
  return acc.to(hidden.scalar_type());
}

at::Tensor taylor_saliency_cuda(const at::Tensor& x_in, const at::Tensor& dy_in, const at::Tensor& weight_in) {
  TORCH_CHECK(x_in.is_cuda(), "taylor_saliency: x must be a CUDA tensor");
  check_device({&dy_in, &weight_in}, x_in.device(), "taylor_saliency");
  TORCH_CHECK(x_in.dim() == 2 && dy_in.dim() == 2 && weight_in.dim() == 2, "taylor_saliency: 2-D inputs expected");
  TORCH_CHECK(x_in.size(0) == dy_in.size(0) && weight_in.size(0) == dy_in.size(1) && weight_in.size(1) == x_in.size(1),
              "taylor_saliency: x [M,K], dy [M,N], weight [N,K] expected");
  TORCH_CHECK(x_in.scalar_type() == dy_in.scalar_type(), "taylor_saliency: x and dy dtypes differ");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const int64_t N = weight.size(0), K = weight.size(1);
  // Rows of dW per step: bounded scratch, full K so each GEMM spans all M tokens.
  const int64_t nb = std::max<int64_t>(1, std::min(N, kTileElems / std::max<int64_t>(K, 1)));
  const int blocks = 264;  // a few waves on any current GPU
  at::Tensor buf = at::empty({nb * K}, weight.options());
  const int64_t steps = (N + nb - 1) / nb;
  at::Tensor partial = at::empty({steps, blocks}, weight.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t n0 = s * nb, n = std::min(nb, N - n0);
    at::Tensor dw = buf.narrow(0, 0, n * K).view({n, K});
    mm_f32(dw, dy.narrow(1, n0, n).t(), x);  // signed over all tokens, |.| afterwards
    abs_prod_kernel<<<blocks, kThreads, 0, stream>>>(weight.data_ptr<float>() + n0 * K, dw.data_ptr<float>(), n * K,
                                                    partial[s].data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return partial.to(at::kDouble).sum().to(at::kFloat);
}

}  // namespace

TORCH_LIBRARY_IMPL(depthcut, CUDA, m) {
  m.impl("linear_nll_forward", &linear_nll_forward_cuda);
  m.impl("linear_nll_backward", &linear_nll_backward_cuda);
  m.impl("taylor_saliency", &taylor_saliency_cuda);
}
