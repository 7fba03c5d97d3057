// The autograd nodes of fused_mlp and fused_mlp_loss, and the two ops'
// CompositeImplicitAutograd kernels that build them.
//
// The nodes are C++ (a plain torch::autograd::Node for fused_mlp, a
// torch::autograd::Function for fused_mlp_loss), so a training step runs no
// Python between the op call and the gradients. Each one's forward is one op
// call (fused_mlp_forward, fused_mlp_loss_forward) and its backward one op call
// (fused_mlp_backward, fused_mlp_loss_backward). Under create_graph=True the
// backward instead differentiates the same function recomputed from
// differentiable ATen ops, so second derivatives are exact; both nodes share
// that path and the mask of the gradients their inputs need.
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "activation_ops.h"
#include "loss.h"
#include "ops.h"

namespace mlp_ext {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

constexpr size_t kX = 0, kW1 = 1, kW2 = 2, kB1 = 3, kB2 = 4;  // positions in a gradient mask
using GradientMask = std::array<bool, 5>;                       // of x, w1, w2, b1, b2

std::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// Which of x, w1, w2, b1, b2 need a gradient. needs_input_grad counts only the
// tensors given, in the forward's argument order: x at x_edge, w1 and w2 from
// w1_edge on, then b1 and b2 where present (an absent b1 shifts b2).
GradientMask gradient_mask(
    AutogradContext* ctx, size_t x_edge, size_t w1_edge, bool has_b1, bool has_b2) {
  const size_t b1_edge = w1_edge + 2, b2_edge = b1_edge + (has_b1 ? 1 : 0);
  return {
      ctx->needs_input_grad(x_edge), ctx->needs_input_grad(w1_edge),
      ctx->needs_input_grad(w1_edge + 1), has_b1 && ctx->needs_input_grad(b1_edge),
      has_b2 && ctx->needs_input_grad(b2_edge)};
}

bool any(const GradientMask& mask) {
  return mask[kX] || mask[kW1] || mask[kW2] || mask[kB1] || mask[kB2];
}

// Whether an input (null: an absent bias) has a forward-mode tangent, which the
// nodes reject with a clear error.
template <size_t N>
bool forward_gradient(const Tensor* const (&inputs)[N]) {
  for (const Tensor* t : inputs) {
    if (t != nullptr && t->_fw_grad(/*level=*/0).defined()) {
      return true;
    }
  }
  return false;
}

// Whether the call must be recorded for backward: grad mode on and an input
// (null: an absent bias) requiring grad.
template <size_t N>
bool requires_grad(const Tensor* const (&inputs)[N]) {
  if (!at::GradMode::is_enabled()) {
    return false;
  }
  for (const Tensor* t : inputs) {
    if (t != nullptr && t->requires_grad()) {
      return true;
    }
  }
  return false;
}

// The dropout factor D = mask / (1 - p) (0 where dropped; 0 everywhere for p = 1)
// in dtype, a constant of the recomputed forward; undefined without a mask.
Tensor dropout_factor(const Tensor& mask, double dropout, at::ScalarType dtype) {
  return mask.defined() ? mask.to(dtype).mul_(dropout_scale(dropout)) : Tensor();
}

// o and s of fused_mlp from differentiable ATen ops (what create_graph
// differentiates), with the forward's dropout factor D (if defined) applied to
// h as a constant: the mask is fixed, only phi(z) is differentiated. s is
// undefined when weight_decay is 0: nothing depends on it.
std::tuple<Tensor, Tensor> recompute_forward(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& b1,
    const Tensor& b2,
    std::string_view activation,
    double weight_decay,
    const Tensor& dropout_d) {
  Tensor z = at::matmul(x, w1.t());
  if (b1.defined()) {
    z = z + b1;
  }
  Tensor hidden = activation_op(z, parse_activation(activation));
  if (dropout_d.defined()) {
    hidden = hidden * dropout_d.view(z.sizes());
  }
  Tensor o = at::matmul(hidden, w2.t());
  if (b2.defined()) {
    o = o + b2;
  }
  Tensor s;
  if (weight_decay != 0) {
    s = (w1.square().sum() + w2.square().sum()) * (weight_decay / 2);
  }
  return {o, s};
}

// The gradients of sum_i <output_grads[i], outputs[i]> with respect to those of
// x, w1, w2, b1, b2 that `mask` selects, recorded for differentiation. Outputs
// whose gradient is undefined (did not reach the loss), or that depend on no
// input requiring grad (s when only x does), are left out.
BackwardResult differentiable_gradients(
    const std::vector<std::pair<Tensor, Tensor>>& outputs_and_grads,
    const std::array<Tensor, 5>& inputs,
    const GradientMask& mask) {
  std::vector<Tensor> outputs, output_grads, selected;
  for (const auto& [output, grad] : outputs_and_grads) {
    if (output.defined() && grad.defined() && output.requires_grad()) {
      outputs.push_back(output);
      output_grads.push_back(grad);
    }
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (mask[i]) {
      selected.push_back(inputs[i]);
    }
  }
  std::array<Tensor, 5> result;
  if (outputs.empty() || selected.empty()) {
    return {};
  }
  const auto grads = torch::autograd::grad(
      outputs, selected, output_grads, /*retain_graph=*/true, /*create_graph=*/true,
      /*allow_unused=*/true);
  for (size_t i = 0, k = 0; i < inputs.size(); ++i) {
    if (mask[i]) {
      result[i] = grads[k++];
    }
  }
  return {result[kX], result[kW1], result[kW2], result[kB1], result[kB2]};
}

// torch::autograd::Node is held by std::shared_ptr in older torch and by
// c10::intrusive_ptr in newer ones: make a node the way Edge holds it.
template <typename NodeType>
auto make_node() {
  if constexpr (std::is_same_v<
                    decltype(torch::autograd::Edge::function),
                    std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<NodeType>(new NodeType());
  } else {
    return c10::make_intrusive<NodeType>();
  }
}

// The autograd node of fused_mlp: a plain torch::autograd::Node, not a
// torch::autograd::Function. Function's generality (a variable list of the
// inputs, per-input and per-output metadata, the saved_data IValue dictionary,
// the output wrapping for views, dirty and non-differentiable tensors, a
// vector of saved variables) cost 13-18K instructions a training step more than
// this node, which holds plain members instead (benchmarks/instructions.py:
// node and engine 88K -> 75K at 1x16^3, 88K -> 70K at 64^4).
//
// Saved for backward: x, w1, w2, b1 (if given; read only for second
// derivatives), and the intermediates z and h of the forward (z only when
// save_hidden is false: the backward then recomputes h = phi(z)), and with
// dropout > 0 the bool mask (one byte per hidden unit; h is saved with the mask
// already applied, which is what dW2 reads). Not b2: no derivative reads it.
// Its next edges are those of x, w1, w2, b1, b2 in that order (an absent bias:
// an invalid edge), so that output i of the node is the gradient of input i.
class FusedMLPBackward : public torch::autograd::Node {
 public:
  std::string name() const override {
    return "FusedMLPBackward";
  }

