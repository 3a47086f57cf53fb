// Shared device helpers of the trt-twotower kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "twotower_plugins.h"

namespace tt {

// The most SMs a workspace is sized for. Workspace sizes depend on the shape only (a TensorRT
// engine sizes them at build time, possibly on another GPU or none); on a GPU with more SMs a
// launch uses fewer splits than it would like, never more memory than it was given.
constexpr int kWorkspaceSms = 192;

// The largest gridDim.y / gridDim.z of a launch.
constexpr int64_t kMaxGridYZ = 65535;

// Whether `p` is a multiple of `bytes`: checked on the host before a launch, because a
// misaligned vector load or cp.async faults on the device instead of returning an error.
inline bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int launch_status() {
  return cudaGetLastError() == cudaSuccess ? TT_OK : TT_ERR_LAUNCH;
}

}  // namespace tt
