// The gated op on CUDA: GatedDeviceKernels whose elementwise passes queue the
// raw kernels of gated_kernels.cu on the current stream; the products, column
// sums and s those of the fused op (kCudaKernels: cuBLAS through ATen, ATen's
// reductions, the penalty kernel).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../gated_registration.h"
#include "gated_kernels.cuh"

namespace mlp_ext {

namespace {

template <typename T>
struct GatedTag {
  using type = T;
};

// f(GatedTag<T>{}) for the CUDA element type of dtype (at::Half and __half,
// at::BFloat16 and __nv_bfloat16 share their bit layout).
template <typename F>
void dispatch_gated_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(GatedTag<float>{});
    case at::kDouble: return f(GatedTag<double>{});
    case at::kHalf: return f(GatedTag<__half>{});
    case at::kBFloat16: return f(GatedTag<__nv_bfloat16>{});
    default:
      TORCH_CHECK_TYPE(
          false, "gated_mlp: expected float32, float64, float16 or bfloat16 on CUDA, but got ",
          dtype);
  }
}

cudaStream_t stream_of(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

void gated_activation_cuda(const Tensor& z, Tensor& h, Activation act) {
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && h.is_contiguous() && z.size(1) == 2 * h.size(1));
  dispatch_gated_dtype(z.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(gpu::gated_activation<T>(
        static_cast<const T*>(z.const_data_ptr()), static_cast<T*>(h.data_ptr()), h.size(0),
        h.size(1), act, stream_of(z)));
  });
}

void gated_activation_backward_cuda(
    const Tensor& g_h, const Tensor& z, Tensor& g, Activation act) {
  TORCH_INTERNAL_ASSERT(g_h.is_contiguous() && z.is_contiguous() && g.is_contiguous());
  dispatch_gated_dtype(g.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    C10_CUDA_CHECK(gpu::gated_activation_backward<T>(
        static_cast<const T*>(g_h.const_data_ptr()), static_cast<const T*>(z.const_data_ptr()),
        static_cast<T*>(g.data_ptr()), g_h.size(0), g_h.size(1), act, stream_of(g)));
  });
}

GatedDeviceKernels make_gated_cuda_kernels() {
  GatedDeviceKernels k{};
  k.gated_activation = gated_activation_cuda;
  k.gated_activation_backward = gated_activation_backward_cuda;
  k.products = &kCudaKernels;  // an address: safe before kCudaKernels is initialized
  k.reduced_precision = true;
  return k;
}

const GatedDeviceKernels kGatedCudaKernels = make_gated_cuda_kernels();

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CUDA, m) {
  register_gated_device_kernels<kGatedCudaKernels>(m);
}

}  // namespace mlp_ext
