// One device's kernels of the three core ops, registered the same way for every
// device: the device-independent orchestration of mlp.cpp over the device's
// DeviceKernels, under a guard that makes the device of the op's tensors current.
#pragma once

#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "mlp.h"

namespace mlp_ext {

// The device to make current for a call on t: none for the CPU (and meta, which
// has no guard); with a CPU tensor among an accelerator's, the argument checks
// raise the device mismatch before anything runs.
inline std::optional<c10::Device> device_to_guard(const Tensor& t) {
  return t.is_cpu() || t.is_meta() ? std::nullopt : std::optional<c10::Device>(t.device());
}

// Inside TORCH_LIBRARY_IMPL(mlp_ext, <device key>, m).
template <const DeviceKernels& kernels>
void register_device_kernels(torch::Library& m) {
  m.impl(
      "fused_mlp_forward",
      [](const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
         const std::optional<Tensor>& b2, c10::string_view activation, double weight_decay,
         double dropout) {
        const c10::OptionalDeviceGuard guard(device_to_guard(x));
        return fused_mlp_forward(kernels, x, w1, w2, b1, b2, activation, weight_decay, dropout);
      });
  m.impl(
      "fused_mlp_inference",
      [](const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
         const std::optional<Tensor>& b2, c10::string_view activation, double weight_decay,
         double dropout) {
        const c10::OptionalDeviceGuard guard(device_to_guard(x));
        return fused_mlp_inference(kernels, x, w1, w2, b1, b2, activation, weight_decay, dropout);
      });
  m.impl(
      "fused_mlp_backward",
      [](const Tensor& grad_o, const std::optional<Tensor>& grad_s, const Tensor& x,
         const Tensor& w1, const Tensor& w2, const Tensor& z, const std::optional<Tensor>& h,
         c10::string_view activation, double weight_decay, std::array<bool, 5> output_mask,
         const std::optional<Tensor>& dropout_mask, double dropout) {
        const c10::OptionalDeviceGuard guard(device_to_guard(z));
        return fused_mlp_backward(
            kernels, grad_o, grad_s, x, w1, w2, z, h, activation, weight_decay, output_mask,
            dropout_mask, dropout);
      });
}

}  // namespace mlp_ext
