// CUDA side of the fused MLP ops: DeviceKernels that queue the raw kernels of
// mlp_kernels.cu on the current stream, the CUDA kernels of fused_mlp_forward /
// fused_mlp_inference / fused_mlp_backward (torch.autocast for the public ops,
// CPU and CUDA alike, is in ../autocast.cpp).
//
// Two paths: the GEMM path (ATen's, i.e. cuBLAS, products through the shared
// orchestration of mlp.cpp, with our elementwise kernels between them), and the
// fully fused kernels of narrow_mlp.cu for narrow MLPs, taken where
// choose_narrow_path (narrow_path.h) says so; MLP_EXT_NARROW=off|on|auto, off by
// default until a GPU run has shown them correct and faster.
//
// cuBLASLt epilogues (bias + activation fused into the first product, dgelu +
// bias-gradient into the backward's) are not used: they cover only relu/gelu,
// need a second code path beside ATen's, and their gain on the elementwise share
// has to be measured on a GPU before it earns that.
#include <ATen/Context.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "../device_registration.h"
#include "../mlp.h"
#include "mlp_kernels.cuh"
#include "narrow_mlp.cuh"

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
  // (z's shape, dtype and device: check_backward_inputs)
  TORCH_INTERNAL_ASSERT(z.sizes() == g.sizes() && z.scalar_type() == g.scalar_type());
  TORCH_INTERNAL_ASSERT(!db1.defined() || (db1.is_contiguous() && db1.numel() == g.size(1)));
  const int64_t rows = g.size(0), width = g.size(1);
  dispatch_cuda_dtype(g.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = gpu::acc_t<T>;
    const int64_t scratch_elements =
        db1.defined() ? gpu::activation_backward_scratch<T>(rows, width) : 0;
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

// Seed and offset for one dropout draw from the device's default CUDA generator,
// advanced as torch's own random kernels advance it (philox_cuda_state under the
// generator's lock; graph-safe: under capture the kernel reads them on the
// device), so that torch.manual_seed / torch.cuda.manual_seed reproduce the mask.
gpu::PhiloxState philox_state(const Tensor& t) {
  const at::Generator& generator = at::cuda::detail::getDefaultCUDAGenerator(t.get_device());
  auto* impl = generator.get<at::CUDAGeneratorImpl>();
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(impl->mutex_);
    state = impl->philox_cuda_state(gpu::kDropoutPhiloxIncrement);
  }
  gpu::PhiloxState philox;
  if (state.captured_) {
    philox.seed_ptr = state.seed_.ptr;
    philox.offset_ptr = state.offset_.ptr;
    philox.offset_intragraph = static_cast<uint64_t>(state.offset_intragraph_);
  } else {
    philox.seed = state.seed_.val;
    philox.offset = state.offset_.val;
  }
  return philox;
}

void dropout_cuda(Tensor& h, Tensor& mask, double p) {
  TORCH_INTERNAL_ASSERT(
      h.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
      mask.numel() == h.numel());
  const gpu::PhiloxState philox = philox_state(h);
  dispatch_cuda_dtype(h.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(gpu::dropout<T>(
        ptr<T>(h), static_cast<uint8_t*>(mask.data_ptr()), h.numel(), 1.0 - p,
        dropout_scale(p), philox, current_stream(h)));
  });
}

void apply_dropout_cuda(Tensor& g, const Tensor& mask, double p) {
  TORCH_INTERNAL_ASSERT(
      g.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == at::kBool &&
      mask.numel() == g.numel());
  dispatch_cuda_dtype(g.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(gpu::apply_dropout<T>(
        ptr<T>(g), static_cast<const uint8_t*>(mask.const_data_ptr()), g.numel(),
        dropout_scale(p), current_stream(g)));
  });
}

// ---------------------------------------------------------------------------
// The fully fused narrow-MLP kernels (narrow_mlp.cu)

