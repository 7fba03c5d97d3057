// Fully fused CUDA kernels for narrow MLPs: the host-side API.
//
// For in/hidden/out widths up to 128 the whole forward (z = x W1^T + b1,
// h = phi(z), o = h W2^T + b2) runs as one kernel over batch tiles, with W1 and W2
// staged in shared memory and each tile's z and h kept on chip; the backward is one
// kernel (G_H = G_O W2, G_Z = G_H * phi'(Z), dX = G_Z W1 on chip, and per-block
// partial weight/bias gradients) plus one fixed-order reduction kernel. The matrix
// products run on tensor cores (wmma): float16 and bfloat16 with float32
// accumulation, float32 as TF32 only when the caller says TF32 is allowed.
//
// The CUDA op (mlp_cuda.cpp) calls these kernels where choose_narrow_path
// (narrow_path.h) says so, which depends on MLP_EXT_NARROW (off by default).
//
// This header is torch-free (plain C++ plus the CUDA runtime API). Everything here
// works on the current CUDA device; every pointer is a device pointer to a
// contiguous row-major array of the element type named by `dtype`.
//
// Coverage (narrow_mlp_supported): d, h, q each a multiple of 16 in [16, 128]
// (every combination of those), dtype float16 or bfloat16, or float32 with
// allow_tf32, on a device of compute capability >= 8.0 with enough opt-in shared
// memory (an H100/H200 covers all of it; an A100 all of it in float16 / bfloat16,
// and float32 up to width 96). Any batch size n >= 0 works: the
// last tile is masked, no padding is asked of the caller.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../activation.h"
#include "narrow_path.h"

namespace mlp_ext {

// Whether the fused kernels cover these widths and this dtype on the current device.
// Cheap (a few cached device-attribute reads, no synchronization). float32 is
// covered only as TF32 (allow_tf32 = torch's matmul precision allows TF32).
bool narrow_mlp_supported(int64_t d, int64_t h, int64_t q, NarrowDType dtype, bool allow_tf32);

// The current device's opt-in dynamic shared memory per block (bytes) and the
// major version of its compute capability (0 when there is no device): what
// choose_narrow_path needs to know of it. Read once per device.
int narrow_mlp_device_smem_per_block();
int narrow_mlp_device_compute_capability();

struct NarrowForwardArgs {
  int64_t n = 0, d = 0, h = 0, q = 0;  // rows; in, hidden, out features
  NarrowDType dtype = NarrowDType::Float16;
  Activation activation = Activation::Relu;
  bool allow_tf32 = false;              // float32 only: TF32 products allowed
  const void* x = nullptr;              // (n, d)
  const void* w1 = nullptr;             // (h, d)
  const void* w2 = nullptr;             // (q, h)
  const void* b1 = nullptr;             // (h,) or nullptr (no bias)
  const void* b2 = nullptr;             // (q,) or nullptr (no bias)
  void* o = nullptr;                    // (n, q) output
  void* z = nullptr;                    // (n, h) output, or nullptr: not saved
  void* hidden = nullptr;               // (n, h) output H = phi(Z), or nullptr: not saved
};

struct NarrowBackwardArgs {
  int64_t n = 0, d = 0, h = 0, q = 0;
  NarrowDType dtype = NarrowDType::Float16;
  Activation activation = Activation::Relu;
  bool allow_tf32 = false;
  const void* grad_o = nullptr;  // (n, q)
  // g_s = dJ/ds: a 0-dim device tensor of `dtype`, read on the device (no host
  // synchronization), or nullptr when s did not reach the loss. The weight
  // gradients get g_s * weight_decay * W added when grad_s != nullptr and
  // weight_decay != 0 (as the GEMM path's addmm beta does).
  const void* grad_s = nullptr;
  double weight_decay = 0.0;
  const void* x = nullptr;       // (n, d)
  const void* w1 = nullptr;      // (h, d)
  const void* w2 = nullptr;      // (q, h)
  const void* z = nullptr;       // (n, h) saved by the forward (unused if only dW2/db2 with H)
  // (n, h) H saved by the forward, read only for dW2; nullptr: recomputed on chip as
  // phi(z) (bitwise what the forward would have saved), so a forward may save z alone.
  const void* hidden = nullptr;
  // Outputs; nullptr = not needed (skipped, with the work that only it needs).
  void* dx = nullptr;   // (n, d)
  void* dw1 = nullptr;  // (h, d)
  void* dw2 = nullptr;  // (q, h)
  void* db1 = nullptr;  // (h,)
  void* db2 = nullptr;  // (q,)
};

// narrow_mlp_supported for these arguments, plus the pointer alignment the kernels
// need (16 bytes for every (n, *) array and the weights; a view with a storage
// offset can fail this, the GEMM path takes it then).
bool narrow_mlp_can_run(const NarrowForwardArgs& args);
bool narrow_mlp_can_run(const NarrowBackwardArgs& args);

// Launches the forward kernel on `stream`. Returns cudaErrorInvalidValue (and
// launches nothing) when !narrow_mlp_can_run(args), else the launch status.
cudaError_t narrow_mlp_forward(const NarrowForwardArgs& args, cudaStream_t stream);

// Bytes of device workspace narrow_mlp_backward needs (float32 per-block partial
// sums); depends on the shapes and the current device. 0 when nothing is reduced.
size_t narrow_mlp_backward_workspace_size(const NarrowBackwardArgs& args);

// Launches the backward kernel and the reduction kernel on `stream`. `workspace`
// must hold narrow_mlp_backward_workspace_size(args) bytes, 256-byte aligned (any
// fresh allocation of the caching allocator is); it is scratch, not read first.
// Deterministic: no atomics, fixed-order sums (for a given device).
cudaError_t narrow_mlp_backward(
    const NarrowBackwardArgs& args, void* workspace, size_t workspace_bytes,
    cudaStream_t stream);

}  // namespace mlp_ext
