// The autograd node of gated_mlp and the op's CompositeImplicitAutograd kernel
// that builds it: one op call forward (gated_mlp_forward), one backward
// (gated_mlp_backward). Under create_graph=True the backward differentiates the
// same function recomputed from differentiable ATen ops instead, so that second
// derivatives are exact (as autograd.cpp does for fused_mlp).
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "activation_ops.h"
#include "ops.h"

namespace mlp_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr size_t kInputs = 7;  // x, w_gate, w_up, w_down, b_gate, b_up, b_down
constexpr size_t kBDown = 6;

std::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// o and s of gated_mlp from differentiable ATen ops (what create_graph
// differentiates); s is undefined when weight_decay is 0.
std::tuple<Tensor, Tensor> recompute_gated_forward(
    const std::array<Tensor, kInputs>& in, std::string_view activation, double weight_decay) {
  const auto& [x, w_gate, w_up, w_down, b_gate, b_up, b_down] = in;
  Tensor z_gate = at::matmul(x, w_gate.t()), z_up = at::matmul(x, w_up.t());
  if (b_gate.defined()) {
    z_gate = z_gate + b_gate;
  }
  if (b_up.defined()) {
    z_up = z_up + b_up;
  }
  const Tensor hidden = activation_op(z_gate, parse_activation(activation)) * z_up;
  Tensor o = at::matmul(hidden, w_down.t());
  if (b_down.defined()) {
    o = o + b_down;
  }
  Tensor s;
  if (weight_decay != 0) {
    s = (w_gate.square().sum() + w_up.square().sum() + w_down.square().sum()) *
        (weight_decay / 2);
  }
  return {o, s};
}

// Saved for backward: x, the three weights, b_gate and b_up (if given; read
// only for second derivatives), z = [Z_g | Z_u] and h = phi(Z_g) Z_u (h only
// with save_hidden: without it the backward recomputes h from z, one
// elementwise pass, saving n x hidden elements). Not b_down: no derivative reads it.
class GatedMLPFunction : public torch::autograd::Function<GatedMLPFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const Tensor& w_gate,
      const Tensor& w_up,
      const Tensor& w_down,
      const std::optional<Tensor>& b_gate,
      const std::optional<Tensor>& b_up,
      const std::optional<Tensor>& b_down,
      c10::string_view activation,
      double weight_decay,
      bool save_hidden) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [o, s, z, h] = gated_forward_op().call(
        x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, weight_decay);
    ctx->save_for_backward(
        {x, w_gate, w_up, w_down, b_gate.value_or(Tensor()), b_up.value_or(Tensor()), z,
         save_hidden ? h : Tensor()});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["weight_decay"] = weight_decay;
    ctx->saved_data["has_b_down"] = b_down.has_value();
    ctx->set_materialize_grads(false);
    return {o, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w_gate = saved[1], &w_up = saved[2], &w_down = saved[3];
    const Tensor &b_gate = saved[4], &b_up = saved[5], &z = saved[6], &h = saved[7];
    const std::string& activation = ctx->saved_data["activation"].toStringRef();
    const double weight_decay = ctx->saved_data["weight_decay"].toDouble();
    const bool has_b_down = ctx->saved_data["has_b_down"].toBool();
    const Tensor &grad_o = grads[0], &grad_s = grads[1];
    // needs_input_grad counts the tensors given only: an absent bias shifts the next.
    GatedGradientMask mask{};
    size_t edge = 0;
    const bool present[kInputs] = {true, true, true, true, b_gate.defined(), b_up.defined(),
                                   has_b_down};
    bool any = false;
    for (size_t i = 0; i < kInputs; ++i) {
      mask[i] = present[i] && ctx->needs_input_grad(edge);
      edge += present[i] ? 1 : 0;
      any = any || mask[i];
    }
    variable_list result(10);  // one per forward argument
    if (!any || (!grad_o.defined() && !grad_s.defined())) {
      return result;
    }
    std::array<Tensor, kInputs> grad;
    if (at::GradMode::is_enabled()) {
      // o without b_down (it shifts o only); db_down = the row sums of grad_o.
      const std::array<Tensor, kInputs> inputs{x, w_gate, w_up, w_down, b_gate, b_up, Tensor()};
      const auto [o, s] = recompute_gated_forward(inputs, activation, weight_decay);
      std::vector<Tensor> outputs, output_grads, selected;
      for (const auto& [output, g] : {std::pair{o, grad_o}, std::pair{s, grad_s}}) {
        if (output.defined() && g.defined() && output.requires_grad()) {
          outputs.push_back(output);
          output_grads.push_back(g);
        }
      }
      for (size_t i = 0; i < kBDown; ++i) {
        if (mask[i]) {
          selected.push_back(inputs[i]);
        }
      }
      if (!outputs.empty() && !selected.empty()) {
        const auto grads_selected = torch::autograd::grad(
            outputs, selected, output_grads, /*retain_graph=*/true, /*create_graph=*/true,
            /*allow_unused=*/true);
        for (size_t i = 0, k = 0; i < kBDown; ++i) {
          if (mask[i]) {
            grad[i] = grads_selected[k++];
          }
        }
      }
      if (mask[kBDown] && grad_o.defined()) {
        grad[kBDown] = grad_o.reshape({-1, w_down.size(0)}).sum(0);
      }
    } else if (grad_o.defined()) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(grad[0], grad[1], grad[2], grad[3], grad[4], grad[5], grad[6]) =
          gated_backward_op().call(
              grad_o, optional(grad_s), x, w_gate, w_up, w_down, z, optional(h), activation,
              weight_decay, mask);
    } else if (weight_decay != 0) {
      // Only s reached the loss: its gradient g_s * weight_decay * W.
      const Tensor weights[] = {w_gate, w_up, w_down};
      for (size_t i = 1; i <= 3; ++i) {
        grad[i] = mask[i] ? weights[i - 1] * (grad_s * weight_decay) : Tensor();
      }
    }
    for (size_t i = 0; i < kInputs; ++i) {
      result[i] = grad[i];
    }
    return result;
  }
};

std::tuple<Tensor, Tensor> gated_mlp_autograd(
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const std::optional<Tensor>& b_gate,
    const std::optional<Tensor>& b_up,
    const std::optional<Tensor>& b_down,
    c10::string_view activation,
    double weight_decay,
    bool save_hidden) {
  // Recorded for a derivative: backward (grad mode and an input requiring grad)
  // or forward mode (a tangent, which the node rejects with a clear error).
  const bool grad_mode = at::GradMode::is_enabled();
  bool record = false;
  for (const Tensor* t : {&x, &w_gate, &w_up, &w_down, b_gate ? &*b_gate : nullptr,
                          b_up ? &*b_up : nullptr, b_down ? &*b_down : nullptr}) {
    record = record ||
        (t != nullptr && ((grad_mode && t->requires_grad()) || t->_fw_grad(0).defined()));
  }
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return gated_inference_op().call(
        x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, weight_decay);
  }
  auto outputs = GatedMLPFunction::apply(
      x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, weight_decay, save_hidden);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CompositeImplicitAutograd, m) {
  m.impl("gated_mlp", TORCH_FN(gated_mlp_autograd));
}

}  // namespace mlp_ext
