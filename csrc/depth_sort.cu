// Depth sort: a stable counting sort of a (B, N) depth map into recvit's prefix layout, in two
// launches and without a host synchronisation.
//   1. histogram_rank_kernel (one block per image): the image's depth histogram and, for every
//      token, its rank among the earlier tokens of the same image with the same depth.
//   2. scatter_kernel (one block per image): from all histograms, the start of each (depth, image)
//      run in the global order (depth descending, then flat index) and in the image's own order;
//      writes perm, inverse_perm, image_order and the per-step lengths and cu_seqlens.
#include "recvit_kernels.h"

namespace recvit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename DepthT>
__device__ __forceinline__ int clamped_depth(DepthT value, int num_steps) {
  return value < 1 ? 1 : (value > num_steps ? num_steps : static_cast<int>(value));
}

// Shared memory: running[L+1] then warp_offsets[kWarps][L+1], int32. Bucket 0 gathers the lanes
// past the image's last token, so every lane of a warp takes part in __match_any_sync.
template <typename DepthT>
__global__ void __launch_bounds__(kThreads)
histogram_rank_kernel(const DepthT* __restrict__ depths, int64_t tokens, int num_steps,
                      int32_t* __restrict__ histogram, int32_t* __restrict__ rank) {
  extern __shared__ int32_t shared[];
  const int buckets = num_steps + 1;
  int32_t* running = shared;
  int32_t* warp_offsets = shared + buckets;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t image = blockIdx.x;
  const DepthT* image_depths = depths + image * tokens;
  int32_t* image_rank = rank + image * tokens;

  for (int i = threadIdx.x; i < buckets * (kWarps + 1); i += kThreads) shared[i] = 0;
  __syncthreads();
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t start = 0; start < tokens; start += kThreads) {
    const int64_t token = start + threadIdx.x;
    const int depth = token < tokens ? clamped_depth(image_depths[token], num_steps) : 0;
    const unsigned peers = __match_any_sync(0xffffffffu, depth);
    const int rank_in_warp = __popc(peers & lanes_below);
    if (rank_in_warp == 0) warp_offsets[warp * buckets + depth] = __popc(peers);
    __syncthreads();
    // Exclusive prefix over the warps, continuing from the previous chunks' counts.
    for (int bucket = threadIdx.x; bucket < buckets; bucket += kThreads) {
      int32_t total = running[bucket];
      for (int w = 0; w < kWarps; ++w) {
        const int32_t count = warp_offsets[w * buckets + bucket];
        warp_offsets[w * buckets + bucket] = total;
        total += count;
      }
      running[bucket] = total;
    }
    __syncthreads();
    if (token < tokens) image_rank[token] = warp_offsets[warp * buckets + depth] + rank_in_warp;
    __syncthreads();
    for (int i = threadIdx.x; i < buckets * kWarps; i += kThreads) warp_offsets[i] = 0;
    __syncthreads();
  }
  for (int bucket = threadIdx.x; bucket < buckets; bucket += kThreads) {
    histogram[image * buckets + bucket] = bucket == 0 ? 0 : running[bucket];
  }
}

