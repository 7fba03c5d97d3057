// The CPU elementwise kernels of the gated op, compiled once per instruction
// set: gated_kernels_impl.h is included at the end of kernels_impl.h, so that
// every kernels_*.cpp builds them with its own target and at::vec width, next
// to (and with the Math<Vectorized> of) the fused_mlp kernels. Each variant
// registers itself; gated_isa_kernels() picks the one isa_kernels() would.
//
// Only headers that kernels.h has already included (before the target pragma)
// may be included here.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace mlp_ext {

enum class Activation : int64_t;  // activation.h

// Kernels on raw row-major float or double data (dtype says which); z rows
// hold 2 * width elements, [Z_g | Z_u].
struct GatedIsaKernels {
  // h (rows x width) = phi(Z_g) * Z_u.
  void (*gated_activation)(
      c10::ScalarType dtype, Activation act, const void* z, void* h, int64_t rows, int64_t width);
  // g (rows x 2 width) = [G_H * Z_u * phi'(Z_g) | G_H * phi(Z_g)], g_h (rows x width) = G_H.
  void (*gated_activation_backward)(
      c10::ScalarType dtype, Activation act, const void* g_h, const void* z, void* g,
      int64_t rows, int64_t width);
};

// Called by each variant's static initializer; capability as ATen names it
// ("DEFAULT", "AVX2", "AVX512"). Returns true.
bool register_gated_isa_kernels(const char* capability, const GatedIsaKernels* kernels);

// The variant for the widest instruction set this CPU has (as isa_kernels()).
const GatedIsaKernels& gated_isa_kernels();

}  // namespace mlp_ext
