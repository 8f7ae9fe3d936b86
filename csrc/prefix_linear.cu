// Linear layer on the live row prefix (the sync-free, graph-captured path): out = act(x W^T + b)
// (+ residual) on the first M rows, M read from device memory; fp16/bf16 on tensor cores
// (mma.sync m16n8k16, fp32 accumulate), sm_80+.
//
// Block tile 128 x 64 x 32, 4 warps in 2 x 2, each warp 64 x 32 (4 x 4 mma tiles). K steps run
// through a 3-stage cp.async pipeline (zero fill past M, N and K), fragments come from shared
// memory by ldmatrix: x plain as the A operand; W (N, K) plain as the B operand, since a row of W
// is a column of W^T. The epilogue adds the bias, applies the exact (erf) GELU and adds the
// residual in fp32, rounds once and stores the live rows only. A block whose first row is at or
// past M returns at once, so the work and the memory traffic follow M while the grid depends on
// the static row count alone.
#include <cstdint>

#include "convert.cuh"
#include "mma_sm80.cuh"
#include "recvit_kernels.h"

namespace recvit {
namespace {

using mma::Pack;

constexpr int kBlockM = 128;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kStages = 3;
constexpr int kWarpsN = 2;  // warps along N; 2 along M
constexpr int kThreads = 4 * 32;
constexpr int kWarpM = 64, kWarpN = 32;     // rows x columns per warp
constexpr int kMTiles = kWarpM / 16, kNTiles = kWarpN / 8;
constexpr int kStride = kBlockK + 8;        // shared row stride: conflict-free ldmatrix
constexpr int kChunk = 8;                   // elements per 16-byte copy
constexpr int kChunksPerRow = kBlockK / kChunk;
static_assert(kBlockM == 2 * kWarpM && kBlockN == kWarpsN * kWarpN, "2 x 2 warps cover the tile");
static_assert(kChunk == kPrefixLinearKMultiple, "K is copied in whole 16-byte chunks");

template <typename T>
struct SharedTiles {
  T a[kStages][kBlockM][kStride];  // x rows
  T b[kStages][kBlockN][kStride];  // W rows
};

// Starts copying K step `k_step` of the block's x rows and W rows into stage `stage`.
template <typename T>
__device__ __forceinline__ void load_stage(SharedTiles<T>& tiles, int stage, int k_step,
                                           const PrefixLinearParams& p, int64_t m0, int n0,
                                           int64_t live) {
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.weight);
  const int k0 = k_step * kBlockK;
#pragma unroll
  for (int i = 0; i < kBlockM * kChunksPerRow / kThreads; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int r = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * kChunk;
    const bool valid = m0 + r < live && k0 + col < p.k;
    mma::cp_async_16(&tiles.a[stage][r][col], valid ? x + (m0 + r) * p.x_row_stride + k0 + col : x,
                     valid);
  }
#pragma unroll
  for (int i = 0; i < kBlockN * kChunksPerRow / kThreads; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int r = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * kChunk;
    const bool valid = n0 + r < p.n && k0 + col < p.k;
    mma::cp_async_16(&tiles.b[stage][r][col],
                     valid ? w + static_cast<int64_t>(n0 + r) * p.weight_row_stride + k0 + col : w,
                     valid);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) prefix_linear_kernel(const PrefixLinearParams p) {
  __shared__ __align__(16) SharedTiles<T> tiles;
  const int n0 = blockIdx.x * kBlockN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int64_t count = p.num_rows_int64 ? *static_cast<const int64_t*>(p.num_rows)
                                         : *static_cast<const int32_t*>(p.num_rows);
  const int64_t live = count < 0 ? 0 : (count > p.rows ? p.rows : count);
  if (m0 >= live) return;
  const int k_steps = (p.k + kBlockK - 1) / kBlockK;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = (warp / kWarpsN) * kWarpM, warp_n = (warp % kWarpsN) * kWarpN;
  // ldmatrix.x4 row addresses: lane l names row l % 8 of matrix l / 8.
  const int a_row = warp_m + lane % 16, a_col = (lane / 16) * 8;                  // A: 16 x 16
  const int b_row = warp_n + (lane / 16) * 8 + lane % 8, b_col = ((lane / 8) % 2) * 8;  // 2 n8 tiles

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int i = 0; i < kMTiles; ++i)
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_steps) load_stage(tiles, s, s, p, m0, n0, live);
    mma::cp_async_commit();
  }
  for (int k_step = 0; k_step < k_steps; ++k_step) {
    mma::cp_async_wait<kStages - 2>();
    __syncthreads();  // step k_step has landed; every warp is done with the stage reloaded next
    const int next = k_step + kStages - 1;
    if (next < k_steps) load_stage(tiles, next % kStages, next, p, m0, n0, live);
    mma::cp_async_commit();
    const int stage = k_step % kStages;
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int i = 0; i < kMTiles; ++i) {
        mma::ldmatrix_x4(a[i], &tiles.a[stage][a_row + i * 16][kk * 16 + a_col]);
      }
