// Raw CUDA kernels of the fused MLP: the two elementwise passes around the
// matrix products and the regularization term.
//
// This header includes only CUDA headers and ../activation.h (no torch), so the
// kernels compile and can be checked without a CUDA build of torch. The
// launchers take raw pointers to contiguous row-major data and a stream, queue
// their kernels on that stream, and return the launch status (cudaSuccess or
// the error of the first failed launch). Element types: float, double, __half,
// __nv_bfloat16; the half types compute and accumulate in float.
//
// Every reduction is deterministic: no atomics, and the order of the additions
// depends only on the shape (not on the GPU, the stream or pointer alignment),
// so results are bitwise the same from run to run and from GPU to GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../activation.h"

namespace mlp_ext::gpu {

// The type in which an element type computes and accumulates.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// z (rows x width) += b1 (if not null, width elements), h = phi(z): one pass
// that reads z and writes z (only with a bias) and h.
template <typename T>
cudaError_t bias_activation(
    T* z, T* h, const T* b1, int64_t rows, int64_t width, Activation act, cudaStream_t stream);

// Elements of acc_t<T> that activation_backward needs as scratch for a db1
// column sum of a rows x width matrix (0: none; pass nullptr then).
template <typename T>
int64_t activation_backward_scratch(int64_t rows, int64_t width);

// g (rows x width) holds G_H on entry and G_Z = G_H * phi'(z) on exit. If db1 is
// not null it receives the column sums of G_Z (the values as stored in g), with
// `scratch` holding activation_backward_scratch(rows, width) elements.
template <typename T>
cudaError_t activation_backward(
    T* g,
    const T* z,
    T* db1,
    acc_t<T>* scratch,
    int64_t rows,
    int64_t width,
    Activation act,
    cudaStream_t stream);

// Doubles of scratch that penalty needs for weights of n1 and n2 elements.
int64_t penalty_scratch(int64_t n1, int64_t n2);

// *s = weight_decay / 2 * (sum w1^2 + sum w2^2), summed in double.
template <typename T>
cudaError_t penalty(
    const T* w1,
    int64_t n1,
    const T* w2,
    int64_t n2,
    double weight_decay,
    T* s,
    double* scratch,
    cudaStream_t stream);

// ---------------------------------------------------------------------------
// Hidden-layer dropout

// One dropout draw's Philox seed and offset: torch's PhiloxCudaState as the host
// unpacked it (only CUDA headers here). Under CUDA graph capture they live on
// the device: seed = *seed_ptr, offset = *offset_ptr + offset_intragraph, read
// by the kernel (as at::cuda::philox::unpack does).
struct PhiloxState {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
};

// What one dropout draw advances the generator's offset by (philox_cuda_state's
// increment, a multiple of 4): every element group reads one Philox block.
constexpr uint64_t kDropoutPhiloxIncrement = 4;

// Draws the dropout mask of `size` elements and applies it in one pass. Element
// i = 4 g + v is kept (mask[i] = 1) when uniform(word v of philox_words(seed, g,
// offset)) < keep (philox.cuh: the first curand_uniform4 of curand_init(seed,
// g, offset), as torch's dropout draws), and h[i] = h[i] * (kept ? scale : 0).
// The mask depends on seed, offset and i only, not on the launch shape.
template <typename T>
cudaError_t dropout(
    T* h, uint8_t* mask, int64_t size, double keep, double scale, PhiloxState philox,
    cudaStream_t stream);

// g[i] = g[i] * (mask[i] ? scale : 0): the backward's G_H, a recomputed h.
template <typename T>
cudaError_t apply_dropout(
    T* g, const uint8_t* mask, int64_t size, double scale, cudaStream_t stream);

}  // namespace mlp_ext::gpu
