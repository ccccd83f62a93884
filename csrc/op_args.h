// The optional arguments of the depthcut ops, shared by the CPU and CUDA kernels. The
// schemas (registration.cpp) take them as real optionals; inside the kernels an absent
// softcap or window is 0 and a positive value is required when one is given.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

namespace depthcut_args {

// The softcap as the kernels use it: 0 when absent, else the given (positive) value.
inline float softcap_arg(const std::optional<double>& softcap, const char* op, const char* name = "softcap") {
  if (!softcap.has_value()) return 0.0f;
  TORCH_CHECK(*softcap > 0.0, op, ": ", name, " must be positive when given, got ", *softcap);
  return static_cast<float>(*softcap);
}

// The vocabulary chunk: `fallback` when absent, else the given (positive) value.
inline int64_t chunk_arg(const std::optional<int64_t>& chunk, int64_t fallback, const char* op) {
  if (!chunk.has_value()) return fallback;
  TORCH_CHECK(*chunk > 0, op, ": chunk must be positive when given, got ", *chunk);
  return *chunk;
}

// Every tensor on `device` (a kernel indexing a tensor of another device crashes).
inline void check_device(std::initializer_list<const at::Tensor*> tensors, const at::Device& device, const char* op) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device() == device, op, ": every tensor must be on ", device, ", got one on ", t->device());
}

}  // namespace depthcut_args
