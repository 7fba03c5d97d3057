// CUDA side of the fused MLP ops: DeviceKernels that queue the raw kernels of
// mlp_kernels.cu on the current stream, the CUDA kernels of fused_mlp_forward /
// fused_mlp_backward (the matrix products are ATen's, i.e. cuBLAS, through the
// shared orchestration of mlp.cpp), and torch.autocast("cuda") for fused_mlp.
//
// cuBLASLt epilogues (bias + activation fused into the first product, dgelu +
// bias-gradient into the backward's) are not used: they cover only relu/gelu,
// need a second code path beside ATen's, and their gain (FIELD-NOTES: 1.05-1.3x
// on the elementwise share) has to be measured on a GPU before it earns that.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../mlp.h"
#include "mlp_kernels.cuh"

namespace mlp_ext {

namespace {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the CUDA element type of dtype (at::Half and
// __half, at::BFloat16 and __nv_bfloat16 share their bit layout).
template <typename F>
void dispatch_cuda_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(Tag<float>{});
    case at::kDouble: return f(Tag<double>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default:
      TORCH_CHECK_TYPE(
          false, "fused_mlp: expected float32, float64, float16 or bfloat16 on CUDA, but got ",
          dtype);
  }
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? ptr<T>(t) : nullptr;
}

cudaStream_t current_stream(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

void bias_activation_cuda(Tensor& z, Tensor& h, const std::optional<Tensor>& b1, Activation act) {
  TORCH_INTERNAL_ASSERT(
      z.dim() == 2 && z.is_contiguous() && h.is_contiguous() && h.sizes() == z.sizes());
  const Tensor bias = b1 ? b1->contiguous() : Tensor();  // lives until the kernel is queued
  dispatch_cuda_dtype(z.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(gpu::bias_activation<T>(
        ptr<T>(z), ptr<T>(h), ptr_or_null<T>(bias), z.size(0), z.size(1), act,
        current_stream(z)));
  });
}

void activation_backward_cuda(Tensor& g, const Tensor& z, Tensor& db1, Activation act) {
  TORCH_INTERNAL_ASSERT(g.dim() == 2 && g.is_contiguous() && z.is_contiguous());
  // z reaches here from the public fused_mlp_backward op: the kernel reads it
  // with g's shape and dtype, so those must match (not only be compatible).
  TORCH_CHECK(
      z.sizes() == g.sizes(), "fused_mlp_backward: expected z of shape ", g.sizes(),
      " (batch, hidden_features), but got z.shape = ", z.sizes());
  TORCH_CHECK_TYPE(
      z.scalar_type() == g.scalar_type(), "fused_mlp_backward: expected z of dtype ",
      g.scalar_type(), ", but got ", z.scalar_type());
  TORCH_CHECK(
      z.device() == g.device(), "fused_mlp_backward: expected z on ", g.device(), ", but got z on ",
      z.device());
  TORCH_INTERNAL_ASSERT(!db1.defined() || (db1.is_contiguous() && db1.numel() == g.size(1)));
  const int64_t rows = g.size(0), width = g.size(1);
  dispatch_cuda_dtype(g.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = gpu::acc_t<T>;
    const int64_t scratch_elements =
        db1.defined() ? gpu::activation_backward_scratch(rows, width) : 0;
    // From the caching allocator, on the current stream: freed when this
    // returns, reused only by work queued after these kernels.
    const Tensor scratch = at::empty(
        {scratch_elements * static_cast<int64_t>(sizeof(Acc))}, g.options().dtype(at::kByte));
    C10_CUDA_CHECK(gpu::activation_backward<T>(
        ptr<T>(g), ptr<T>(z), ptr_or_null<T>(db1),
        scratch_elements > 0 ? static_cast<Acc*>(scratch.data_ptr()) : nullptr, rows, width, act,
        current_stream(g)));
  });
}

Tensor penalty_cuda(const Tensor& w1, const Tensor& w2, double weight_decay) {
  const Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  Tensor s = at::empty({}, w1.options());
  const int64_t scratch_elements = gpu::penalty_scratch(w1c.numel(), w2c.numel());
  const Tensor scratch = at::empty({scratch_elements}, w1.options().dtype(at::kDouble));
  dispatch_cuda_dtype(w1.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(gpu::penalty<T>(
        ptr_or_null<T>(w1c), w1c.numel(), ptr_or_null<T>(w2c), w2c.numel(), weight_decay,
        ptr<T>(s), ptr_or_null<double>(scratch), current_stream(s)));
  });
  return s;
}

