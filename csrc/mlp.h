// The fused MLP operator: what the device-independent part (mlp.cpp) and the
// device kernels (mlp_cpu.cpp, cuda/) share.
//
// A device supplies the two fused elementwise passes and the regularization
// term through DeviceKernels (and, optionally, its own matrix products and
// column sums; ATen's otherwise), and registers its ops with
// fused_mlp_forward / fused_mlp_backward.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "activation.h"

namespace mlp_ext {

using at::Tensor;

// Parses the schema's activation name; ValueError listing the valid names.
Activation parse_activation(std::string_view name);

// TORCH_CHECKs every argument of fused_mlp; messages name the argument and
// both the expected and the actual shape / dtype / device.
void check_forward_inputs(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    double weight_decay,
    bool allow_reduced_precision);

struct DeviceKernels {
  // z (n x h, contiguous) += b1 (if given); h = phi(z). Both written in one pass.
  // On CPU h may be z itself (in place; the inference op uses that).
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
};

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;  // o, s, z, h
using InferenceResult = std::tuple<Tensor, Tensor>;  // o, s
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // dx, dw1, dw2, db1, db2

ForwardResult fused_mlp_forward(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay);

// The forward without z and h to return: on CPU h = phi(z) overwrites z, so
// the pass writes n x h elements fewer and one buffer of them is never
// allocated (on CUDA, whose kernel does not alias them, it is the forward).
InferenceResult fused_mlp_inference(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay);

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
    std::array<bool, 5> output_mask);

}  // namespace mlp_ext
