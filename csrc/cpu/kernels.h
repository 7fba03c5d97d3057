// The CPU kernels of the fused MLP (elementwise passes, column sums, the
// short-side matrix products), compiled once per instruction set
// (kernels_*.cpp) and picked at run time by isa_kernels().
//
// at::vec::Vectorized is only as wide as the CPU_CAPABILITY it is compiled
// for: without one it is a plain array, and exp / erf / tanh run one scalar at
// a time. ATen builds its own kernels once per capability; so do we, with
// `#pragma GCC target` in the files that include kernels_impl.h.
//
// This header is included by those files *before* the pragma: every header
// it includes keeps the default target, so the inline functions of torch that
// several files share are compiled one way only. Only at::vec (which lives in
// a namespace named after the capability) and our kernels are compiled for the
// wider instruction set.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace mlp_ext {

enum class Activation : int64_t;  // activation.h

// Kernels on raw row-major float32, float64, bfloat16 or float16 data (dtype
// says which; the half types computed and summed in float32). short_gemm takes
// float32 and float64 only.
struct IsaKernels {
  // z (rows x width) += b1 (if not null); h = phi(z).
  void (*bias_activation)(
      c10::ScalarType dtype, Activation act, void* z, void* h, const void* b1, int64_t rows,
      int64_t width);
  // g (rows x width) *= phi'(z); colsum (if not null, width) = column sums of the new g.
  void (*activation_backward)(
      c10::ScalarType dtype, Activation act, void* g, const void* z, void* colsum, int64_t rows,
      int64_t width);
  // out (width) = column sums of g (rows x width).
  void (*column_sums)(c10::ScalarType dtype, const void* g, void* out, int64_t rows, int64_t width);
  // Sum of the squares of size elements, accumulated in double across chunks.
  double (*sum_of_squares)(c10::ScalarType dtype, const void* data, int64_t size);
  // dst (size) = scale * src, on the calling thread (callers split the rows).
  void (*scaled_copy)(c10::ScalarType dtype, const void* src, void* dst, double scale, int64_t size);
  // out (m x n, rows ld_out apart) = beta * addend + op(a) op(b); a and b
  // row-major with rows ld_a / ld_b apart, op(a) = a^T where trans_a (m x k
  // either way), likewise b, not both transposed; the addend (if not null) has
  // rows ld_addend apart (0: one row for all). Split over the threads where
  // parallel. For products with a short side (gemm_impl.h); null where
  // the instruction set has no wide vectors.
  void (*short_gemm)(
      c10::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
      const void* a, int64_t ld_a, const void* b, int64_t ld_b, void* out, int64_t ld_out,
      const void* addend, int64_t ld_addend, double beta, bool parallel);
  // dst (size float32) = src (size of dtype, float16 or bfloat16) widened; and
  // back, rounded to nearest even. Split over the threads where large.
  void (*widen)(c10::ScalarType dtype, const void* src, float* dst, int64_t size);
  void (*narrow)(c10::ScalarType dtype, const float* src, void* dst, int64_t size);
};

// The variant for the widest instruction set this CPU has (kernels_default.cpp).
const IsaKernels& isa_kernels();

// Null where the compiler or the architecture cannot build that variant.
const IsaKernels* isa_kernels_default();
const IsaKernels* isa_kernels_avx2();
const IsaKernels* isa_kernels_avx512();

}  // namespace mlp_ext
