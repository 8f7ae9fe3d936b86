// PyTorch binding of the recvit CUDA kernels (the only file here that includes PyTorch).
// Checks every argument (errors name it, as ValueError) and launches on the current stream;
// nothing here reads device memory back to the host.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <optional>
#include <string_view>
#include <utility>

#include "recvit_kernels.h"

namespace {

void check_cuda(const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected device ", device, ", got ", t.device());
}

// num_rows, the live row count the kernels read on the device: 1 element, int32 or int64.
void check_row_count(const at::Tensor& num_rows, const at::Device& device) {
  check_cuda("num_rows", num_rows, device);
  TORCH_CHECK_VALUE(num_rows.numel() == 1, "num_rows: expected 1 element, got shape ",
                    num_rows.sizes());
  TORCH_CHECK_VALUE(num_rows.scalar_type() == at::kInt || num_rows.scalar_type() == at::kLong,
                    "num_rows: expected int32 or int64, got ", num_rows.scalar_type());
}

void check_launch(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, "recvit ", op, " kernel launch failed: ",
              cudaGetErrorString(error));
}

recvit::ScalarType scalar_type(const char* name, const at::Tensor& t, bool allow_float32) {
  switch (t.scalar_type()) {
    case at::kHalf: return recvit::ScalarType::kFloat16;
    case at::kBFloat16: return recvit::ScalarType::kBFloat16;
    case at::kFloat:
      if (allow_float32) return recvit::ScalarType::kFloat32;
      break;
    default: break;
  }
  TORCH_CHECK_VALUE(false, name, ": expected ", allow_float32 ? "float32, " : "",
                    "float16 or bfloat16, got ", t.scalar_type());
  return recvit::ScalarType::kFloat32;
}

// Depth sort -> (perm, inverse_perm, step_rows, image_lengths, cu_seqlens, image_order).
std::vector<at::Tensor> depth_sort(const at::Tensor& depths, int64_t num_steps) {
  TORCH_CHECK_VALUE(depths.is_cuda(), "depths: expected a CUDA tensor, got device ", depths.device());
  TORCH_CHECK_VALUE(depths.dim() == 2, "depths: expected shape (batch, tokens), got ",
                    depths.sizes());
  TORCH_CHECK_VALUE(depths.scalar_type() == at::kInt || depths.scalar_type() == at::kLong,
                    "depths: expected int32 or int64, got ", depths.scalar_type());
  TORCH_CHECK_VALUE(num_steps >= 1 && num_steps <= recvit::kMaxDepthSteps,
                    "num_steps: expected 1..", recvit::kMaxDepthSteps, ", got ", num_steps);
  const int64_t batch = depths.size(0), tokens = depths.size(1);
  TORCH_CHECK_VALUE(batch * tokens < std::numeric_limits<int32_t>::max() && batch <= 0x7fffffff,
                    "depths: ", batch, " x ", tokens, " tokens exceed the int32 cu_seqlens range");
  const c10::cuda::CUDAGuard guard(depths.device());
  const at::Tensor input = depths.contiguous();
  const auto long_options = depths.options().dtype(at::kLong);
  const auto int_options = depths.options().dtype(at::kInt);
  at::Tensor perm = at::empty({batch * tokens}, long_options);
  at::Tensor inverse_perm = at::empty({batch * tokens}, long_options);
  at::Tensor image_order = at::empty({batch * tokens}, long_options);
  at::Tensor step_rows = at::empty({num_steps}, long_options);
  at::Tensor image_lengths = at::empty({num_steps, batch}, int_options);
  at::Tensor cu_seqlens = at::empty({num_steps, batch + 1}, int_options);
  at::Tensor histogram = at::empty({batch, num_steps + 1}, int_options);
  at::Tensor rank = at::empty({batch * tokens}, int_options);

  recvit::DepthSortParams p{};
  p.depths = input.data_ptr();
  p.depths_int64 = input.scalar_type() == at::kLong;
  p.batch = batch;
  p.tokens = tokens;
  p.num_steps = static_cast<int>(num_steps);
  p.perm = perm.data_ptr<int64_t>();
  p.inverse_perm = inverse_perm.data_ptr<int64_t>();
  p.step_rows = step_rows.data_ptr<int64_t>();
  p.image_lengths = image_lengths.data_ptr<int32_t>();
  p.cu_seqlens = cu_seqlens.data_ptr<int32_t>();
  p.image_order = image_order.data_ptr<int64_t>();
  p.histogram = histogram.data_ptr<int32_t>();
  p.rank = rank.data_ptr<int32_t>();
  check_launch("depth_sort", recvit::depth_sort(p, c10::cuda::getCurrentCUDAStream()));
  return {perm, inverse_perm, step_rows, image_lengths, cu_seqlens, image_order};
}

