// The fused MLP operator's device-independent part (mlp.cpp): argument checks,
// and the forward, inference and backward as matrix products and elementwise
// passes over a device's kernel table.
//
// A device supplies the two elementwise passes and the regularization term
// through DeviceKernels (and, optionally, its own matrix products, column sums
// and fully fused kernels), and registers them with register_device_kernels
// (device_registration.h).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "activation.h"

namespace mlp_ext {

using at::Tensor;

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // o, s, z, h, mask
using InferenceResult = std::tuple<Tensor, Tensor>;  // o, s
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // dx, dw1, dw2, db1, db2

// The activation of a schema name; ValueError listing the valid names.
Activation parse_activation(std::string_view name);

// ValueError unless 0 <= dropout <= 1 (NaN included), naming `op`.
void check_dropout(const char* op, double dropout);

// The factor of the kept hidden units: 1 / (1 - dropout), and 0 for dropout = 1
// (every unit dropped; nothing is divided by zero).
inline double dropout_scale(double dropout) {
  return dropout < 1 ? 1.0 / (1.0 - dropout) : 0.0;
}

// TORCH_CHECKs (messages prefixed by `op`) that t has the dtype and the device of
// x; and that the bias b, if given, is of shape (size,) (`what`: its name in the
// op's math) and like x.
void check_like_x(const char* op, const char* name, const Tensor& t, const Tensor& x);
void check_bias(
    const char* op, const char* name, const std::optional<Tensor>& b, int64_t size,
    const char* what, const Tensor& x);

// TORCH_CHECKs every argument of fused_mlp; messages name the argument and
// both the expected and the actual shape / dtype / device.
void check_forward_inputs(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    double weight_decay,
    double dropout,
    bool allow_reduced_precision);

// TORCH_CHECKs the arguments of fused_mlp_backward against each other: z is
// (n, hidden_features), h (if given) like z, x holds n rows of in_features,
// grad_o n rows of out_features; all of z's dtype and device. The dropout mask
// (required when dropout > 0) is a bool tensor of z's shape on z's device.
void check_backward_inputs(
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& z,
    const std::optional<Tensor>& h,
    const std::optional<Tensor>& dropout_mask,
    double dropout);

struct DeviceKernels {
  // z (n x h, contiguous) += b1 (if given); h = phi(z). Both written in one pass.
  // h may be z itself where activation_in_place is set.
  void (*bias_activation)(Tensor& z, Tensor& h, const std::optional<Tensor>& b1, Activation act);
  // g (n x h, contiguous) holds G_H on entry and G_Z = G_H * phi'(z) on exit;
  // db1 (if defined, shape (h,)) receives the column sums of G_Z.
  void (*activation_backward)(Tensor& g, const Tensor& z, Tensor& db1, Activation act);
  // weight_decay / 2 * (||w1||^2 + ||w2||^2) as a 0-dim tensor of w1's dtype.
  Tensor (*penalty)(const Tensor& w1, const Tensor& w2, double weight_decay);
  // Whether float16 / bfloat16 inputs are accepted.
  bool reduced_precision;
  // Optional (null: ATen's addmm / mm). out (m x n, contiguous) =
  // beta * addend + op(a) op(b), op(t) = t^T where trans_t; addend is absent
  // (out = op(a) op(b)), of out's shape, or a row of out's width broadcast
  // over the rows.
  void (*matmul)(
      Tensor& out, const Tensor* addend, const Tensor& a, bool trans_a, const Tensor& b,
      bool trans_b, double beta) = nullptr;
  // Optional (null: ATen's sum). out (width) = column sums of g (rows x width).
  void (*column_sums)(Tensor& out, const Tensor& g) = nullptr;
  // Whether bias_activation accepts h == z (the inference op then allocates
  // one n x h buffer instead of two).
  bool activation_in_place = false;
  // Optional (null: ATen's bernoulli_ and mul_). Hidden-layer dropout at
  // probability p in (0, 1]: mask (n x h, bool, contiguous) is drawn from the
  // default generator of the device (each element kept, true, with probability
  // 1 - p), and h (n x h, contiguous) *= mask * dropout_scale(p).
  void (*dropout)(Tensor& h, Tensor& mask, double p) = nullptr;
  // Optional (null: ATen's mul_). g (contiguous) *= mask * dropout_scale(p), for
  // the backward's G_H and a recomputed h.
  void (*apply_dropout)(Tensor& g, const Tensor& mask, double p) = nullptr;
  // Optional: the whole forward / backward in kernels of the device's own, for
  // the problems it takes that way; nullopt hands the call to the products and
  // passes above. Called after the argument checks. Without keep_z (inference)
  // the forward returns undefined z and h.
  std::optional<ForwardResult> (*fully_fused_forward)(
      const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
      const std::optional<Tensor>& b2, Activation act, double weight_decay, double dropout,
      bool keep_z) = nullptr;
  std::optional<BackwardResult> (*fully_fused_backward)(
      const Tensor& grad_o, const std::optional<Tensor>& grad_s, const Tensor& x,
      const Tensor& w1, const Tensor& w2, const Tensor& z, const std::optional<Tensor>& h,
      const std::optional<Tensor>& dropout_mask, Activation act, double weight_decay,
      std::array<bool, 5> output_mask) = nullptr;
};

// Each device's kernels of the fused op (csrc/cpu/mlp_cpu.cpp,
// csrc/cuda/mlp_cuda.cpp; the CUDA one exists only in CUDA builds). The gated
// op's products and penalty are these, not copies.
extern const DeviceKernels kCpuKernels;
extern const DeviceKernels kCudaKernels;

// keep_z = false (the inference op): z need not survive, so on a device whose
// bias_activation works in place h is written over z and returned as z too.
// With dropout > 0 the returned h is phi(z) * mask / (1 - dropout) (what the
// second product and dW2 read) and mask the n x h bool mask drawn from the
// device's generator; with dropout = 0 nothing is drawn and mask has 0 elements
// (undefined without keep_z).
ForwardResult fused_mlp_forward(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay,
    double dropout,
    bool keep_z = true);

// The forward without z and h to return (fused_mlp without autograd).
InferenceResult fused_mlp_inference(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay,
    double dropout);

BackwardResult fused_mlp_backward(
    const DeviceKernels& kernels,
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& z,
    const std::optional<Tensor>& h,  // absent (save_hidden=False): recomputed as phi(z)
    std::string_view activation,
    double weight_decay,
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& dropout_mask,  // the forward's mask; absent: no dropout
    double dropout);

// Shared with the gated op (gated.cpp), defined in mlp.cpp.
// out = beta * addend + op(a) op(b) by kernels.matmul (ATen's addmm / mm without one).
void matmul(
    const DeviceKernels& kernels, Tensor& out, const Tensor* addend, const Tensor& a,
    bool trans_a, const Tensor& b, bool trans_b, double beta = 1.0);
// out (width) = column sums of g (rows x width), by kernels.column_sums or ATen's sum.
void column_sums(const DeviceKernels& kernels, Tensor& out, const Tensor& g);
// dw = g^T a + g_s * weight_decay * w (grad_s absent: g_s = 0).
void weight_gradient(
    const DeviceKernels& kernels, Tensor& dw, const Tensor& g, const Tensor& a, const Tensor& w,
    const std::optional<Tensor>& grad_s, double weight_decay);
// at::empty, without the dispatcher on the CPU.
Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// A 0-dim zero (s without weight decay), without a dispatched zero_() on the CPU.
Tensor zero_scalar(const at::TensorOptions& options);
// o (n x out_features) viewed with x's leading dimensions, as nn.Linear returns it.
Tensor with_leading_dims(const Tensor& o, const Tensor& x);

}  // namespace mlp_ext
