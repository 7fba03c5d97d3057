// The CPU kernels for x86 CPUs with AVX-512 (F, BW, VL, DQ) (picked at run time, as ATen picks
// its own AVX512 kernels). See kernels.h.
#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic push
// Lambda-to-pointer thunks in at::vec do not inherit the target (unused here).
#pragma GCC diagnostic ignored "-Wpsabi"
// The pragma does not define the ISA macros that sleef.h reads to declare its
// vector functions: define them around its inclusion only.
#ifndef __AVX512F__
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#include <sleef.h>
#undef __AVX__
#undef __AVX2__
#undef __FMA__
#undef __F16C__
#undef __AVX512F__
#undef __AVX512BW__
#undef __AVX512VL__
#undef __AVX512DQ__
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"

namespace mlp_ext {
const IsaKernels* isa_kernels_avx512() { return &AVX512::kTable; }
}  // namespace mlp_ext
#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
namespace mlp_ext {
const IsaKernels* isa_kernels_avx512() { return nullptr; }
}  // namespace mlp_ext
#endif
