// The autograd nodes of fused_mlp and fused_mlp_loss, and the two ops'
// CompositeImplicitAutograd kernels that build them.
//
// The nodes are C++ (plain torch::autograd::Nodes sharing a base, MLPNode), so
// a training step runs no Python between the op call and the gradients. Each
// one's forward is one op call (fused_mlp_forward, fused_mlp_loss_forward) and
// its backward one op call (fused_mlp_backward, fused_mlp_loss_backward). Under
// create_graph=True the backward instead differentiates the same function
// recomputed from differentiable ATen ops, so second derivatives are exact;
// both nodes share that path and the mask of the gradients their inputs need.
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

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

constexpr size_t kX = 0, kW1 = 1, kW2 = 2, kB1 = 3, kB2 = 4;  // positions in a gradient mask
using GradientMask = std::array<bool, 5>;                       // of x, w1, w2, b1, b2

std::optional<Tensor> optional(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
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

// A new NodeType whose next edges are those of `inputs`, in order (an absent
// optional, or a tensor that does not require grad: an invalid edge), so that
// output i of the node is the gradient of input i.
template <typename NodeType, typename... Inputs>
auto make_node_with_edges(const Inputs&... inputs) {
  if (const auto& functorch_tls = at::functorch::functorchTLSAccessor()) {
    // As Function::apply: functorch's transforms do not support C++ autograd nodes.
    functorch_tls->checkSupportsCppAutogradFunction();
  }
  auto node = make_node<NodeType>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  return node;
}

// The autograd nodes are plain torch::autograd::Nodes, not
// torch::autograd::Functions. Function's generality (a variable list of the
// inputs, per-input and per-output metadata, the saved_data IValue dictionary,
// the output wrapping for views, dirty and non-differentiable tensors, a
// vector of saved variables) cost 13-18K instructions a training step more than
// a node that holds plain members instead (benchmarks/instructions.py, fused
// step: node and engine 88K -> 75K at 1x16^3, 88K -> 70K at 64^4; fused loss
// step, with the ops called below autograd: 407K -> 340K at 1x16^3).
//
// MLPNode holds what the nodes of fused_mlp and fused_mlp_loss both save: x,
// w1, w2, b1 (if given; read only for second derivatives), the intermediates z
// and h of the forward (z only when save_hidden is false: the backward then
// recomputes h = phi(z)), with dropout > 0 the bool mask (one byte per hidden
// unit; h is saved with the mask already applied, which is what dW2 reads),
// and the forward's options. Saved-tensor hooks see the tensors in the order
// they are saved: the order of Function::save_for_backward's list before.
class MLPNode : public torch::autograd::Node {
 public:
  void release_variables() override {
    for (SavedVariable* v : {&x_, &w1_, &w2_, &b1_, &z_, &h_, &dropout_mask_}) {
      v->reset_data();
    }
  }

  // Saves x, w1, w2, b1 (if given), z and h (if save_hidden), in that order.
  void save_forward(
      const Tensor& x,
      const Tensor& w1,
      const Tensor& w2,
      const std::optional<Tensor>& b1,
      const Tensor& z,
      const Tensor& h,
      bool save_hidden) {
    x_ = SavedVariable(x, /*is_output=*/false);
    w1_ = SavedVariable(w1, false);
    w2_ = SavedVariable(w2, false);
    if (b1) {
      b1_ = SavedVariable(*b1, false);
    }
    z_ = SavedVariable(z, false);
    if (save_hidden) {
      h_ = SavedVariable(h, false);
    }
  }

  // Saves the dropout mask (with dropout > 0) and the options.
  void save_dropout_and_options(
      const Tensor& mask, c10::string_view activation, double weight_decay, double dropout) {
    if (dropout > 0) {
      dropout_mask_ = SavedVariable(mask, false);
    }
    activation_ = parse_activation(activation);  // checked by the forward op already
    weight_decay_ = weight_decay;
    dropout_ = dropout;
  }

 protected:
  // Which of x, w1, w2, b1, b2 need a gradient: x is the node's output 0, w1 its
  // output w1_output, then w2, b1, b2 (an absent bias has an invalid edge).
  GradientMask gradient_mask(size_t w1_output) const {
    return {
        should_compute_output(0), should_compute_output(w1_output),
        should_compute_output(w1_output + 1), should_compute_output(w1_output + 2),
        should_compute_output(w1_output + 3)};
  }

  // The node's outputs (one per next edge): the gradients of x, w1, w2, b1, b2
  // at 0 and from w1_output on, as gradient_mask.
  variable_list outputs(BackwardResult&& grads, size_t w1_output) const {
    variable_list result(num_outputs());
    result[0] = std::move(std::get<0>(grads));
    result[w1_output] = std::move(std::get<1>(grads));
    result[w1_output + 1] = std::move(std::get<2>(grads));
    result[w1_output + 2] = std::move(std::get<3>(grads));
    result[w1_output + 3] = std::move(std::get<4>(grads));
    return result;
  }

  struct Unpacked {
    Tensor x, w1, w2, b1, z, h, dropout_mask;
  };

  // Every saved tensor of MLPNode's, unpacked once (each unpack runs the
  // saved-tensor hooks and the check for in-place edits).
  Unpacked unpack_forward() const {
    return {x_.unpack(), w1_.unpack(), w2_.unpack(), b1_.unpack(),
            z_.unpack(), h_.unpack(), dropout_mask_.unpack()};
  }

  // o and s recomputed from differentiable ATen ops (recompute_forward), b2 given or not.
  std::tuple<Tensor, Tensor> recompute(const Unpacked& saved, const Tensor& b2) const {
    return recompute_forward(
        saved.x, saved.w1, saved.w2, saved.b1, b2, activation_name(activation_), weight_decay_,
        dropout_factor(saved.dropout_mask, dropout_, saved.x.scalar_type()));
  }

  SavedVariable x_, w1_, w2_, b1_, z_, h_, dropout_mask_;
  Activation activation_ = Activation::Relu;
  double weight_decay_ = 0;
  double dropout_ = 0;
};

// The autograd node of fused_mlp: MLPNode's tensors (not b2: no derivative
// reads it). Its next edges are those of x, w1, w2, b1, b2.
class FusedMLPBackward : public MLPNode {
 public:
  static constexpr size_t kW1Output = 1;

  std::string name() const override {
    return "FusedMLPBackward";
  }

  variable_list apply(variable_list&& grads) override {
    // As CppNode::apply: a node may be run from several threads at once.
    std::lock_guard<std::mutex> lock(mutex_);
    const GradientMask mask = gradient_mask(kW1Output);
    const Tensor &grad_o = grads[0], &grad_s = grads[1];
    if (!any(mask) || (!grad_o.defined() && !grad_s.defined())) {
      return variable_list(num_outputs());
    }
    const Unpacked saved = unpack_forward();
    const Tensor &x = saved.x, &w1 = saved.w1, &w2 = saved.w2;
    Tensor dx, dw1, dw2, db1, db2;
    if (at::GradMode::is_enabled()) {
      // o without b2 (it shifts o only); db2 = the row sums of grad_o.
      const auto [o, s] = recompute(saved, Tensor());
      GradientMask without_b2 = mask;
      without_b2[kB2] = false;
      std::tie(dx, dw1, dw2, db1, std::ignore) = differentiable_gradients(
          {{o, grad_o}, {s, grad_s}}, {x, w1, w2, saved.b1, Tensor()}, without_b2);
      if (mask[kB2] && grad_o.defined()) {
        db2 = grad_o.reshape({-1, w2.size(0)}).sum(0);
      }
    } else if (grad_o.defined()) {
      // fused_mlp_backward has no autograd kernel of its own: go straight to
      // the device kernel instead of through the (boxed) autograd fallback.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dw1, dw2, db1, db2) = backward_op().call(
          grad_o, optional(grad_s), x, w1, w2, saved.z, optional(saved.h),
          activation_name(activation_), weight_decay_, mask, optional(saved.dropout_mask),
          dropout_);
    } else if (weight_decay_ != 0) {
      // Only s reached the loss: its gradient g_s * weight_decay * W.
      dw1 = mask[kW1] ? w1 * (grad_s * weight_decay_) : Tensor();
      dw2 = mask[kW2] ? w2 * (grad_s * weight_decay_) : Tensor();
    }
    return outputs({dx, dw1, dw2, db1, db2}, kW1Output);
  }
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
  auto node = make_node_with_edges<FusedMLPBackward>(x, w1, w2, b1, b2);
  Tensor o, s, z, h, mask;
  {
    // Below autograd: the forward kernel records nothing itself.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(o, s, z, h, mask) =
        forward_op().call(x, w1, w2, b1, b2, activation, weight_decay, dropout);
  }
  node->save_forward(x, w1, w2, b1, z, h, save_hidden);
  node->save_dropout_and_options(mask, activation, weight_decay, dropout);
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

// The autograd node of fused_mlp_loss. Saved for backward, in this order:
// dL/do, MLPNode's x, w1, w2, b1, z, h, then target and b2 (read only for
// second derivatives), then the dropout mask. o is not saved: dL/do replaces
// it. Its next edges are those of x, target, w1, w2, b1, b2 (the op's input
// order; target's is always invalid: it never gets a gradient).
class FusedMLPLossBackward : public MLPNode {
 public:
  static constexpr size_t kW1Output = 2;

  std::string name() const override {
    return "FusedMLPLossBackward";
  }

  void release_variables() override {
    MLPNode::release_variables();
    for (SavedVariable* v : {&dloss_do_, &target_, &b2_}) {
      v->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as FusedMLPBackward
    const GradientMask mask = gradient_mask(kW1Output);
    const Tensor &grad_J = grads[0], &grad_o = grads[1];
    if (!any(mask) || (!grad_J.defined() && !grad_o.defined())) {
      return variable_list(num_outputs());
    }
    const Tensor dloss_do = dloss_do_.unpack();
    const Unpacked saved = unpack_forward();
    const Tensor target = target_.unpack(), b2 = b2_.unpack();
    if (at::GradMode::is_enabled()) {
      const auto [o, s] = recompute(saved, b2);
      Tensor objective = differentiable_loss(o, target, loss_, reduction_);
      if (s.defined()) {
        objective = objective + s;
      }
      return outputs(
          differentiable_gradients(
              {{objective, grad_J}, {o, grad_o}}, {saved.x, saved.w1, saved.w2, saved.b1, b2},
              mask),
          kW1Output);
    }
    // As FusedMLPBackward: straight to the op's kernel, not through the autograd fallback.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return outputs(
        loss_backward_op().call(
            optional(grad_J), optional(grad_o), dloss_do, saved.x, saved.w1, saved.w2, saved.z,
            optional(saved.h), activation_name(activation_), weight_decay_, mask,
            optional(saved.dropout_mask), dropout_),
        kW1Output);
  }

  SavedVariable dloss_do_, target_, b2_;
  std::string loss_, reduction_;  // for second derivatives (differentiable_loss)
};

std::tuple<Tensor, Tensor> fused_mlp_loss_with_node(
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
  auto node = make_node_with_edges<FusedMLPLossBackward>(x, target, w1, w2, b1, b2);
  Tensor objective, o, dloss_do, z, h, mask;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as fused_mlp_with_node
    std::tie(objective, o, dloss_do, z, h, mask) = loss_forward_op().call(
        x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
        /*keep_gradient=*/true, dropout);
  }
  node->dloss_do_ = SavedVariable(dloss_do, /*is_output=*/false);
  node->save_forward(x, w1, w2, b1, z, h, save_hidden);
  node->target_ = SavedVariable(target, false);
  if (b2) {
    node->b2_ = SavedVariable(*b2, false);
  }
  node->save_dropout_and_options(mask, activation, weight_decay, dropout);
  node->loss_ = std::string(loss);
  node->reduction_ = std::string(reduction);
  torch::autograd::set_history(objective, node);
  torch::autograd::set_history(o, node);
  return {std::move(objective), std::move(o)};
}

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
  const Tensor* with_target[] = {&x, &target, &w1, &w2, inputs[3], inputs[4]};
  if (forward_gradient(with_target)) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        false,
        "fused_mlp_loss: forward-mode AD is not implemented (no jvp); an input has a tangent");
  }
  if (!requires_grad(inputs)) {
    // No gradient to come (evaluation): the forward op alone, without forming dL/do.
    auto result = loss_forward_op().call(
        x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
        /*keep_gradient=*/false, dropout);
    return {std::get<0>(result), std::get<1>(result)};
  }
  return fused_mlp_loss_with_node(
      x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction, save_hidden,
      dropout);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CompositeImplicitAutograd, m) {
  m.impl("fused_mlp", TORCH_FN(fused_mlp_autograd));
  m.impl("fused_mlp_loss", TORCH_FN(fused_mlp_loss_autograd));
}

}  // namespace mlp_ext
