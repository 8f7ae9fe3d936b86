// Varlen attention forward on tensor cores (mma.sync m16n8k16, sm_80+), fp16 and bf16, head_dim
// 32, 64 and 128, in FlashAttention-2's structure.
//
// One block of 4 warps computes 64 queries of one (segment, head); each warp owns 16 query rows.
// The block walks the segment's keys in tiles of 64. Tiles reach shared memory by cp.async
// (16-byte copies, zero fill for rows past the segment or outside the tables) into two K/V buffers:
// while the warps compute on tile t, the copies of tile t+1 are in flight. Fragments come from
// shared memory by ldmatrix: Q and K plain, V with .trans (the B operand of P V is V's transpose
// in the 8x8 blocks ldmatrix moves). S = Q K^T on tensor cores (fp32 accumulate), an online
// softmax in registers (base 2, FlashAttention-2's rescaling, the 1/sum applied once at the end),
// then O += P V with P taken straight from the S accumulators (their layout equals the A
// operand's). Segment bounds are read from cu_seqlens (and the used lengths seqused_q/k) in device
// memory; blocks past a segment's end return at once, so the grid can be sized by the static bound
// max_seqlen_q. Rows are reached through the optional index tables.
#include <cstdint>

#include "mma_sm80.cuh"
#include "recvit_kernels.h"

