// Element type <-> compute type of the raw CUDA kernels (mlp_kernels.cu,
// gated_kernels.cu): acc_t<T> (mlp_kernels.cuh) is float for the half types.
// Only CUDA headers; included by .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mlp_kernels.cuh"

namespace mlp_ext::gpu {

// Element type <-> compute/accumulate type. The half types convert with the
// intrinsics because torch's flags (-D__CUDA_NO_HALF_CONVERSIONS__ ...) remove
// their implicit conversions.
template <typename T>
struct Convert {
  __device__ static acc_t<T> to_acc(T x) { return x; }
  __device__ static T from_acc(acc_t<T> x) { return x; }
  __device__ static T from_double(double x) { return static_cast<T>(x); }
};
template <>
struct Convert<__half> {
  __device__ static float to_acc(__half x) { return __half2float(x); }
  __device__ static __half from_acc(float x) { return __float2half_rn(x); }
  __device__ static __half from_double(double x) { return __double2half(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_acc(float x) { return __float2bfloat16_rn(x); }
  __device__ static __nv_bfloat16 from_double(double x) { return __double2bfloat16(x); }
};

}  // namespace mlp_ext::gpu