// A contiguous copy in a new allocation (16-byte aligned, as every allocation of the caching
// allocator is): t.contiguous() returns a contiguous t itself, misaligned pointer and all.
at::Tensor aligned_copy(const at::Tensor& t) {
  return t.clone(at::MemoryFormat::Contiguous);
}

// q/k/v usable by the kernel: last dimension contiguous, row/head strides multiples of 8 and a
// 16-byte aligned pointer; otherwise an aligned contiguous copy.
at::Tensor aligned(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : aligned_copy(t);
}

at::Tensor index_table(const char* name, const std::optional<at::Tensor>& rows,
                       const at::Device& device) {
  if (!rows.has_value()) return at::Tensor();
  const at::Tensor& t = *rows;
  check_cuda(name, t, device);
  TORCH_CHECK_VALUE(t.dim() == 1, name, ": expected 1 dimension, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
                    ": expected int32 or int64, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// (batch,) int32 used lengths per segment, or an undefined tensor.
at::Tensor used_lengths(const char* name, const std::optional<at::Tensor>& used,
                        const at::Device& device, int64_t batch) {
  if (!used.has_value()) return at::Tensor();
  const at::Tensor& t = *used;
  check_cuda(name, t, device);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, name, ": expected shape (", batch,
                    ",), one entry per segment, got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, ": expected int32, got ", t.scalar_type());
  return t.contiguous();
}

// Varlen attention forward; returns a tensor like q (rows no segment covers are zero, or, with
// seqused_q, unspecified).
at::Tensor varlen_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                    int64_t max_seqlen_q, int64_t max_seqlen_k,
                                    double softmax_scale, const std::optional<at::Tensor>& q_rows,
                                    const std::optional<at::Tensor>& kv_rows,
                                    const std::optional<at::Tensor>& seqused_q,
                                    const std::optional<at::Tensor>& seqused_k) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q: expected a CUDA tensor, got device ", q.device());
  const at::Device device = q.device();
  TORCH_CHECK_VALUE(q.dim() == 3, "q: expected (total_q, heads, head_dim), got ", q.sizes());
  const recvit::ScalarType dtype = scalar_type("q", q, /*allow_float32=*/false);
  const int64_t heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK_VALUE(recvit::varlen_attention_supports_head_dim(static_cast<int>(head_dim)),
                    "head_dim: the cuda varlen attention supports head_dim 32, 64 and 128, got ", head_dim);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    check_cuda(name, t, device);
    TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), name, ": expected dtype ",
                      q.scalar_type(), " like q, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(1) == heads && t.size(2) == head_dim, name,
                      ": expected (total_k, ", heads, ", ", head_dim, ") like q, got ", t.sizes());
  }
  TORCH_CHECK_VALUE(v.size(0) == k.size(0), "v: expected ", k.size(0), " rows like k, got ",
                    v.size(0));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cu_seqlens_q",
                                                                          cu_seqlens_q},
                                {"cu_seqlens_k", cu_seqlens_k}}) {
    check_cuda(name, t, device);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) >= 2, name,
                      ": expected shape (batch + 1,) with batch >= 1, got ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, name, ": expected int32, got ",
                      t.scalar_type());
  }
  TORCH_CHECK_VALUE(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), "cu_seqlens_k: expected ",
                    cu_seqlens_q.size(0), " entries like cu_seqlens_q, got ", cu_seqlens_k.size(0));
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK_VALUE(batch <= 65535, "cu_seqlens_q: at most 65535 segments, got ", batch);
  TORCH_CHECK_VALUE(heads >= 1 && heads <= 65535, "q: expected 1..65535 heads, got ", heads);
  TORCH_CHECK_VALUE(max_seqlen_q >= 1 && max_seqlen_q <= std::numeric_limits<int32_t>::max(),
                    "max_seqlen_q: expected a positive int32, got ", max_seqlen_q);
  TORCH_CHECK_VALUE(max_seqlen_k >= 1 && max_seqlen_k <= std::numeric_limits<int32_t>::max(),
                    "max_seqlen_k: expected a positive int32, got ", max_seqlen_k);

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q_ = aligned(q), k_ = aligned(k), v_ = aligned(v);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const at::Tensor q_table = index_table("q_rows", q_rows, device);
  const at::Tensor kv_table = index_table("kv_rows", kv_rows, device);
  const at::Tensor used_q = used_lengths("seqused_q", seqused_q, device, batch);
  const at::Tensor used_k = used_lengths("seqused_k", seqused_k, device, batch);
  // Without used lengths the rows no segment covers are zero (the op's contract); with them they
  // are unspecified, and no fill is paid for, as in flash-attention.
  const auto out_options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = used_q.defined() ? at::empty(q.sizes(), out_options)
                                    : at::zeros(q.sizes(), out_options);

  recvit::VarlenAttentionParams p{};
  p.q = q_.data_ptr();
  p.k = k_.data_ptr();
  p.v = v_.data_ptr();
  p.out = out.data_ptr();
  p.dtype = dtype;
  p.q_row_stride = q_.stride(0);
  p.q_head_stride = q_.stride(1);
  p.k_row_stride = k_.stride(0);
  p.k_head_stride = k_.stride(1);
  p.v_row_stride = v_.stride(0);
  p.v_head_stride = v_.stride(1);
  p.out_row_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.heads = static_cast<int>(heads);
  p.head_dim = static_cast<int>(head_dim);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.batch = static_cast<int>(batch);
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.q_rows = q_table.defined() ? q_table.data_ptr<int64_t>() : nullptr;
  p.q_rows_len = q_table.defined() ? q_table.numel() : 0;
  p.kv_rows = kv_table.defined() ? kv_table.data_ptr<int64_t>() : nullptr;
  p.kv_rows_len = kv_table.defined() ? kv_table.numel() : 0;
  p.seqused_q = used_q.defined() ? used_q.data_ptr<int32_t>() : nullptr;
  p.seqused_k = used_k.defined() ? used_k.data_ptr<int32_t>() : nullptr;
  p.softmax_scale = static_cast<float>(softmax_scale);
  check_launch("varlen_attention",
               recvit::varlen_attention_forward(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// A caller's output buffer for layer_norm: x's shape, dtype and device, contiguous.
void check_layer_norm_output(const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_cuda(name, t, x.device());
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), " like x, got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), name, ": expected dtype ",
                    x.scalar_type(), " like x, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor, got strides ",
                    t.strides());
}

