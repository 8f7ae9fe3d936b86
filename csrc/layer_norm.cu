// LayerNorm over rows, with the residual add fused in: one warp per row, the row held in
// registers (width <= kMaxLayerNormWidth), statistics in fp32 (mean, then the centred variance).
// Weight and bias are read in their own dtype (the activations' or fp32) and widened in registers.
// With a device-side row count, a warp whose row is past it returns before touching the rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"
#include "recvit_kernels.h"

namespace recvit {
namespace {

constexpr int kWarps = 4;  // rows per block
constexpr int kThreads = kWarps * 32;
constexpr int kPerLane = kMaxLayerNormWidth / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Rows to normalise: all, or the live count read from device memory (clamped to 0..rows).
__device__ __forceinline__ int64_t live_rows(const LayerNormParams& p) {
  if (p.num_rows == nullptr) return p.rows;
  const int64_t count = p.num_rows_int64 ? *static_cast<const int64_t*>(p.num_rows)
                                         : *static_cast<const int32_t*>(p.num_rows);
  return count < 0 ? 0 : (count > p.rows ? p.rows : count);
}

// T: the activations' dtype; W: the weight and bias dtype (T or float).
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const LayerNormParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= live_rows(p)) return;
  const int64_t offset = row * p.width;
  const T* x = static_cast<const T*>(p.x) + offset;
  const T* residual = p.residual == nullptr ? nullptr : static_cast<const T*>(p.residual) + offset;
  T* summed = p.summed == nullptr ? nullptr : static_cast<T*>(p.summed) + offset;
  T* out = static_cast<T*>(p.out) + offset;
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);

  float values[kPerLane];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int col = lane + 32 * j;
    values[j] = 0.f;
    if (col < p.width) {
      float value = to_float(x[col]);
      if (residual != nullptr) {
        const T rounded = from_float<T>(value + to_float(residual[col]));
        summed[col] = rounded;
        value = to_float(rounded);
      }
      values[j] = value;
      sum += value;
    }
  }
  const float mean = warp_sum(sum) / p.width;
  float squares = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    if (lane + 32 * j < p.width) squares += (values[j] - mean) * (values[j] - mean);
  }
  const float rstd = rsqrtf(warp_sum(squares) / p.width + p.eps);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int col = lane + 32 * j;
    if (col < p.width) {
      const float shift = bias == nullptr ? 0.f : to_float(bias[col]);
      out[col] = from_float<T>((values[j] - mean) * rstd * to_float(weight[col]) + shift);
    }
  }
}

template <typename T, typename W>
cudaError_t launch(const LayerNormParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.rows + kWarps - 1) / kWarps;
  layer_norm_kernel<T, W><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Weight in the activations' dtype, or in fp32.
template <typename T>
cudaError_t launch_for_weight(const LayerNormParams& p, cudaStream_t stream) {
  if (p.weight_dtype == ScalarType::kFloat32) return launch<T, float>(p, stream);
  return launch<T, T>(p, stream);
}

}  // namespace

cudaError_t layer_norm(const LayerNormParams& p, cudaStream_t stream) {
  if (p.width < 1 || p.width > kMaxLayerNormWidth || p.rows < 0 ||
      (p.residual != nullptr && p.summed == nullptr) ||
      (p.weight_dtype != p.dtype && p.weight_dtype != ScalarType::kFloat32) ||
      (p.rows + kWarps - 1) / kWarps > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarType::kFloat32: return launch<float, float>(p, stream);
    case ScalarType::kFloat16: return launch_for_weight<__half>(p, stream);
    case ScalarType::kBFloat16: return launch_for_weight<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace recvit