#pragma unroll
      for (int j = 0; j < kNTiles; j += 2) {
        uint32_t b[4];  // b[0], b[1]: n8 tile j; b[2], b[3]: n8 tile j + 1
        mma::ldmatrix_x4(b, &tiles.b[stage][b_row + j * 8][kk * 16 + b_col]);
#pragma unroll
        for (int i = 0; i < kMTiles; ++i) {
          mma::mma_16x8x16<T>(acc[i][j], a[i], b[0], b[1]);
          mma::mma_16x8x16<T>(acc[i][j + 1], a[i], b[2], b[3]);
        }
      }
    }
  }
  mma::cp_async_wait<0>();

  // Epilogue: lane holds rows group, group + 8 and column pairs pair, pair + 1 of each mma tile.
  const T* bias = static_cast<const T*>(p.bias);
  const T* residual = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const int group = lane / 4, pair = (lane % 4) * 2;
#pragma unroll
  for (int j = 0; j < kNTiles; ++j) {
    const int col = n0 + warp_n + j * 8 + pair;
    if (col >= p.n) continue;
    const bool second = col + 1 < p.n;
    float bias0 = 0.f, bias1 = 0.f;
    if (bias != nullptr) {
      bias0 = to_float(bias[col]);
      if (second) bias1 = to_float(bias[col + 1]);
    }
#pragma unroll
    for (int i = 0; i < kMTiles; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + warp_m + i * 16 + group + 8 * h;
        if (row >= live) continue;
        float v0 = acc[i][j][2 * h] + bias0;
        float v1 = acc[i][j][2 * h + 1] + bias1;
        if (p.gelu) {
          v0 = gelu_erf(v0);
          v1 = gelu_erf(v1);
        }
        if (residual != nullptr) {
          const T* r = residual + row * p.residual_row_stride + col;
          if (p.paired) {
            const float2 both = Pack<T>::unpack(*reinterpret_cast<const uint32_t*>(r));
            v0 += both.x;
            v1 += both.y;
          } else {
            v0 += to_float(r[0]);
            if (second) v1 += to_float(r[1]);
          }
        }
        T* o = out + row * p.out_row_stride + col;
        if (p.paired) {
          *reinterpret_cast<uint32_t*>(o) = Pack<T>::two(v0, v1);
        } else {
          o[0] = from_float<T>(v0);
          if (second) o[1] = from_float<T>(v1);
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch(const PrefixLinearParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kBlockN - 1) / kBlockN),
                  static_cast<unsigned>((p.rows + kBlockM - 1) / kBlockM));
  prefix_linear_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t prefix_linear(const PrefixLinearParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.rows > kMaxPrefixLinearRows || p.n < 0 || p.k < 0 ||
      p.k % kPrefixLinearKMultiple != 0 || p.x_row_stride % kChunk != 0 ||
      p.weight_row_stride % kChunk != 0 || p.num_rows == nullptr ||
      (p.paired && (p.n % 2 != 0 || p.out_row_stride % 2 != 0 ||
                    (p.residual != nullptr && p.residual_row_stride % 2 != 0)))) {
    return cudaErrorInvalidValue;
  }
  if (p.rows == 0 || p.n == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarType::kFloat16: return launch<__half>(p, stream);
    case ScalarType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace recvit