// LayerNorm over the last dimension of x (or of x + residual); returns (out, summed or None).
// weight and bias (same dtype) are read in their own dtype: x's or float32. With num_rows (read on
// the device) only the rows r < num_rows[0] of x viewed as (rows, C) are read and written; the
// outputs' other rows keep what they held: unspecified in new tensors, untouched in the caller's
// `out` / `summed` (x's shape, contiguous).
std::tuple<at::Tensor, std::optional<at::Tensor>> layer_norm(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& num_rows, const std::optional<at::Tensor>& out,
    const std::optional<at::Tensor>& summed) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "x: expected a feature dimension, got shape ", x.sizes());
  const at::Device device = x.device();
  const recvit::ScalarType dtype = scalar_type("x", x, /*allow_float32=*/true);
  const int64_t width = x.size(-1);
  TORCH_CHECK_VALUE(width >= 1 && width <= recvit::kMaxLayerNormWidth,
                    "x: the cuda layer_norm supports widths 1..", recvit::kMaxLayerNormWidth,
                    ", got ", width);
  check_cuda("weight", weight, device);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == width, "weight: expected (", width,
                    ",), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
                    "weight: expected dtype ", x.scalar_type(), " like x or float32, got ",
                    weight.scalar_type());
  if (bias.has_value()) {
    check_cuda("bias", *bias, device);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == width, "bias: expected (", width,
                      ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->scalar_type() == weight.scalar_type(), "bias: expected dtype ",
                      weight.scalar_type(), " like weight, got ", bias->scalar_type());
  }
  if (residual.has_value()) {
    check_cuda("residual", *residual, device);
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), "residual: expected shape ", x.sizes(),
                      " like x, got ", residual->sizes());
    TORCH_CHECK_VALUE(residual->scalar_type() == x.scalar_type(), "residual: expected dtype ",
                      x.scalar_type(), " like x, got ", residual->scalar_type());
  }
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected >= 0, got ", eps);
  if (num_rows.has_value()) check_row_count(*num_rows, device);
  if (out.has_value()) check_layer_norm_output("out", *out, x);
  if (summed.has_value()) {
    TORCH_CHECK_VALUE(residual.has_value(), "summed: given without residual");
    check_layer_norm_output("summed", *summed, x);
    TORCH_CHECK_VALUE(!out.has_value() || !summed->is_alias_of(*out),
                      "summed: expected a tensor apart from out");
  }

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor x_ = x.contiguous();
  const at::Tensor residual_ = residual.has_value() ? residual->contiguous() : at::Tensor();
  const at::Tensor weight_ = weight.contiguous();
  const at::Tensor bias_ = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out_ = out.has_value() ? *out : at::empty_like(x_);
  at::Tensor summed_;
  if (residual.has_value()) summed_ = summed.has_value() ? *summed : at::empty_like(x_);

  recvit::LayerNormParams p{};
  p.x = x_.data_ptr();
  p.residual = residual_.defined() ? residual_.data_ptr() : nullptr;
  p.out = out_.data_ptr();
  p.summed = summed_.defined() ? summed_.data_ptr() : nullptr;
  p.weight = weight_.data_ptr();
  p.bias = bias_.defined() ? bias_.data_ptr() : nullptr;
  p.dtype = dtype;
  p.weight_dtype = scalar_type("weight", weight_, /*allow_float32=*/true);
  p.rows = x_.numel() / width;
  p.width = static_cast<int>(width);
  p.eps = static_cast<float>(eps);
  p.num_rows = num_rows.has_value() ? num_rows->data_ptr() : nullptr;
  p.num_rows_int64 = num_rows.has_value() && num_rows->scalar_type() == at::kLong;
  check_launch("layer_norm", recvit::layer_norm(p, c10::cuda::getCurrentCUDAStream()));
  if (summed_.defined()) return {out_, summed_};
  return {out_, std::nullopt};
}

