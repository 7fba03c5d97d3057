// The CPU kernels for any CPU (at::vec's portable Vectorized; NEON on ARM), and
// the run-time pick of the widest variant the CPU can run.
#include <ATen/Version.h>

#include <string>

#include "kernels.h"

#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

namespace mlp_ext {

const IsaKernels* isa_kernels_default() { return &DEFAULT::kTable; }

const IsaKernels& isa_kernels() {
  // ATen's own choice (it honours ATEN_CPU_CAPABILITY), narrowed to what we built.
  static const IsaKernels* table = [] {
    const std::string capability = at::get_cpu_capability();
    const IsaKernels* chosen = nullptr;
    if (capability == "AVX512") {
      chosen = isa_kernels_avx512();
    }
    if (chosen == nullptr && (capability == "AVX512" || capability == "AVX2")) {
      chosen = isa_kernels_avx2();
    }
    return chosen != nullptr ? chosen : isa_kernels_default();
  }();
  return *table;
}

}  // namespace mlp_ext
