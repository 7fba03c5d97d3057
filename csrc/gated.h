// The gated feed-forward block (SwiGLU, GeGLU, ReGLU, GLU), device-independent
// part (gated.cpp): argument checks, and the forward, inference and backward as
// matrix products and elementwise passes over a device's GatedDeviceKernels.
//
//     Z_g = X W_g^T + b_g,  Z_u = X W_u^T + b_u,  H = phi(Z_g) (.) Z_u
//     O   = H W_2^T + b_2,  s = lambda/2 (||W_g||^2 + ||W_u||^2 + ||W_2||^2)
//
// Layout: the gate and up products are one product over the stacked weights
// W = [W_g; W_u] (2h x d, a cat per call), written into one n x 2h buffer
// z = [Z_g | Z_u]; see docs/gated.md for the measurement behind that choice.
// The forward saves z (phi'(Z_g), Z_u and phi(Z_g) are read from it) and h
// (what dW_2 reads; save_hidden=False recomputes it from z).
#pragma once

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "mlp.h"

namespace mlp_ext {

using GatedForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;  // o, s, z, h
// dx, dw_gate, dw_up, dw_down, db_gate, db_up, db_down
using GatedBackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using GatedGradientMask = std::array<bool, 7>;  // of x, w_gate, w_up, w_down, b_gate, b_up, b_down

struct GatedDeviceKernels {
  // z (n x 2h, contiguous) = [Z_g | Z_u]; h (n x h, contiguous) = phi(Z_g) * Z_u.
  void (*gated_activation)(const Tensor& z, Tensor& h, Activation act);
  // g_h (n x h, contiguous) = G_H; g (n x 2h, contiguous) receives
  // [G_H * Z_u * phi'(Z_g) | G_H * phi(Z_g)] = [G_Zg | G_Zu].
  void (*gated_activation_backward)(const Tensor& g_h, const Tensor& z, Tensor& g, Activation act);
  // The matrix products, column sums and the regularization term: the fused
  // op's kernels of the device (kCpuKernels, kCudaKernels), of which only
  // matmul, column_sums (both optional, see DeviceKernels) and penalty are read.
  const DeviceKernels* products;
  // Whether float16 / bfloat16 inputs are accepted (the elementwise kernels'
  // dtypes, not those of `products`).
  bool reduced_precision;
};

// TORCH_CHECKs every argument of gated_mlp; messages name the argument and both
// the expected and the actual shape / dtype / device.
void check_gated_forward_inputs(
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const std::optional<Tensor>& b_gate,
    const std::optional<Tensor>& b_up,
    const std::optional<Tensor>& b_down,
    double weight_decay,
    bool allow_reduced_precision);

GatedForwardResult gated_mlp_forward(
    const GatedDeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const std::optional<Tensor>& b_gate,
    const std::optional<Tensor>& b_up,
    const std::optional<Tensor>& b_down,
    std::string_view activation,
    double weight_decay);

// o, s
InferenceResult gated_mlp_inference(
    const GatedDeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const std::optional<Tensor>& b_gate,
    const std::optional<Tensor>& b_up,
    const std::optional<Tensor>& b_down,
    std::string_view activation,
    double weight_decay);

GatedBackwardResult gated_mlp_backward(
    const GatedDeviceKernels& kernels,
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const Tensor& z,
    const std::optional<Tensor>& h,  // absent (save_hidden=False): recomputed from z
    std::string_view activation,
    double weight_decay,
    GatedGradientMask output_mask);

}  // namespace mlp_ext