// x (rows, K) for the kernels that copy 16-byte chunks: last dimension contiguous, row stride a
// multiple of 8 and a 16-byte aligned pointer; otherwise an aligned contiguous copy.
at::Tensor chunk_aligned(const at::Tensor& t) {
  const bool ok = t.stride(1) == 1 && t.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return ok ? t : aligned_copy(t);
}

// Checks a (size,) vector or a (rows, cols) matrix argument against `like`'s device and dtype.
void check_operand(const char* name, const at::Tensor& t, const at::Tensor& like,
                   at::IntArrayRef shape) {
  check_cuda(name, t, like.device());
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ",
                    like.scalar_type(), " like x, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
}

// [first, past the last) byte address of a non-empty tensor's elements.
std::pair<uintptr_t, uintptr_t> address_range(const at::Tensor& t) {
  int64_t extent = 0;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {start, start + static_cast<uintptr_t>((extent + 1) * t.element_size())};
}

// A caller's (rows, cols) `out` (unit column stride) must overlap neither itself nor a tensor the
// op reads while writing it (programs would overwrite what others still read), except the
// residual itself (same address, sizes and strides: each element is read by the program that
// overwrites it). As the Python front end checks: address ranges, whatever the storages (two
// may share memory, e.g. DLPack views of one buffer).
void check_out_apart(const at::Tensor& out,
                     std::initializer_list<std::pair<std::string_view, at::Tensor>> reads) {
  if (out.numel() == 0) return;
  TORCH_CHECK_VALUE(out.size(0) <= 1 || out.stride(0) >= out.size(1),
                    "out: its rows overlap one another (shape ", out.sizes(), ", strides ",
                    out.strides(), ")");
  const auto [start, end] = address_range(out);
  for (const auto& [name, t] : reads) {
    if (!t.defined() || t.numel() == 0) continue;
    if (name == "residual" && t.data_ptr() == out.data_ptr() && t.sizes() == out.sizes() &&
        t.strides() == out.strides()) continue;
    const auto [other_start, other_end] = address_range(t);
    TORCH_CHECK_VALUE(!(start < other_end && other_start < end), "out: overlaps ", name,
                      ", which the op reads while writing out");
  }
}

