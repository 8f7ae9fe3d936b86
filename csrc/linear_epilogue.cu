// Element-wise GEMM epilogue: out = act(y + bias) (+ residual) over contiguous (rows, cols), fp32
// arithmetic, GELU exact (erf), rounded to dtype at the end. The cuda MLP runs cuBLAS (through torch)
// for the GEMM and this kernel for bias + GELU and bias + residual, in place on the GEMM's output:
// y is the GEMM's product already rounded to dtype, so a layer rounds twice (a fused epilogue would
// round once), within the tolerance rule.
// cuBLASLt's fused GELU epilogue is the tanh approximation, which would not equal nn.GELU().
// Each thread handles 16-byte vectors when cols allows it (8 fp16/bf16 or 4 fp32 elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"
#include "recvit_kernels.h"

namespace recvit {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond this

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Vector {
  T v[kVec];
};

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) linear_epilogue_kernel(const LinearEpilogueParams p) {
  using V = Vector<T, kVec>;
  const int64_t vectors = p.rows * p.cols / kVec;
  const V* y = static_cast<const V*>(p.y);
  const V* residual = static_cast<const V*>(p.residual);
  const T* bias = static_cast<const T*>(p.bias);
  V* out = static_cast<V*>(p.out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < vectors;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t col = (i * kVec) % p.cols;
    const V in = y[i];
    V r;
    if (residual != nullptr) r = residual[i];
    V result;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float value = to_float(in.v[e]);
      if (bias != nullptr) value += to_float(bias[col + e]);
      if (p.gelu) value = gelu_erf(value);
      if (residual != nullptr) value += to_float(r.v[e]);
      result.v[e] = from_float<T>(value);
    }
    out[i] = result;
  }
}

template <typename T>
cudaError_t launch(const LinearEpilogueParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  auto aligned = [](const void* pointer) {
    return pointer == nullptr || reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
  };
  const bool vectorised = p.cols % kVec == 0 && aligned(p.y) && aligned(p.residual) &&
                          aligned(p.out);
  const int64_t vectors = p.rows * p.cols / (vectorised ? kVec : 1);
  int64_t blocks = (vectors + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  if (vectorised) {
    linear_epilogue_kernel<T, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    linear_epilogue_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_epilogue(const LinearEpilogueParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.cols < 0 || p.y == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarType::kFloat32: return launch<float>(p, stream);
    case ScalarType::kFloat16: return launch<__half>(p, stream);
    case ScalarType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace recvit