// Shared memory: total[L+1], before[L+1] (u64: all images / images before this one),
// global_start[L+1] (i64), own[L+1], image_start[L+1] (i32).
template <typename DepthT>
__global__ void __launch_bounds__(kThreads)
scatter_kernel(const DepthT* __restrict__ depths, int64_t batch, int64_t tokens, int num_steps,
               const int32_t* __restrict__ histogram, const int32_t* __restrict__ rank,
               int64_t* __restrict__ perm, int64_t* __restrict__ inverse_perm,
               int64_t* __restrict__ step_rows, int32_t* __restrict__ image_lengths,
               int32_t* __restrict__ cu_seqlens, int64_t* __restrict__ image_order) {
  extern __shared__ unsigned long long shared_u64[];
  const int buckets = num_steps + 1;
  unsigned long long* total = shared_u64;
  unsigned long long* before = total + buckets;
  long long* global_start = reinterpret_cast<long long*>(before + buckets);
  int32_t* own = reinterpret_cast<int32_t*>(global_start + buckets);
  int32_t* image_start = own + buckets;
  const int64_t image = blockIdx.x;

  for (int bucket = threadIdx.x; bucket < buckets; bucket += kThreads) {
    total[bucket] = 0;
    before[bucket] = 0;
    own[bucket] = histogram[image * buckets + bucket];
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < batch * buckets; i += kThreads) {
    const int bucket = static_cast<int>(i % buckets);
    const unsigned long long count = static_cast<unsigned long long>(histogram[i]);
    if (bucket == 0 || count == 0) continue;
    atomicAdd(&total[bucket], count);
    if (i / buckets < image) atomicAdd(&before[bucket], count);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Deepest first: step l's active rows are the depths >= l.
    long long deeper = 0;                 // tokens of every image with a larger depth
    long long deeper_up_to_image = 0;     // ... of images 0..image with depth >= current
    int32_t deeper_in_image = 0;          // tokens of this image with a larger depth
    for (int depth = num_steps; depth >= 1; --depth) {
      global_start[depth] = deeper + static_cast<long long>(before[depth]);
      image_start[depth] = deeper_in_image;
      deeper += static_cast<long long>(total[depth]);
      deeper_in_image += own[depth];
      deeper_up_to_image += static_cast<long long>(before[depth]) + own[depth];
      const int step = depth - 1;
      image_lengths[step * batch + image] = deeper_in_image;
      cu_seqlens[step * (batch + 1) + image + 1] = static_cast<int32_t>(deeper_up_to_image);
      if (image == 0) {
        cu_seqlens[step * (batch + 1)] = 0;
        step_rows[step] = deeper;
      }
    }
  }
  __syncthreads();
  const DepthT* image_depths = depths + image * tokens;
  for (int64_t token = threadIdx.x; token < tokens; token += kThreads) {
    const int depth = clamped_depth(image_depths[token], num_steps);
    const int32_t r = rank[image * tokens + token];
    const int64_t flat = image * tokens + token;
    const int64_t position = global_start[depth] + r;
    perm[position] = flat;
    inverse_perm[flat] = position;
    image_order[image * tokens + image_start[depth] + r] = position;
  }
}

template <typename DepthT>
cudaError_t launch(const DepthSortParams& p, cudaStream_t stream) {
  const int buckets = p.num_steps + 1;
  const auto* depths = static_cast<const DepthT*>(p.depths);
  const size_t rank_shared = sizeof(int32_t) * buckets * (kWarps + 1);
  histogram_rank_kernel<DepthT><<<static_cast<unsigned>(p.batch), kThreads, rank_shared, stream>>>(
      depths, p.tokens, p.num_steps, p.histogram, p.rank);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  const size_t scatter_shared = buckets * (2 * sizeof(unsigned long long) + sizeof(long long) +
                                           2 * sizeof(int32_t));
  scatter_kernel<DepthT><<<static_cast<unsigned>(p.batch), kThreads, scatter_shared, stream>>>(
      depths, p.batch, p.tokens, p.num_steps, p.histogram, p.rank, p.perm, p.inverse_perm,
      p.step_rows, p.image_lengths, p.cu_seqlens, p.image_order);
  return cudaGetLastError();
}

}  // namespace

cudaError_t depth_sort(const DepthSortParams& p, cudaStream_t stream) {
  if (p.num_steps < 1 || p.num_steps > kMaxDepthSteps || p.batch < 0 || p.tokens < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0) {  // no images: every step has zero rows
    cudaError_t error = cudaMemsetAsync(p.step_rows, 0, sizeof(int64_t) * p.num_steps, stream);
    if (error != cudaSuccess) return error;
    return cudaMemsetAsync(p.cu_seqlens, 0, sizeof(int32_t) * p.num_steps, stream);
  }
  return p.depths_int64 ? launch<int64_t>(p, stream) : launch<int32_t>(p, stream);
}

}  // namespace recvit
