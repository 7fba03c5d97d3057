// Raw CUDA kernels of the gated op (SwiGLU / GeGLU / ...): the two elementwise
// passes around its matrix products, with the phi / phi' of ../activation.h.
// As mlp_kernels.cuh: CUDA headers only, raw pointers to contiguous row-major
// data, queued on the given stream, the launch status returned. Element types
// float, double, __half, __nv_bfloat16 (the half types compute in float). No
// reductions (the bias gradients are column sums done by the caller), so every
// result is the same bit for bit from run to run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../activation.h"

namespace mlp_ext::gpu {

// z (rows x 2 width) = [Z_g | Z_u]; h (rows x width) = phi(Z_g) * Z_u.
template <typename T>
cudaError_t gated_activation(
    const T* z, T* h, int64_t rows, int64_t width, Activation act, cudaStream_t stream);

// g_h (rows x width) = G_H; g (rows x 2 width) = [G_H Z_u phi'(Z_g) | G_H phi(Z_g)].
template <typename T>
cudaError_t gated_activation_backward(
    const T* g_h, const T* z, T* g, int64_t rows, int64_t width, Activation act,
    cudaStream_t stream);

}  // namespace mlp_ext::gpu
