// The CPU kernels for any CPU (at::vec's portable Vectorized; NEON on ARM).
#include "mlp_cpu_kernels.h"

#define CPU_CAPABILITY DEFAULT
#include "mlp_cpu_kernels_impl.h"

namespace mlp_ext {
const CpuKernelTable* cpu_kernels_default() { return &DEFAULT::kTable; }
}  // namespace mlp_ext
