// Varlen attention forward on tensor cores (mma.sync m16n8k16, sm_80+), fp16 and bf16, head_dim 64.
//
// One block of 4 warps computes 64 queries of one (segment, head); each warp owns 16 query rows.
// The block walks the segment's keys in tiles of 64: S = Q K^T on tensor cores (fp32 accumulate),
// an online softmax in registers (base 2, FlashAttention-2's rescaling), then O += P V with P taken
// straight from the S accumulators (their layout equals the A operand's). Segment bounds are read
// from cu_seqlens in device memory; blocks past a segment's end return at once, so the grid can be
// sized by the static bound max_seqlen_q. Rows are reached through the optional index tables.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "recvit_kernels.h"

namespace recvit {
namespace {

constexpr int kHeadDim = 64;
constexpr int kBlockM = 64;              // queries per block
constexpr int kBlockN = 64;              // keys per tile
static_assert(kBlockM == kBlockN, "load_tile fills 64-row tiles of either kind");
constexpr int kWarps = 4;                // 16 query rows each
constexpr int kThreads = kWarps * 32;
constexpr int kStride = kHeadDim + 8;    // shared row stride: conflict-free fragment loads
constexpr int kChunk = 8;                // elements per 16-byte load
constexpr float kLog2e = 1.4426950408889634f;

template <typename T> struct Pack;
template <> struct Pack<__half> {
  static __device__ __forceinline__ uint32_t two(float lo, float hi) {
    __half2 value = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&value);
  }
  static __device__ __forceinline__ uint32_t two(__half lo, __half hi) {
    __half2 value = __halves2half2(lo, hi);
    return *reinterpret_cast<uint32_t*>(&value);
  }
};
template <> struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t two(float lo, float hi) {
    __nv_bfloat162 value = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&value);
  }
  static __device__ __forceinline__ uint32_t two(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    __nv_bfloat162 value = __halves2bfloat162(lo, hi);
    return *reinterpret_cast<uint32_t*>(&value);
  }
};

// D (16x8 fp32) += A (16x16, row-major) * B (16x8, column-major).
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1);
template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                    uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                           uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Row of segment position `position`, or -1 when the position or the row is out of bounds.
__device__ __forceinline__ int64_t position_row(int64_t position, const int64_t* rows,
                                                int64_t rows_len, int64_t total) {
  if (position < 0) return -1;
  int64_t row = position;
  if (rows != nullptr) {
    if (position >= rows_len) return -1;
    row = rows[position];
  }
  return (row >= 0 && row < total) ? row : -1;
}

// Copies `count` (<= 64) rows of one head, starting at segment position `first`, into `tile`;
// the other rows of the tile are zero.
template <typename T>
__device__ __forceinline__ void load_tile(T (*tile)[kStride], const T* base, int64_t row_stride,
                                          int64_t first, int count, const int64_t* rows,
                                          int64_t rows_len, int64_t total) {
  for (int chunk = threadIdx.x; chunk < kBlockM * (kHeadDim / kChunk); chunk += kThreads) {
    const int r = chunk / (kHeadDim / kChunk);
    const int col = (chunk % (kHeadDim / kChunk)) * kChunk;
    const int64_t row = r < count ? position_row(first + r, rows, rows_len, total) : -1;
    uint4 value = make_uint4(0u, 0u, 0u, 0u);
    if (row >= 0) value = *reinterpret_cast<const uint4*>(base + row * row_stride + col);
    *reinterpret_cast<uint4*>(&tile[r][col]) = value;
  }
}