  void release_variables() override {
    for (SavedVariable* v : {&x_, &w1_, &w2_, &b1_, &z_, &h_, &dropout_mask_}) {
      v->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    // As CppNode::apply: a node may be run from several threads at once.
    std::lock_guard<std::mutex> lock(mutex_);
    const GradientMask mask = {
        should_compute_output(kX), should_compute_output(kW1), should_compute_output(kW2),
        should_compute_output(kB1), should_compute_output(kB2)};
    const Tensor &grad_o = grads[0], &grad_s = grads[1];
    variable_list result(kB2 + 1);
    if (!any(mask) || (!grad_o.defined() && !grad_s.defined())) {
      return result;
    }
    const Tensor x = x_.unpack(), w1 = w1_.unpack(), w2 = w2_.unpack(), b1 = b1_.unpack();
    const Tensor z = z_.unpack(), h = h_.unpack(), dropout_mask = dropout_mask_.unpack();
    const std::string_view activation = activation_name(activation_);
    Tensor dx, dw1, dw2, db1, db2;
    if (at::GradMode::is_enabled()) {
      // o without b2 (it shifts o only); db2 = the row sums of grad_o.
      const auto [o, s] = recompute_forward(
          x, w1, w2, b1, Tensor(), activation, weight_decay_,
          dropout_factor(dropout_mask, dropout_, x.scalar_type()));
      GradientMask without_b2 = mask;
      without_b2[kB2] = false;
      std::tie(dx, dw1, dw2, db1, std::ignore) = differentiable_gradients(
          {{o, grad_o}, {s, grad_s}}, {x, w1, w2, b1, Tensor()}, without_b2);
      if (mask[kB2] && grad_o.defined()) {
        db2 = grad_o.reshape({-1, w2.size(0)}).sum(0);
      }
    } else if (grad_o.defined()) {
      // fused_mlp_backward has no autograd kernel of its own: go straight to
      // the device kernel instead of through the (boxed) autograd fallback.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dw1, dw2, db1, db2) = backward_op().call(
          grad_o, optional(grad_s), x, w1, w2, z, optional(h), activation, weight_decay_, mask,
          optional(dropout_mask), dropout_);
    } else if (weight_decay_ != 0) {
      // Only s reached the loss: its gradient g_s * weight_decay * W.
      dw1 = mask[kW1] ? w1 * (grad_s * weight_decay_) : Tensor();
      dw2 = mask[kW2] ? w2 * (grad_s * weight_decay_) : Tensor();
    }
    result[kX] = std::move(dx), result[kW1] = std::move(dw1), result[kW2] = std::move(dw2);
    result[kB1] = std::move(db1), result[kB2] = std::move(db2);
    return result;
  }

