// One device's kernels of the gated ops (gated_mlp_forward / _inference /
// _backward), registered the same way for every device, as
// device_registration.h registers the fused_mlp ops.
#pragma once

#include "device_registration.h"
#include "gated.h"

namespace mlp_ext {

// Inside TORCH_LIBRARY_IMPL(mlp_ext, <device key>, m).
template <const GatedDeviceKernels& kernels>
void register_gated_device_kernels(torch::Library& m) {
  m.impl(
      "gated_mlp_forward",
      [](const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down,
         const std::optional<Tensor>& b_gate, const std::optional<Tensor>& b_up,
         const std::optional<Tensor>& b_down, c10::string_view activation, double weight_decay) {
        const c10::OptionalDeviceGuard guard(device_to_guard(x));
        return gated_mlp_forward(
            kernels, x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, weight_decay);
      });
  m.impl(
      "gated_mlp_inference",
      [](const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down,
         const std::optional<Tensor>& b_gate, const std::optional<Tensor>& b_up,
         const std::optional<Tensor>& b_down, c10::string_view activation, double weight_decay) {
        const c10::OptionalDeviceGuard guard(device_to_guard(x));
        return gated_mlp_inference(
            kernels, x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, weight_decay);
      });
  m.impl(
      "gated_mlp_backward",
      [](const Tensor& grad_o, const std::optional<Tensor>& grad_s, const Tensor& x,
         const Tensor& w_gate, const Tensor& w_up, const Tensor& w_down, const Tensor& z,
         const std::optional<Tensor>& h, c10::string_view activation, double weight_decay,
         std::array<bool, 7> output_mask) {
        const c10::OptionalDeviceGuard guard(device_to_guard(z));
        return gated_mlp_backward(
            kernels, grad_o, grad_s, x, w_gate, w_up, w_down, z, h, activation, weight_decay,
            output_mask);
      });
}

}  // namespace mlp_ext
