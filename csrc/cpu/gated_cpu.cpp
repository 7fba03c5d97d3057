// The gated op on the CPU: its GatedDeviceKernels (the elementwise kernels of
// gated_kernels_impl.h for the widest instruction set the CPU has; the products
// and s those of the fused op, kCpuKernels) and their registration for the CPU
// dispatch key.
#include <ATen/Context.h>

#include <string>

#include "cpu/gated_kernels.h"
#include "gated_registration.h"

namespace mlp_ext {

namespace {

struct GatedRegistry {
  const GatedIsaKernels* default_kernels = nullptr;
  const GatedIsaKernels* avx2 = nullptr;
  const GatedIsaKernels* avx512 = nullptr;
};

GatedRegistry& gated_registry() {
  static GatedRegistry registry;
  return registry;
}

}  // namespace

bool register_gated_isa_kernels(const char* capability, const GatedIsaKernels* kernels) {
  auto& r = gated_registry();
  const std::string name = capability;
  (name == "AVX512" ? r.avx512 : name == "AVX2" ? r.avx2 : r.default_kernels) = kernels;
  return true;
}

const GatedIsaKernels& gated_isa_kernels() {
  // As isa_kernels(): ATen's choice, narrowed to what was built.
  static const GatedIsaKernels* table = [] {
    const std::string capability = at::get_cpu_capability();
    const auto& r = gated_registry();
    const GatedIsaKernels* chosen = nullptr;
    if (capability == "AVX512") {
      chosen = r.avx512;
    }
    if (chosen == nullptr && (capability == "AVX512" || capability == "AVX2")) {
      chosen = r.avx2;
    }
    return chosen != nullptr ? chosen : r.default_kernels;
  }();
  TORCH_INTERNAL_ASSERT(table != nullptr, "gated_mlp: no CPU kernels were registered");
  return *table;
}

namespace {

void gated_activation_cpu(const Tensor& z, Tensor& h, Activation act) {
  TORCH_INTERNAL_ASSERT(z.is_contiguous() && h.is_contiguous() && z.size(1) == 2 * h.size(1));
  gated_isa_kernels().gated_activation(
      z.scalar_type(), act, z.const_data_ptr(), h.data_ptr(), h.size(0), h.size(1));
}

void gated_activation_backward_cpu(const Tensor& g_h, const Tensor& z, Tensor& g, Activation act) {
  TORCH_INTERNAL_ASSERT(g_h.is_contiguous() && z.is_contiguous() && g.is_contiguous());
  gated_isa_kernels().gated_activation_backward(
      g.scalar_type(), act, g_h.const_data_ptr(), z.const_data_ptr(), g.data_ptr(), g_h.size(0),
      g_h.size(1));
}

GatedDeviceKernels make_gated_cpu_kernels() {
  GatedDeviceKernels k{};
  k.gated_activation = gated_activation_cpu;
  k.gated_activation_backward = gated_activation_backward_cpu;
  k.products = &kCpuKernels;  // an address: safe before kCpuKernels is initialized
  k.reduced_precision = true;  // the kernels compute the half types in float32
  return k;
}

const GatedDeviceKernels kGatedCpuKernels = make_gated_cpu_kernels();

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CPU, m) {
  register_gated_device_kernels<kGatedCpuKernels>(m);
}

}  // namespace mlp_ext