  SavedVariable x_, w1_, w2_, b1_, z_, h_, dropout_mask_;
  Activation activation_ = Activation::Relu;
  double weight_decay_ = 0;
  double dropout_ = 0;
};

// fused_mlp with autograd: the forward op, then one FusedMLPBackward node as
// the history of o and s (what Function::apply does for FusedMLPBackward's
// case, without the generality it does not need).
std::tuple<Tensor, Tensor> fused_mlp_with_node(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    bool save_hidden,
    double dropout) {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    // As Function::apply: functorch's transforms do not support C++ autograd nodes.
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  Tensor o, s, z, h, mask;
  {
    // Below autograd: the forward kernel records nothing itself.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(o, s, z, h, mask) =
        forward_op().call(x, w1, w2, b1, b2, activation, weight_decay, dropout);
  }
  auto node = make_node<FusedMLPBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, w1, w2, b1, b2));
  // In the order of Function::save_for_backward's list before (saved-tensor
  // hooks see them in this order).
  node->x_ = SavedVariable(x, /*is_output=*/false);
  node->w1_ = SavedVariable(w1, false);
  node->w2_ = SavedVariable(w2, false);
  if (b1) {
    node->b1_ = SavedVariable(*b1, false);
  }
  node->z_ = SavedVariable(z, false);
  if (save_hidden) {
    node->h_ = SavedVariable(h, false);
  }
  if (dropout > 0) {
    node->dropout_mask_ = SavedVariable(mask, false);
  }
  node->activation_ = parse_activation(activation);  // checked by the forward op already
  node->weight_decay_ = weight_decay;
  node->dropout_ = dropout;
  torch::autograd::set_history(o, node);
  torch::autograd::set_history(s, node);
  return {std::move(o), std::move(s)};
}

std::tuple<Tensor, Tensor> fused_mlp_autograd(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    bool save_hidden,
    double dropout) {
  const Tensor* inputs[] = {&x, &w1, &w2, b1 ? &*b1 : nullptr, b2 ? &*b2 : nullptr};
  if (forward_gradient(inputs)) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false, "fused_mlp: forward-mode AD is not implemented (no jvp); an input has a tangent");
  }
  if (!requires_grad(inputs)) {
    // No autograd node to build, nothing to save (with dropout > 0 a mask is
    // still drawn and applied: dropout under no_grad in training mode, as F.dropout).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return inference_op().call(x, w1, w2, b1, b2, activation, weight_decay, dropout);
  }
  return fused_mlp_with_node(x, w1, w2, b1, b2, activation, weight_decay, save_hidden, dropout);
}

