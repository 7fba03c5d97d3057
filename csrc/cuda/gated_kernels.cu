// Raw CUDA kernels of the gated op (see gated_kernels.cuh): one thread per
// hidden unit of a row (grid-stride), reading Z_g and Z_u at the same column of
// the row's two halves; phi and phi' are activation.h's, in acc_t<T>.
#include "gated_kernels.cuh"

#include "convert.cuh"

#include <algorithm>

namespace mlp_ext::gpu {

namespace {

constexpr int kGatedThreads = 256;
constexpr int64_t kMaxGatedBlocks = 132 * 16;  // ~16 blocks per SM of an H100/H200

int64_t gated_blocks(int64_t elements) {
  return std::clamp<int64_t>((elements + kGatedThreads - 1) / kGatedThreads, 1, kMaxGatedBlocks);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kGatedThreads) gated_activation_kernel(
    const T* __restrict__ z, T* __restrict__ h, int64_t rows, int64_t width) {
  using C = Convert<T>;
  const int64_t total = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / width, column = i - row * width;
    const T* z_row = z + row * 2 * width;
    const acc_t<T> z_gate = C::to_acc(z_row[column]), z_up = C::to_acc(z_row[width + column]);
    h[i] = C::from_acc(A::forward(z_gate) * z_up);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kGatedThreads) gated_activation_backward_kernel(
    const T* __restrict__ g_h, const T* __restrict__ z, T* __restrict__ g, int64_t rows,
    int64_t width) {
  using C = Convert<T>;
  const int64_t total = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / width, column = i - row * width;
    const int64_t gate_index = row * 2 * width + column, up_index = gate_index + width;
    const acc_t<T> grad_h = C::to_acc(g_h[i]);
    const acc_t<T> z_gate = C::to_acc(z[gate_index]), z_up = C::to_acc(z[up_index]);
    g[gate_index] = C::from_acc(grad_h * z_up * A::derivative(z_gate));
    g[up_index] = C::from_acc(grad_h * A::forward(z_gate));
  }
}

}  // namespace

template <typename T>
cudaError_t gated_activation(
    const T* z, T* h, int64_t rows, int64_t width, Activation act, cudaStream_t stream) {
  if (rows == 0 || width == 0) {
    return cudaSuccess;
  }
  const auto blocks = static_cast<unsigned>(gated_blocks(rows * width));
  visit_activation(act, [&](auto a) {
    gated_activation_kernel<T, decltype(a)><<<blocks, kGatedThreads, 0, stream>>>(
        z, h, rows, width);
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t gated_activation_backward(
    const T* g_h, const T* z, T* g, int64_t rows, int64_t width, Activation act,
    cudaStream_t stream) {
  if (rows == 0 || width == 0) {
    return cudaSuccess;
  }
  const auto blocks = static_cast<unsigned>(gated_blocks(rows * width));
  visit_activation(act, [&](auto a) {
    gated_activation_backward_kernel<T, decltype(a)><<<blocks, kGatedThreads, 0, stream>>>(
        g_h, z, g, rows, width);
  });
  return cudaGetLastError();
}

#define MLP_EXT_INSTANTIATE_GATED(T)                                                     \
  template cudaError_t gated_activation<T>(                                              \
      const T*, T*, int64_t, int64_t, Activation, cudaStream_t);                         \
  template cudaError_t gated_activation_backward<T>(                                     \
      const T*, const T*, T*, int64_t, int64_t, Activation, cudaStream_t);
MLP_EXT_INSTANTIATE_GATED(float)
MLP_EXT_INSTANTIATE_GATED(double)
MLP_EXT_INSTANTIATE_GATED(__half)
MLP_EXT_INSTANTIATE_GATED(__nv_bfloat16)
#undef MLP_EXT_INSTANTIATE_GATED

}  // namespace mlp_ext::gpu