// Whether 16-bit pairs of every row of t can go as one 32-bit access.
bool pairs_aligned(const at::Tensor& t) {
  return t.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
}

// act(x W^T + bias) (+ residual) on the rows < num_rows[0] (read on the device), into `out` when
// given (its other rows untouched; it may be the residual) or a new tensor (other rows unspecified).
at::Tensor prefix_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& num_rows,
                         bool gelu, const std::optional<at::Tensor>& residual,
                         const std::optional<at::Tensor>& out) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected (rows, in_features), got ", x.sizes());
  const recvit::ScalarType dtype = scalar_type("x", x, /*allow_float32=*/false);
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK_VALUE(k % recvit::kPrefixLinearKMultiple == 0, "x: the cuda prefix_linear needs "
                    "in_features a multiple of ", recvit::kPrefixLinearKMultiple, ", got ", k);
  TORCH_CHECK_VALUE(rows <= recvit::kMaxPrefixLinearRows, "x: at most ",
                    recvit::kMaxPrefixLinearRows, " rows, got ", rows);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == k, "weight: expected (out_features, ",
                    k, "), got ", weight.sizes());
  const int64_t n = weight.size(0);
  TORCH_CHECK_VALUE(n <= std::numeric_limits<int32_t>::max() && k <= std::numeric_limits<int32_t>::max(),
                    "weight: dimensions exceed int32, got ", weight.sizes());
  check_operand("weight", weight, x, {n, k});
  if (bias.has_value()) check_operand("bias", *bias, x, {n});
  if (residual.has_value()) check_operand("residual", *residual, x, {rows, n});
  if (out.has_value()) {
    check_operand("out", *out, x, {rows, n});
    TORCH_CHECK_VALUE(out->stride(1) == 1, "out: expected a unit column stride, got strides ",
                      out->strides());
  }
  check_row_count(num_rows, x.device());
  if (out.has_value()) {
    check_out_apart(*out, {{"x", x}, {"weight", weight}, {"bias", bias.value_or(at::Tensor())},
                           {"num_rows", num_rows}, {"residual", residual.value_or(at::Tensor())}});
  }

  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_ = chunk_aligned(x), weight_ = chunk_aligned(weight);
  const at::Tensor bias_ = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor residual_;
  if (residual.has_value()) residual_ = residual->stride(1) == 1 ? *residual : residual->contiguous();
  const at::Tensor count = num_rows.contiguous();
  at::Tensor result = out.has_value()
      ? *out : at::empty({rows, n}, x.options().memory_format(at::MemoryFormat::Contiguous));

  recvit::PrefixLinearParams p{};
  p.x = x_.data_ptr();
  p.weight = weight_.data_ptr();
  p.bias = bias_.defined() ? bias_.data_ptr() : nullptr;
  p.residual = residual_.defined() ? residual_.data_ptr() : nullptr;
  p.out = result.data_ptr();
  p.dtype = dtype;
  p.x_row_stride = x_.stride(0);
  p.weight_row_stride = weight_.stride(0);
  p.residual_row_stride = residual_.defined() ? residual_.stride(0) : 0;
  p.out_row_stride = result.stride(0);
  p.rows = rows;
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.num_rows = count.data_ptr();
  p.num_rows_int64 = count.scalar_type() == at::kLong;
  p.gelu = gelu;
  p.paired = n % 2 == 0 && pairs_aligned(result) && (!residual_.defined() || pairs_aligned(residual_));
  check_launch("prefix_linear", recvit::prefix_linear(p, c10::cuda::getCurrentCUDAStream()));
  return result;
}

// out = act(y + bias) (+ residual) over contiguous (rows, cols) tensors; out may be y or residual.
void linear_epilogue(const at::Tensor& y, const at::Tensor& bias, const at::Tensor& residual,
                     at::Tensor& out, bool gelu, recvit::ScalarType dtype) {
  recvit::LinearEpilogueParams p{};
  p.y = y.data_ptr();
  p.bias = bias.defined() ? bias.data_ptr() : nullptr;
  p.residual = residual.defined() ? residual.data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.dtype = dtype;
  p.rows = y.size(0);
  p.cols = y.size(1);
  p.gelu = gelu;
  check_launch("linear_epilogue", recvit::linear_epilogue(p, c10::cuda::getCurrentCUDAStream()));
}