// MLP_EXT_NARROW, read at every call so that a test or a benchmark can switch it.
NarrowMode narrow_mode() {
  const char* value = std::getenv("MLP_EXT_NARROW");
  if (value == nullptr || *value == '\0') {
    return NarrowMode::Off;
  }
  const auto mode = parse_narrow_mode(value);
  TORCH_CHECK_VALUE(
      mode, "fused_mlp: expected the environment variable MLP_EXT_NARROW to be \"off\", "
      "\"on\" or \"auto\", but got \"", value, "\"");
  return *mode;
}

std::optional<NarrowDType> narrow_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return NarrowDType::Float16;
    case at::kBFloat16: return NarrowDType::BFloat16;
    case at::kFloat: return NarrowDType::Float32;
    default: return std::nullopt;
  }
}

// float32 products may round to TF32 exactly when ATen's cuBLAS calls may.
bool tf32_allowed() {
  return at::globalContext().allowTF32CuBLAS() && !at::NoTF32Guard::should_disable_tf32();
}

bool aligned(const Tensor& t) {
  return !t.defined() ||
      reinterpret_cast<std::uintptr_t>(t.data_ptr()) % narrow::kAlignment == 0;
}

const void* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

void* mutable_data_or_null(Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

// Whether this call takes the fused kernels. `inputs` are the arrays they would
// read (contiguous); what they write is allocated fresh, so aligned.
bool take_narrow_path(
    NarrowMode mode, int64_t n, const Tensor& w1, const Tensor& w2,
    std::initializer_list<const Tensor*> inputs, bool dropout) {
  NarrowProblem p;
  p.n = n, p.d = w1.size(1), p.h = w1.size(0), p.q = w2.size(0);
  p.dropout = dropout;
  p.dtype = narrow_dtype(w1.scalar_type());
  p.allow_tf32 = tf32_allowed();
  for (const Tensor* t : inputs) {
    p.aligned = p.aligned && aligned(*t);
  }
  p.compute_capability = narrow_mlp_device_compute_capability();
  p.smem_per_block = narrow_mlp_device_smem_per_block();
  return choose_narrow_path(mode, p).fused;
}

// DeviceKernels::fully_fused_forward: the forward on the narrow kernels, or
// nullopt where the GEMM path takes the call. keep_z = false (inference): z and h
// are neither written nor returned.
std::optional<ForwardResult> narrow_forward(
    const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2, Activation act, double weight_decay, double dropout,
    bool keep_z) {
  const NarrowMode mode = narrow_mode();
  if (mode == NarrowMode::Off) {
    return std::nullopt;
  }
  const int64_t d = w1.size(1), h = w1.size(0), q = w2.size(0);
  const int64_t n = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  // Contiguous copies, bound to locals that outlive the launch.
  const Tensor xc = x.reshape({n, d}).contiguous(), w1c = w1.contiguous(), w2c = w2.contiguous();
  const Tensor b1c = b1 ? b1->contiguous() : Tensor(), b2c = b2 ? b2->contiguous() : Tensor();
  if (!take_narrow_path(mode, n, w1, w2, {&xc, &w1c, &w2c}, dropout > 0)) {
    return std::nullopt;
  }
  Tensor o = at::empty({n, q}, x.options());
  Tensor z = keep_z ? at::empty({n, h}, x.options()) : Tensor();
  Tensor hidden = keep_z ? at::empty({n, h}, x.options()) : Tensor();
  NarrowForwardArgs a;
  a.n = n, a.d = d, a.h = h, a.q = q;
  a.dtype = *narrow_dtype(x.scalar_type());
  a.activation = act;
  a.allow_tf32 = tf32_allowed();
  a.x = xc.data_ptr(), a.w1 = w1c.data_ptr(), a.w2 = w2c.data_ptr();
  a.b1 = data_or_null(b1c), a.b2 = data_or_null(b2c);
  a.o = o.data_ptr(), a.z = mutable_data_or_null(z), a.hidden = mutable_data_or_null(hidden);
  C10_CUDA_CHECK(narrow_mlp_forward(a, current_stream(x)));
  Tensor s = weight_decay == 0 ? zero_scalar(x.options()) : penalty_cuda(w1, w2, weight_decay);
  return ForwardResult{
      with_leading_dims(o, x), s, z, hidden, at::empty({0}, x.options().dtype(at::kBool))};
}

// DeviceKernels::fully_fused_backward: the backward on the narrow kernels, or
// nullopt where the GEMM path takes the call.
std::optional<BackwardResult> narrow_backward(
    const Tensor& grad_o, const std::optional<Tensor>& grad_s, const Tensor& x, const Tensor& w1,
    const Tensor& w2, const Tensor& z, const std::optional<Tensor>& h,
    const std::optional<Tensor>& dropout_mask, Activation act, double weight_decay,
    std::array<bool, 5> output_mask) {
  const NarrowMode mode = narrow_mode();
  if (mode == NarrowMode::Off) {
    return std::nullopt;
  }
  const auto [need_dx, need_dw1, need_dw2, need_db1, need_db2] = output_mask;
  const int64_t n = z.size(0), d = w1.size(1), hidden = w1.size(0), q = w2.size(0);
  // Autograd may hand an expanded (stride-0) grad_o: everything made contiguous.
  const Tensor go = grad_o.reshape({n, q}).contiguous(), xc = x.reshape({n, d}).contiguous();
  const Tensor w1c = w1.contiguous(), w2c = w2.contiguous(), zc = z.contiguous();
  const Tensor hc = h ? h->contiguous() : Tensor();  // absent: recomputed on chip as phi(z)
  if (!take_narrow_path(
          mode, n, w1, w2, {&go, &xc, &w1c, &w2c, &zc, &hc}, dropout_mask.has_value())) {
    return std::nullopt;
  }
  // g_s stays on the device (reading it would synchronize); the kernel reads it.
  const Tensor gs =
      grad_s && weight_decay != 0 ? grad_s->to(x.options()).contiguous() : Tensor();
  const auto options = x.options();
  Tensor dx = need_dx ? at::empty({n, d}, options) : Tensor();
  Tensor dw1 = need_dw1 ? at::empty({hidden, d}, options) : Tensor();
  Tensor dw2 = need_dw2 ? at::empty({q, hidden}, options) : Tensor();
  Tensor db1 = need_db1 ? at::empty({hidden}, options) : Tensor();
  Tensor db2 = need_db2 ? at::empty({q}, options) : Tensor();
  NarrowBackwardArgs a;
  a.n = n, a.d = d, a.h = hidden, a.q = q;
  a.dtype = *narrow_dtype(x.scalar_type());
  a.activation = act;
  a.allow_tf32 = tf32_allowed();
  a.grad_o = go.data_ptr(), a.grad_s = data_or_null(gs), a.weight_decay = weight_decay;
  a.x = xc.data_ptr(), a.w1 = w1c.data_ptr(), a.w2 = w2c.data_ptr();
  a.z = zc.data_ptr(), a.hidden = data_or_null(hc);
  a.dx = mutable_data_or_null(dx), a.dw1 = mutable_data_or_null(dw1);
  a.dw2 = mutable_data_or_null(dw2), a.db1 = mutable_data_or_null(db1);
  a.db2 = mutable_data_or_null(db2);
  const size_t bytes = narrow_mlp_backward_workspace_size(a);
  // From the caching allocator, on the current stream (256-byte aligned).
  const Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  C10_CUDA_CHECK(narrow_mlp_backward(
      a, bytes > 0 ? workspace.data_ptr() : nullptr, bytes, current_stream(x)));
  return BackwardResult{need_dx ? dx.view(x.sizes()) : dx, dw1, dw2, db1, db2};
}

DeviceKernels make_cuda_kernels() {
  DeviceKernels k{
      bias_activation_cuda, activation_backward_cuda, penalty_cuda, /*reduced_precision=*/true};
  k.fully_fused_forward = narrow_forward;
  k.fully_fused_backward = narrow_backward;
  k.dropout = dropout_cuda;
  k.apply_dropout = apply_dropout_cuda;
  return k;
}

}  // namespace

const DeviceKernels kCudaKernels = make_cuda_kernels();

TORCH_LIBRARY_IMPL(mlp_ext, CUDA, m) {
  register_device_kernels<kCudaKernels>(m);
}

}  // namespace mlp_ext