__device__ __forceinline__ uint32_t shared_pair(const void* address) {
  return *reinterpret_cast<const uint32_t*>(address);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
varlen_attention_kernel(const VarlenAttentionParams p) {
  __shared__ __align__(16) T q_tile[kBlockM][kStride];
  __shared__ __align__(16) T k_tile[kBlockN][kStride];
  __shared__ __align__(16) T v_tile[kBlockN][kStride];

  const int m_block = blockIdx.x;
  const int segment = blockIdx.y;
  const int head = blockIdx.z;
  const int64_t q_start = p.cu_seqlens_q[segment];
  const int64_t k_start = p.cu_seqlens_k[segment];
  int64_t q_len = static_cast<int64_t>(p.cu_seqlens_q[segment + 1]) - q_start;
  int64_t k_len = static_cast<int64_t>(p.cu_seqlens_k[segment + 1]) - k_start;
  q_len = q_len < 0 ? 0 : (q_len > p.max_seqlen_q ? p.max_seqlen_q : q_len);
  k_len = k_len < 0 ? 0 : (k_len > p.max_seqlen_k ? p.max_seqlen_k : k_len);
  const int64_t m_first = static_cast<int64_t>(m_block) * kBlockM;
  if (m_first >= q_len) return;
  const int q_count = static_cast<int>(q_len - m_first < kBlockM ? q_len - m_first : kBlockM);

  const T* q = static_cast<const T*>(p.q) + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + head * p.v_head_stride;
  load_tile<T>(q_tile, q, p.q_row_stride, q_start + m_first, q_count, p.q_rows, p.q_rows_len,
               p.total_q);
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;          // row within the 8-row half of a fragment
  const int pair = (lane % 4) * 2;     // first of the two columns this lane holds
  const int row0 = warp * 16 + group;  // this lane's two query rows: row0 and row0 + 8

  uint32_t q_frag[kHeadDim / 16][4];
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    q_frag[kk][0] = shared_pair(&q_tile[row0][kk * 16 + pair]);
    q_frag[kk][1] = shared_pair(&q_tile[row0 + 8][kk * 16 + pair]);
    q_frag[kk][2] = shared_pair(&q_tile[row0][kk * 16 + pair + 8]);
    q_frag[kk][3] = shared_pair(&q_tile[row0 + 8][kk * 16 + pair + 8]);
  }

  float o_acc[kHeadDim / 8][4];
#pragma unroll
  for (int n = 0; n < kHeadDim / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this lane's partial sums; reduced over the 4 lanes at the end
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int64_t n_first = 0; n_first < k_len; n_first += kBlockN) {
    const int k_count = static_cast<int>(k_len - n_first < kBlockN ? k_len - n_first : kBlockN);
    __syncthreads();  // every warp is done with the previous tiles
    load_tile<T>(k_tile, k, p.k_row_stride, k_start + n_first, k_count, p.kv_rows, p.kv_rows_len,
                 p.total_k);
    load_tile<T>(v_tile, v, p.v_row_stride, k_start + n_first, k_count, p.kv_rows, p.kv_rows_len,
                 p.total_k);
    __syncthreads();

    float s_acc[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
      s_acc[j][0] = s_acc[j][1] = s_acc[j][2] = s_acc[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t b0 = shared_pair(&k_tile[j * 8 + group][kk * 16 + pair]);
        const uint32_t b1 = shared_pair(&k_tile[j * 8 + group][kk * 16 + pair + 8]);
        mma_16x8x16<T>(s_acc[j], q_frag[kk], b0, b1);
      }
    }

    // Online softmax, base 2: scale, mask keys past the segment, new row maxima over the 4 lanes.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = j * 8 + pair + (e & 1) < k_count;
        s_acc[j][e] = valid ? s_acc[j][e] * scale_log2 : -INFINITY;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s_acc[j][e]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      // Each tile holds at least one valid key, so new_max is finite; guard anyway.
      const float safe_max = new_max == -INFINITY ? 0.f : new_max;
      alpha[h] = exp2f(row_max[h] - safe_max);
      row_max[h] = new_max;
      row_sum[h] *= alpha[h];
    }
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float safe_max = row_max[e / 2] == -INFINITY ? 0.f : row_max[e / 2];
        s_acc[j][e] = exp2f(s_acc[j][e] - safe_max);
        row_sum[e / 2] += s_acc[j][e];
      }
    }
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      o_acc[n][0] *= alpha[0];
      o_acc[n][1] *= alpha[0];
      o_acc[n][2] *= alpha[1];
      o_acc[n][3] *= alpha[1];
    }

    // O += P V: the S accumulators of key tiles 2kk and 2kk+1 form the A operand of step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t p_frag[4] = {
          Pack<T>::two(s_acc[2 * kk][0], s_acc[2 * kk][1]),
          Pack<T>::two(s_acc[2 * kk][2], s_acc[2 * kk][3]),
          Pack<T>::two(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]),
          Pack<T>::two(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3]),
      };
      const int key = kk * 16 + pair;
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        const int col = n * 8 + group;
        const uint32_t b0 = Pack<T>::two(v_tile[key][col], v_tile[key + 1][col]);
        const uint32_t b1 = Pack<T>::two(v_tile[key + 8][col], v_tile[key + 9][col]);
        mma_16x8x16<T>(o_acc[n], p_frag, b0, b1);
      }
    }
  }

  T* out = static_cast<T*>(p.out) + head * p.out_head_stride;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float total = row_sum[h];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const float inverse = total > 0.f ? 1.f / total : 0.f;
    const int local = row0 + 8 * h;
    if (local >= q_count) continue;
    const int64_t row = position_row(q_start + m_first + local, p.q_rows, p.q_rows_len, p.total_q);
    if (row < 0) continue;
    T* out_row = out + row * p.out_row_stride;
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      *reinterpret_cast<uint32_t*>(out_row + n * 8 + pair) =
          Pack<T>::two(o_acc[n][2 * h] * inverse, o_acc[n][2 * h + 1] * inverse);
    }
  }
}

template <typename T>
cudaError_t launch(const VarlenAttentionParams& p, cudaStream_t stream) {
  // In 64 bits: max_seqlen_q may be as large as INT32_MAX, where max_seqlen_q + 63 overflows int.
  const int64_t m_blocks = (static_cast<int64_t>(p.max_seqlen_q) + kBlockM - 1) / kBlockM;
  const dim3 grid(static_cast<unsigned>(m_blocks), p.batch, p.heads);
  varlen_attention_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t varlen_attention_forward(const VarlenAttentionParams& p, cudaStream_t stream) {
  if (!varlen_attention_supports_head_dim(p.head_dim) || p.batch < 1 || p.heads < 1 ||
      p.max_seqlen_q < 1 || p.max_seqlen_k < 1 || p.batch > 65535 || p.heads > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.total_q == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarType::kFloat16: return launch<__half>(p, stream);
    case ScalarType::kBFloat16: return launch<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace recvit
