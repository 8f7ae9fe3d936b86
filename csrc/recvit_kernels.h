// Torch-free launch API of the recvit CUDA kernels. The .cu files implement it and compile alone
// with nvcc; only binding.cpp includes PyTorch. Every launcher enqueues on `stream`, never
// synchronises, and returns the launch error (cudaSuccess when the launch was queued).
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace recvit {

enum class ScalarType { kFloat32, kFloat16, kBFloat16 };

// ---- depth sort (counting sort of a (B, N) depth map, values 1..L, into the prefix layout) ----
// Outputs, as recvit_kernels.DepthLayout defines them:
//   perm, inverse_perm, image_order: (B*N,) int64; step_rows: (L,) int64;
//   image_lengths: (L, B) int32; cu_seqlens: (L, B+1) int32.
// Workspace: histogram (B, L+1) int32 and rank (B*N,) int32, no initialisation needed.
// Depths outside 1..L are clamped into it (the kernels never index out of bounds).
struct DepthSortParams {
  const void* depths;      // (B, N) contiguous, int32 or int64 (depths_int64)
  bool depths_int64;
  int64_t batch, tokens;
  int num_steps;
  int64_t* perm;
  int64_t* inverse_perm;
  int64_t* step_rows;
  int32_t* image_lengths;
  int32_t* cu_seqlens;
  int64_t* image_order;
  int32_t* histogram;
  int32_t* rank;
};
cudaError_t depth_sort(const DepthSortParams& params, cudaStream_t stream);
// Largest num_steps the kernels accept (their shared-memory tables are sized by it).
constexpr int kMaxDepthSteps = 1024;

// ---- varlen attention forward (flash-attention's varlen convention, no causal mask) ----
// q (total_q, H, D), k/v (total_k, H, D), out like q; rows addressed through strides (in
// elements; the last dimension contiguous, row and head strides multiples of 8, pointers 16-byte
// aligned). Segment b has positions cu_seqlens_q[b]..cu_seqlens_q[b+1]; a position p maps to row
// q_rows[p] when q_rows is given, else to row p (likewise kv_rows for k and v). Query positions
// past max_seqlen_q and key positions past max_seqlen_k are ignored, as in the eager op. With
// seqused_q (flash-attention 3's used lengths) segment b has only its first seqused_q[b] query
// positions (likewise seqused_k for keys), so one table with static segment starts serves every
// recursion step. `out` rows no used position covers are left untouched (without seqused_q the
// binding zeroes them first). Row indices outside the tensors and positions outside the index
// tables are skipped, so bad tables cannot make the kernel read or write out of bounds.
struct VarlenAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  ScalarType dtype;  // kFloat16 or kBFloat16
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t out_row_stride, out_head_stride;
  int64_t total_q, total_k;
  int heads, head_dim;
  const int32_t* cu_seqlens_q;  // (batch + 1,)
  const int32_t* cu_seqlens_k;
  int batch;
  int max_seqlen_q, max_seqlen_k;  // segment positions past these bounds are ignored
  const int64_t* q_rows;   // nullptr or (q_rows_len,)
  int64_t q_rows_len;
  const int64_t* kv_rows;  // nullptr or (kv_rows_len,)
  int64_t kv_rows_len;
  const int32_t* seqused_q;  // nullptr or (batch,)
  const int32_t* seqused_k;  // nullptr or (batch,)
  float softmax_scale;
};
// head_dim values the attention kernel is built for.
inline bool varlen_attention_supports_head_dim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}
cudaError_t varlen_attention_forward(const VarlenAttentionParams& params, cudaStream_t stream);

// ---- LayerNorm over rows with optional fused residual add, on the live row prefix ----
// x, residual, out, summed: (rows, C) contiguous in dtype; weight, bias: (C,) contiguous in
// weight_dtype, which is dtype or kFloat32 (bias may be nullptr), widened to fp32 in registers.
// With residual: summed = x + residual (rounded to dtype) and out = LN(summed); summed may be
// nullptr only when residual is. With num_rows (one int32 or int64 in device memory,
// num_rows_int64) only the rows r < clamp(*num_rows, 0, rows) are read and written: a row past
// the count returns at once, so the work follows the live rows while the launch depends on rows
// alone. Without num_rows, every row.
struct LayerNormParams {
  const void* x;
  const void* residual;
  void* out;
  void* summed;
  const void* weight;
  const void* bias;
  ScalarType dtype;
  ScalarType weight_dtype;  // dtype or kFloat32
  int64_t rows;
  int width;
  float eps;
  const void* num_rows;  // nullptr: all rows
  bool num_rows_int64;
};
// Widest row the LayerNorm kernel holds in registers.
constexpr int kMaxLayerNormWidth = 1024;
cudaError_t layer_norm(const LayerNormParams& params, cudaStream_t stream);

// ---- linear layer on the live row prefix, the row count read from device memory ----
// out[r] = act(x[r] W^T + bias) (+ residual[r]) for r < M = clamp(*num_rows, 0, rows); the rows
// r >= M of x, residual and out are neither read nor written (out may be the residual itself: each
// element is read before it is written, by the same thread; out must not overlap x or weight).
// x (rows, K), weight (N, K), bias (N,) or nullptr, residual/out (rows, N), all in dtype
// (fp16/bf16) with the last dimension contiguous; x and weight with row strides multiples of 8 and
// 16-byte aligned pointers (K % 8 == 0). Row blocks past M return at once, so the work follows M
// while the launch depends on rows alone.
struct PrefixLinearParams {
  const void* x;
  const void* weight;
  const void* bias;      // nullptr or (N,)
  const void* residual;  // nullptr or (rows, N)
  void* out;
  ScalarType dtype;      // kFloat16 or kBFloat16
  int64_t x_row_stride, weight_row_stride, residual_row_stride, out_row_stride;
  int64_t rows;
  int n, k;
  const void* num_rows;  // one int32 or int64 (num_rows_int64) in device memory
  bool num_rows_int64;
  bool gelu;             // exact (erf) GELU after the bias
  bool paired;           // N, the out/residual row strides even, pointers 4-byte aligned
};
// Largest row count (the grid's y extent is rows / 128) and the K granularity the kernel takes.
constexpr int64_t kMaxPrefixLinearRows = 65535LL * 128;
constexpr int kPrefixLinearKMultiple = 8;
cudaError_t prefix_linear(const PrefixLinearParams& params, cudaStream_t stream);

// ---- GEMM epilogue: out = act(y + bias) (+ residual), element-wise over (rows, cols) ----
// y, residual, out contiguous (rows, cols) in dtype (out may be y or residual: each element is
// read before it is written, by the same thread); bias (cols,) in dtype or nullptr. fp32
// arithmetic, rounded to dtype at the end. The cuda MLP runs it after each cuBLAS GEMM, whose
// product y is already rounded: two roundings per layer.
struct LinearEpilogueParams {
  const void* y;
  const void* bias;
  const void* residual;
  void* out;
  ScalarType dtype;
  int64_t rows;
  int64_t cols;
  bool gelu;
};
cudaError_t linear_epilogue(const LinearEpilogueParams& params, cudaStream_t stream);

}  // namespace recvit