// residual + fc2(gelu(fc1(x))): cuBLAS GEMMs through at::mm, bias + exact GELU and
// bias + residual in the fused epilogue kernel; into `out` when given (it may be the residual).
at::Tensor mlp(const at::Tensor& x, const at::Tensor& fc1_weight,
               const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
               const std::optional<at::Tensor>& fc2_bias,
               const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& out) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x: expected a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, "x: expected (rows, in_features), got ", x.sizes());
  const recvit::ScalarType dtype = scalar_type("x", x, /*allow_float32=*/true);
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK_VALUE(fc1_weight.dim() == 2, "fc1_weight: expected (hidden, ", k, "), got ",
                    fc1_weight.sizes());
  const int64_t hidden = fc1_weight.size(0);
  check_operand("fc1_weight", fc1_weight, x, {hidden, k});
  TORCH_CHECK_VALUE(fc2_weight.dim() == 2, "fc2_weight: expected (out, ", hidden, "), got ",
                    fc2_weight.sizes());
  const int64_t n = fc2_weight.size(0);
  check_operand("fc2_weight", fc2_weight, x, {n, hidden});
  if (fc1_bias.has_value()) check_operand("fc1_bias", *fc1_bias, x, {hidden});
  if (fc2_bias.has_value()) check_operand("fc2_bias", *fc2_bias, x, {n});
  if (residual.has_value()) check_operand("residual", *residual, x, {rows, n});
  if (out.has_value()) {
    check_operand("out", *out, x, {rows, n});
    TORCH_CHECK_VALUE(out->stride(1) == 1, "out: expected a unit column stride, got strides ",
                      out->strides());
    check_out_apart(*out, {{"x", x}, {"fc1_weight", fc1_weight},
                           {"fc1_bias", fc1_bias.value_or(at::Tensor())}, {"fc2_weight", fc2_weight},
                           {"fc2_bias", fc2_bias.value_or(at::Tensor())},
                           {"residual", residual.value_or(at::Tensor())}});
  }

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::mm(x, fc1_weight.t());
  linear_epilogue(h, fc1_bias.has_value() ? fc1_bias->contiguous() : at::Tensor(), at::Tensor(), h,
                  /*gelu=*/true, dtype);
  at::Tensor y = at::mm(h, fc2_weight.t());
  if (!fc2_bias.has_value() && !residual.has_value()) return out.has_value() ? out->copy_(y) : y;
  const at::Tensor bias_ = fc2_bias.has_value() ? fc2_bias->contiguous() : at::Tensor();
  const at::Tensor residual_ = residual.has_value() ? residual->contiguous() : at::Tensor();
  if (out.has_value() && out->is_contiguous()) {
    at::Tensor target = *out;
    linear_epilogue(y, bias_, residual_, target, /*gelu=*/false, dtype);
    return target;
  }
  linear_epilogue(y, bias_, residual_, y, /*gelu=*/false, dtype);
  return out.has_value() ? out->copy_(y) : y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "recvit CUDA kernels: depth sort, varlen attention forward, residual LayerNorm, "
            "live-row linear, MLP";
  m.def("depth_sort", &depth_sort, py::arg("depths"), py::arg("num_steps"));
  m.def("varlen_attention_forward", &varlen_attention_forward, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("q_rows") = py::none(),
        py::arg("kv_rows") = py::none(), py::arg("seqused_q") = py::none(),
        py::arg("seqused_k") = py::none());
  m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("residual") = py::none(), py::arg("num_rows") = py::none(),
        py::arg("out") = py::none(), py::arg("summed") = py::none());
  m.def("prefix_linear", &prefix_linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("num_rows"), py::arg("gelu"), py::arg("residual") = py::none(),
        py::arg("out") = py::none());
  m.def("mlp", &mlp, py::arg("x"), py::arg("fc1_weight"), py::arg("fc1_bias"),
        py::arg("fc2_weight"), py::arg("fc2_bias"), py::arg("residual") = py::none(),
        py::arg("out") = py::none());
  m.def("attention_supports_head_dim", [](int head_dim) {
    return recvit::varlen_attention_supports_head_dim(head_dim);
  });
  m.attr("max_depth_steps") = recvit::kMaxDepthSteps;
}
