// The CPU operator's matrix products (gemm.cpp), for DeviceKernels::matmul.
#pragma once

#include <ATen/ATen.h>

namespace mlp_ext {

// out (m x n, contiguous) = beta * addend + op(a) op(b), op(t) = t^T where trans_t;
// addend is null (out = op(a) op(b)), of out's shape, or a row of out's width
// broadcast over the rows. float32, float64, bfloat16 and float16 (the half
// types accumulated in float32, rounded once).
void cpu_matmul(
    at::Tensor& out, const at::Tensor* addend, const at::Tensor& a, bool trans_a,
    const at::Tensor& b, bool trans_b, double beta);

}  // namespace mlp_ext
