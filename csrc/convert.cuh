// Scalar conversions between the kernels' storage types and fp32, and the exact (erf) GELU, shared
// by the element-wise kernels and the GEMM epilogues. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace recvit {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// GELU with the exact normal CDF, as torch.nn.GELU() (approximate="none").
__device__ __forceinline__ float gelu_erf(float x) {
  return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
}

}  // namespace recvit