const DeviceKernels kCudaKernels{
    bias_activation_cuda, activation_backward_cuda, penalty_cuda, /*reduced_precision=*/true};

// The device the op runs on, for its device guard. Only a CUDA device is
// guarded: with a CPU tensor among CUDA ones the argument checks raise the
// device mismatch before anything runs.
std::optional<c10::Device> cuda_device_of(const Tensor& t) {
  return t.is_cuda() ? std::optional<c10::Device>(t.device()) : std::nullopt;
}

// torch.autocast("cuda") for fused_mlp, the way autocast treats nn.Linear
// (aten::linear, also CompositeImplicitAutograd, is a "lower_precision_fp" op):
// floating CUDA inputs other than float64 are cast to the autocast dtype, then
// the op runs below autocast, so o (and s) come out in that dtype.
//
// Why here, on the composite fused_mlp and not on fused_mlp_forward: the
// Autocast keys sit above Autograd, so these casts are recorded by autograd
// (cached_cast is Tensor::to) and the autograd node of fused_mlp sees, saves
// and differentiates the cast tensors only. Its backward then runs entirely in
// the autocast dtype (fused_mlp_backward gets matching dtypes), and the casts'
// own backward returns each gradient in its parameter's dtype, as with
// nn.Linear. A cast inside fused_mlp_forward instead would leave the node with
// float32 saved inputs, a bfloat16 z/h and grad_o, and gradients of mixed dtype.
std::tuple<Tensor, Tensor> fused_mlp_autocast(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    bool save_hidden) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mlp_ext::fused_mlp", "")
                       .typed<std::tuple<Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, const std::optional<Tensor>&,
                           c10::string_view, double, bool)>();
  // With inputs on several devices nothing is cast, so that the argument checks
  // report the device mismatch rather than a dtype mismatch that casting made.
  const auto on_device_of_x = [&](const std::optional<Tensor>& t) {
    return !t || t->device() == x.device();
  };
  if (!x.is_cuda() || !on_device_of_x(w1) || !on_device_of_x(w2) || !on_device_of_x(b1) ||
      !on_device_of_x(b2)) {
    return op.call(x, w1, w2, b1, b2, activation, weight_decay, save_hidden);
  }
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  const auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, at::kCUDA); };
  return op.call(
      cast(x), cast(w1), cast(w2), cast(b1), cast(b2), activation, weight_decay, save_hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CUDA, m) {
  m.impl(
      "fused_mlp_forward",
      [](const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
         const std::optional<Tensor>& b2, c10::string_view activation, double weight_decay) {
        const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(x));
        return fused_mlp_forward(kCudaKernels, x, w1, w2, b1, b2, activation, weight_decay);
      });
  m.impl(
      "fused_mlp_inference",
      [](const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
         const std::optional<Tensor>& b2, c10::string_view activation, double weight_decay) {
        const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(x));
        return fused_mlp_inference(kCudaKernels, x, w1, w2, b1, b2, activation, weight_decay);
      });
  m.impl(
      "fused_mlp_backward",
      [](const Tensor& grad_o, const std::optional<Tensor>& grad_s, const Tensor& x,
         const Tensor& w1, const Tensor& w2, const Tensor& z, const std::optional<Tensor>& h,
         c10::string_view activation, double weight_decay, std::array<bool, 5> output_mask) {
        const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(z));
        return fused_mlp_backward(
            kCudaKernels, grad_o, grad_s, x, w1, w2, z, h, activation, weight_decay,
            output_mask);
      });
}

TORCH_LIBRARY_IMPL(mlp_ext, AutocastCUDA, m) {
  m.impl("fused_mlp", TORCH_FN(fused_mlp_autocast));
}

}  // namespace mlp_ext