namespace recvit {
namespace {

using mma::Pack;

constexpr int kBlockM = 64;  // queries per block
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWarps = 4;    // 16 query rows each
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;      // shared row padding: conflict-free ldmatrix for every head_dim
constexpr int kChunk = 8;    // elements per 16-byte copy
constexpr float kLog2e = 1.4426950408889634f;

// Shared memory: the Q tile and two buffers each of K and V.
template <int D>
constexpr int shared_bytes() { return (kBlockM + 4 * kBlockN) * (D + kPad) * 2; }
// Blocks per SM the register budget is sized for (ptxas caps registers at 65536 / (128 * this)).
template <int D>
constexpr int min_blocks() { return D <= 64 ? 4 : 2; }

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

// Starts copying `count` (<= 64) rows of one head, from segment position `first`, into `tile`;
// the other rows of the tile are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T (*tile)[D + kPad], const T* base, int64_t row_stride,
                                          int64_t first, int count, const int64_t* rows,
                                          int64_t rows_len, int64_t total) {
  static_assert(kBlockM == kBlockN, "load_tile fills 64-row tiles of either kind");
  for (int chunk = threadIdx.x; chunk < kBlockM * (D / kChunk); chunk += kThreads) {
    const int r = chunk / (D / kChunk);
    const int col = (chunk % (D / kChunk)) * kChunk;
    const int64_t row = r < count ? position_row(first + r, rows, rows_len, total) : -1;
    mma::cp_async_16(&tile[r][col], row >= 0 ? base + row * row_stride + col : base, row >= 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, min_blocks<D>())
varlen_attention_kernel(const VarlenAttentionParams p) {
  extern __shared__ __align__(16) unsigned char shared[];
  using Row = T[D + kPad];
  Row* q_tile = reinterpret_cast<Row*>(shared);
  Row* k_tiles = q_tile + kBlockM;      // buffer b: rows b * kBlockN ..
  Row* v_tiles = k_tiles + 2 * kBlockN;

  const int m_block = blockIdx.x;
  const int segment = blockIdx.y;
  const int head = blockIdx.z;
  const int64_t q_start = p.cu_seqlens_q[segment];
  const int64_t k_start = p.cu_seqlens_k[segment];
  int64_t q_len = static_cast<int64_t>(p.cu_seqlens_q[segment + 1]) - q_start;
  int64_t k_len = static_cast<int64_t>(p.cu_seqlens_k[segment + 1]) - k_start;
  if (p.seqused_q != nullptr && p.seqused_q[segment] < q_len) q_len = p.seqused_q[segment];
  if (p.seqused_k != nullptr && p.seqused_k[segment] < k_len) k_len = p.seqused_k[segment];
  q_len = q_len < 0 ? 0 : (q_len > p.max_seqlen_q ? p.max_seqlen_q : q_len);
  k_len = k_len < 0 ? 0 : (k_len > p.max_seqlen_k ? p.max_seqlen_k : k_len);
  const int64_t m_first = static_cast<int64_t>(m_block) * kBlockM;
  if (m_first >= q_len) return;
  const int q_count = static_cast<int>(q_len - m_first < kBlockM ? q_len - m_first : kBlockM);
  const int n_tiles = static_cast<int>((k_len + kBlockN - 1) / kBlockN);

  const T* q = static_cast<const T*>(p.q) + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + head * p.v_head_stride;
  auto load_kv = [&](int tile, int buffer) {
    const int64_t n_first = static_cast<int64_t>(tile) * kBlockN;
    const int count = static_cast<int>(k_len - n_first < kBlockN ? k_len - n_first : kBlockN);
    load_tile<T, D>(k_tiles + buffer * kBlockN, k, p.k_row_stride, k_start + n_first, count,
                    p.kv_rows, p.kv_rows_len, p.total_k);
    load_tile<T, D>(v_tiles + buffer * kBlockN, v, p.v_row_stride, k_start + n_first, count,
                    p.kv_rows, p.kv_rows_len, p.total_k);
  };
  load_tile<T, D>(q_tile, q, p.q_row_stride, q_start + m_first, q_count, p.q_rows, p.q_rows_len,
                  p.total_q);
  if (n_tiles > 0) load_kv(0, 0);
  mma::cp_async_commit();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;          // row within the 8-row half of a fragment
  const int pair = (lane % 4) * 2;     // first of the two columns this lane holds
  const int row0 = warp * 16 + group;  // this lane's two query rows: row0 and row0 + 8
  // ldmatrix.x4 row addresses: lane l names row l % 8 of matrix l / 8.
  const int a_row = warp * 16 + lane % 16, a_col = (lane / 16) * 8;             // Q: A operand
  const int k_row = (lane / 16) * 8 + lane % 8, k_col = ((lane / 8) % 2) * 8;  // K: two n8 tiles
  const int v_row = ((lane / 8) % 2) * 8 + lane % 8, v_col = (lane / 16) * 8;  // V: .trans

  float o_acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this lane's partial sums; reduced over the 4 lanes at the end
  const float scale_log2 = p.softmax_scale * kLog2e;

  for (int tile = 0; tile < n_tiles; ++tile) {
    mma::cp_async_wait<0>();
    __syncthreads();  // tile `tile` has landed; every warp is done with the other buffer
    if (tile + 1 < n_tiles) {
      load_kv(tile + 1, (tile + 1) % 2);
      mma::cp_async_commit();
    }
    const Row* k_tile = k_tiles + (tile % 2) * kBlockN;
    const Row* v_tile = v_tiles + (tile % 2) * kBlockN;
    const int64_t n_first = static_cast<int64_t>(tile) * kBlockN;
    const int k_count = static_cast<int>(k_len - n_first < kBlockN ? k_len - n_first : kBlockN);

    float s_acc[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) s_acc[j][0] = s_acc[j][1] = s_acc[j][2] = s_acc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t q_frag[4];
      mma::ldmatrix_x4(q_frag, &q_tile[a_row][kk * 16 + a_col]);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; j += 2) {
        uint32_t b[4];  // b[0], b[1]: key tile j; b[2], b[3]: key tile j + 1
        mma::ldmatrix_x4(b, &k_tile[j * 8 + k_row][kk * 16 + k_col]);
        mma::mma_16x8x16<T>(s_acc[j], q_frag, b[0], b[1]);
        mma::mma_16x8x16<T>(s_acc[j + 1], q_frag, b[2], b[3]);
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
    for (int n = 0; n < D / 8; ++n) {
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
#pragma unroll
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t b[4];  // b[0], b[1]: columns n*8..; b[2], b[3]: columns (n+1)*8..
        mma::ldmatrix_x4_trans(b, &v_tile[kk * 16 + v_row][n * 8 + v_col]);
        mma::mma_16x8x16<T>(o_acc[n], p_frag, b[0], b[1]);
        mma::mma_16x8x16<T>(o_acc[n + 1], p_frag, b[2], b[3]);
      }
    }
  }
  mma::cp_async_wait<0>();  // no copy outlives the block (the Q copy when there are no keys)

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
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(out_row + n * 8 + pair) =
          Pack<T>::two(o_acc[n][2 * h] * inverse, o_acc[n][2 * h + 1] * inverse);
    }
  }
}

template <typename T, int D>
cudaError_t launch(const VarlenAttentionParams& p, cudaStream_t stream) {
  constexpr int bytes = shared_bytes<D>();
  auto* kernel = varlen_attention_kernel<T, D>;
  if (bytes > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (error != cudaSuccess) return error;
  }
  // In 64 bits: max_seqlen_q may be as large as INT32_MAX, where max_seqlen_q + 63 overflows int.
  const int64_t m_blocks = (static_cast<int64_t>(p.max_seqlen_q) + kBlockM - 1) / kBlockM;
  const dim3 grid(static_cast<unsigned>(m_blocks), p.batch, p.heads);
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_head_dim(const VarlenAttentionParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t varlen_attention_forward(const VarlenAttentionParams& p, cudaStream_t stream) {
  if (!varlen_attention_supports_head_dim(p.head_dim) || p.batch < 1 || p.heads < 1 ||
      p.max_seqlen_q < 1 || p.max_seqlen_k < 1 || p.batch > 65535 || p.heads > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.total_q == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarType::kFloat16: return launch_head_dim<__half>(p, stream);
    case ScalarType::kBFloat16: return launch_head_dim<__nv_bfloat16>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace recvit