// Saved for backward: dL/do, x, w1, w2, b1 (if given), z and h (h only with
// save_hidden); target and b2 too, read only for second derivatives; the dropout
// mask with dropout > 0. o is not saved: dL/do replaces it.
class FusedMLPLossFunction : public torch::autograd::Function<FusedMLPLossFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const Tensor& target,
      const Tensor& w1,
      const Tensor& w2,
      const std::optional<Tensor>& b1,
      const std::optional<Tensor>& b2,
      c10::string_view activation,
      double weight_decay,
      c10::string_view loss,
      c10::string_view reduction,
      bool save_hidden,
      double dropout) {
    auto [objective, o, dloss_do, z, h, mask] = loss_forward_op().call(
        x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
        /*keep_gradient=*/true, dropout);
    ctx->save_for_backward(
        {dloss_do, x, w1, w2, b1.value_or(Tensor()), z, save_hidden ? h : Tensor(), target,
         b2.value_or(Tensor()), dropout > 0 ? mask : Tensor()});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["weight_decay"] = weight_decay;
    ctx->saved_data["dropout"] = dropout;
    ctx->saved_data["loss"] = std::string(loss);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->set_materialize_grads(false);
    return {objective, o};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &dloss_do = saved[0], &x = saved[1], &w1 = saved[2], &w2 = saved[3];
    const Tensor &b1 = saved[4], &z = saved[5], &h = saved[6], &target = saved[7];
    const Tensor &b2 = saved[8], &dropout_mask = saved[9];
    const std::string& activation = ctx->saved_data["activation"].toStringRef();
    const double weight_decay = ctx->saved_data["weight_decay"].toDouble();
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const Tensor &grad_J = grads[0], &grad_o = grads[1];
    const GradientMask mask = gradient_mask(ctx, 0, 2, b1.defined(), b2.defined());
    variable_list result(12);  // one per forward argument (target gets none)
    if (!any(mask) || (!grad_J.defined() && !grad_o.defined())) {
      return result;
    }
    Tensor dx, dw1, dw2, db1, db2;
    if (at::GradMode::is_enabled()) {
      const auto [o, s] = recompute_forward(
          x, w1, w2, b1, b2, activation, weight_decay,
          dropout_factor(dropout_mask, dropout, x.scalar_type()));
      Tensor objective = differentiable_loss(
          o, target, ctx->saved_data["loss"].toStringRef(),
          ctx->saved_data["reduction"].toStringRef());
      if (s.defined()) {
        objective = objective + s;
      }
      std::tie(dx, dw1, dw2, db1, db2) = differentiable_gradients(
          {{objective, grad_J}, {o, grad_o}}, {x, w1, w2, b1, b2}, mask);
    } else {
      std::tie(dx, dw1, dw2, db1, db2) = loss_backward_op().call(
          optional(grad_J), optional(grad_o), dloss_do, x, w1, w2, z, optional(h), activation,
          weight_decay, mask, optional(dropout_mask), dropout);
    }
    result[0] = dx, result[2] = dw1, result[3] = dw2, result[4] = db1, result[5] = db2;
    return result;
  }
};

std::tuple<Tensor, Tensor> fused_mlp_loss_autograd(
    const Tensor& x,
    const Tensor& target,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    c10::string_view loss,
    c10::string_view reduction,
    bool save_hidden,
    double dropout) {
  // Checked before dispatch too: a target on another device would otherwise pick the kernel.
  TORCH_CHECK(
      target.device() == x.device(), "fused_mlp_loss: expected target on the device of x (",
      x.device(), "), but got target on ", target.device());
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(target.requires_grad() && at::GradMode::is_enabled()),
      "fused_mlp_loss: gradients with respect to target are not supported (target requires "
      "grad); detach it, or use fused_mlp with torch's loss");
  const Tensor* inputs[] = {&x, &w1, &w2, b1 ? &*b1 : nullptr, b2 ? &*b2 : nullptr};
  if (!requires_grad(inputs) && !forward_gradient(inputs)) {
    // No gradient to come (evaluation): the forward op alone, without forming dL/do.
    auto result = loss_forward_op().call(
        x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
        /*keep_gradient=*/false, dropout);
    return {std::get<0>(result), std::get<1>(result)};
  }
  auto outputs = FusedMLPLossFunction::apply(
      x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction, save_hidden,
      dropout);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CompositeImplicitAutograd, m) {
  m.impl("fused_mlp", TORCH_FN(fused_mlp_autograd));
  m.impl("fused_mlp_loss", TORCH_FN(fused_mlp_loss_autograd));
}

}  // namespace mlp_ext
