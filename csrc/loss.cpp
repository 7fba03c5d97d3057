// The section's objective J = L + s in one forward op and one backward op:
//
//   fused_mlp_loss(x, target, w1, w2, b1?, b2?, *, activation, weight_decay, loss,
//                  reduction, save_hidden) -> (J, o)
//
// The forward op runs fused_mlp_forward, then the loss L and its gradient
// dL/do (softmax - target for cross-entropy, 2 (o - target) for the squared
// error), which it keeps for backward instead of o: the backward op starts from
// G_O = g_J dL/do (+ the gradient of o if o was used too) and runs
// fused_mlp_backward with g_s = g_J. Both ops are CompositeExplicitAutograd
// compositions of the dispatcher's fused_mlp_forward / fused_mlp_backward and
// ATen, so they run on every device that has those two kernels.
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "mlp.h"

namespace mlp_ext {

namespace {

enum class Loss { CrossEntropy, SquaredError };
enum class Reduction { Mean, Sum };

Loss parse_loss(std::string_view name) {
  if (name == "cross_entropy") {
    return Loss::CrossEntropy;
  }
  if (name == "mse") {
    return Loss::SquaredError;
  }
  TORCH_CHECK_VALUE(
      false, "fused_mlp_loss: unknown loss \"", name,
      "\"; expected one of \"cross_entropy\", \"mse\"");
}

Reduction parse_reduction(std::string_view name) {
  if (name == "mean") {
    return Reduction::Mean;
  }
  if (name == "sum") {
    return Reduction::Sum;
  }
  TORCH_CHECK_VALUE(
      false, "fused_mlp_loss: unknown reduction \"", name,
      "\"; expected one of \"mean\", \"sum\"");
}

// Cross-entropy takes class indices (int64, of o's shape without the class
// dimension) or class probabilities (x's dtype, of o's shape); the squared
// error takes values of o's shape and dtype.
void check_target(const Tensor& target, const Tensor& x, at::IntArrayRef o_shape, Loss loss) {
  TORCH_CHECK(
      target.device() == x.device(), "fused_mlp_loss: expected target on the device of x (",
      x.device(), "), but got target on ", target.device());
  const bool indices = loss == Loss::CrossEntropy && !at::isFloatingType(target.scalar_type());
  if (indices) {
    TORCH_CHECK_TYPE(
        target.scalar_type() == at::kLong,
        "fused_mlp_loss: expected target of dtype int64 (class indices) or ", x.scalar_type(),
        " (class probabilities, the dtype of x), but got ", target.scalar_type());
    const auto expected = o_shape.slice(0, o_shape.size() - 1);
    TORCH_CHECK(
        target.sizes() == expected,
        "fused_mlp_loss: expected class-index target of shape ", expected,
        " (the output's shape without the class dimension), but got target.shape = ",
        target.sizes());
    return;
  }
  TORCH_CHECK_TYPE(
      target.scalar_type() == x.scalar_type(), "fused_mlp_loss: expected target of dtype ",
      x.scalar_type(), " (the dtype of x",
      loss == Loss::CrossEntropy ? "; or int64 class indices" : "", "), but got ",
      target.scalar_type());
  TORCH_CHECK(
      target.sizes() == o_shape, "fused_mlp_loss: expected ",
      loss == Loss::CrossEntropy ? "class-probability target" : "target", " of shape ", o_shape,
      " (the output's shape), but got target.shape = ", target.sizes());
}

// Class indices must lie in [0, classes). Checked on the CPU only: on an
// accelerator reading them would synchronize, and gather asserts there instead.
void check_class_indices(const Tensor& indices, int64_t classes) {
  if (!indices.is_cpu() || indices.numel() == 0) {
    return;
  }
  const auto [lowest, highest] = at::aminmax(indices);
  const int64_t lo = lowest.item<int64_t>(), hi = highest.item<int64_t>();
  TORCH_CHECK_INDEX(
      lo >= 0 && hi < classes, "fused_mlp_loss: expected class indices in [0, ", classes,
      ") (out_features), but target holds values in [", lo, ", ", hi, "]");
}

using LossForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;  // J, o, dL/do, z, h

// J = L + s, o, and (with keep_gradient) dL/do; without it dL/do is an empty tensor.
LossForwardResult fused_mlp_loss_forward(
    const Tensor& x,
    const Tensor& target,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    c10::string_view loss_name,
    c10::string_view reduction_name,
    bool keep_gradient) {
  const Loss loss = parse_loss(loss_name);
  const Reduction reduction = parse_reduction(reduction_name);
  auto [o, s, z, h] = forward_op().call(x, w1, w2, b1, b2, activation, weight_decay);
  check_target(target, x, o.sizes(), loss);

  const int64_t n = z.size(0), classes = w2.size(0);
  const bool mean = reduction == Reduction::Mean;
  // Half-precision outputs take their loss in float32, as torch's losses do.
  const bool widen = o.scalar_type() == at::kHalf || o.scalar_type() == at::kBFloat16;
  const Tensor o2d = widen ? o.view({n, classes}).to(at::kFloat) : o.view({n, classes});
  Tensor loss_value;  // L, 0-dim
  Tensor dloss_do;    // dL/do, n x classes
  if (loss == Loss::CrossEntropy) {
    Tensor log_p = at::log_softmax(o2d, 1);
    if (!at::isFloatingType(target.scalar_type())) {
      const Tensor t = target.reshape({n});
      check_class_indices(t, classes);
      loss_value = at::nll_loss(log_p, t, {}, mean ? at::Reduction::Mean : at::Reduction::Sum);
      if (keep_gradient) {  // softmax(o) - onehot(t), in the buffer of log softmax
        dloss_do = log_p.exp_().scatter_add_(
            1, t.view({n, 1}), at::full({n, 1}, -1.0, log_p.options()));
      }
    } else {
      const Tensor t = target.reshape({n, classes}).to(o2d.scalar_type());
      loss_value = at::dot(log_p.view(-1), t.reshape(-1)).neg_();
      if (mean) {
        loss_value.div_(static_cast<double>(n));  // 0 / 0 = nan for an empty batch, as torch
      }
      if (keep_gradient) {  // d/do of -sum_j t_j log softmax(o)_j = softmax(o) sum_j t_j - t
        dloss_do = log_p.exp_().mul_(t.sum(1, /*keepdim=*/true)).sub_(t);
      }
    }
    if (keep_gradient && mean) {
      dloss_do.div_(static_cast<double>(n));
    }
  } else {
    Tensor diff = o2d - target.reshape({n, classes}).to(o2d.scalar_type());
    const Tensor flat = diff.view(-1);
    loss_value = at::dot(flat, flat);
    const double count = mean ? static_cast<double>(n * classes) : 1.0;
    if (mean) {
      loss_value.div_(count);
    }
    if (keep_gradient) {
      dloss_do = diff.mul_(2.0 / count);
    }
  }
  const Tensor objective = loss_value.to(o.scalar_type()).add_(s);
  dloss_do = keep_gradient ? dloss_do.to(o.scalar_type()) : at::empty({0}, o.options());
  return {objective, o, dloss_do, z, h};
}

BackwardResult fused_mlp_loss_backward(
    const std::optional<Tensor>& grad_J,
    const std::optional<Tensor>& grad_o,
    const Tensor& dloss_do,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& z,
    const std::optional<Tensor>& h,
    c10::string_view activation,
    double weight_decay,
    std::array<bool, 5> output_mask) {
  // G_O = g_J dL/do + (the gradient that reached o directly, if any).
  Tensor g_o;
  if (grad_J) {
    // The usual J.backward() has g_J = 1: no pass over dL/do (read on the CPU only).
    const bool unit = grad_J->is_cpu() && grad_J->item<double>() == 1.0;
    g_o = unit ? dloss_do : dloss_do * *grad_J;
  }
  if (grad_o) {
    const Tensor g = grad_o->reshape(dloss_do.sizes());
    g_o = g_o.defined() ? g_o + g : g;
  }
  TORCH_CHECK(g_o.defined(), "fused_mlp_loss_backward: expected grad_J or grad_o, got neither");
  return backward_op().call(
      g_o, grad_J, x, w1, w2, z, h, activation, weight_decay, output_mask);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Saved for backward: dL/do, x, w1, w2, b1 (if given), z and h (h only with
// save_hidden); target and b2 too, read only for second derivatives. o is not
// saved: dL/do replaces it.
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
      bool save_hidden) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mlp_ext::fused_mlp_loss_forward", "")
                         .typed<LossForwardResult(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const std::optional<Tensor>&, const std::optional<Tensor>&,
                             c10::string_view, double, c10::string_view, c10::string_view,
                             bool)>();
    auto [objective, o, dloss_do, z, h] = op.call(
        x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
        /*keep_gradient=*/true);
    ctx->save_for_backward(
        {dloss_do, x, w1, w2, b1.value_or(Tensor()), z, save_hidden ? h : Tensor(), target,
         b2.value_or(Tensor())});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["weight_decay"] = weight_decay;
    ctx->saved_data["loss"] = std::string(loss);
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->set_materialize_grads(false);
    return {objective, o};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &dloss_do = saved[0], &x = saved[1], &w1 = saved[2], &w2 = saved[3];
    const Tensor &b1 = saved[4], &z = saved[5], &h = saved[6], &target = saved[7];
    const Tensor& b2 = saved[8];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const double weight_decay = ctx->saved_data["weight_decay"].toDouble();
    const Tensor &grad_J = grads[0], &grad_o = grads[1];
    // needs_input_grad counts only the tensors given: x, target, w1, w2, then b1, b2 if present.
    const size_t b2_edge = b1.defined() ? 5 : 4;
    const std::array<bool, 5> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(2), ctx->needs_input_grad(3),
        b1.defined() && ctx->needs_input_grad(4), b2.defined() && ctx->needs_input_grad(b2_edge)};
    variable_list result(11);  // one per forward argument
    if ((!grad_J.defined() && !grad_o.defined()) ||
        !(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) {
      return result;
    }
    Tensor dx, dw1, dw2, db1, db2;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: the same objective from differentiable ops (fused_mlp has
      // exact double backward, torch's losses have theirs), differentiated.
      std::tie(dx, dw1, dw2, db1, db2) = differentiable_backward(
          ctx, x, target, w1, w2, b1, b2, activation, weight_decay, grad_J, grad_o, mask);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("mlp_ext::fused_mlp_loss_backward", "")
                           .typed<BackwardResult(
                               const std::optional<Tensor>&, const std::optional<Tensor>&,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const Tensor&, const std::optional<Tensor>&, c10::string_view,
                               double, std::array<bool, 5>)>();
      auto optional = [](const Tensor& t) {
        return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
      };
      std::tie(dx, dw1, dw2, db1, db2) = op.call(
          optional(grad_J), optional(grad_o), dloss_do, x, w1, w2, z, optional(h), activation,
          weight_decay, mask);
    }
    result[0] = dx;
    result[2] = dw1;
    result[3] = dw2;
    result[4] = db1;
    result[5] = db2;
    return result;
  }

 private:
  static BackwardResult differentiable_backward(
      AutogradContext* ctx,
      const Tensor& x,
      const Tensor& target,
      const Tensor& w1,
      const Tensor& w2,
      const Tensor& b1,
      const Tensor& b2,
      const std::string& activation,
      double weight_decay,
      const Tensor& grad_J,
      const Tensor& grad_o,
      const std::array<bool, 5>& mask) {
    static auto fused_mlp = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("mlp_ext::fused_mlp", "")
                                .typed<std::tuple<Tensor, Tensor>(
                                    const Tensor&, const Tensor&, const Tensor&,
                                    const std::optional<Tensor>&, const std::optional<Tensor>&,
                                    c10::string_view, double, bool)>();
    auto optional = [](const Tensor& t) {
      return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
    };
    const auto [o, s] =
        fused_mlp.call(x, w1, w2, optional(b1), optional(b2), activation, weight_decay, true);
    const Loss loss = parse_loss(ctx->saved_data["loss"].toStringRef());
    const auto reduction = parse_reduction(ctx->saved_data["reduction"].toStringRef()) ==
            Reduction::Mean
        ? at::Reduction::Mean
        : at::Reduction::Sum;
    const int64_t classes = w2.size(0);
    Tensor loss_value;
    if (loss == Loss::CrossEntropy) {
      const bool indices = !at::isFloatingType(target.scalar_type());
      loss_value = at::cross_entropy_loss(
          o.reshape({-1, classes}), indices ? target.reshape({-1}) : target.reshape({-1, classes}),
          {}, reduction);
    } else {
      loss_value = at::mse_loss(o, target, reduction);
    }
    std::vector<Tensor> outputs, output_grads;
    if (grad_J.defined()) {
      outputs.push_back(loss_value + s);
      output_grads.push_back(grad_J);
    }
    if (grad_o.defined()) {
      outputs.push_back(o);
      output_grads.push_back(grad_o);
    }
    std::vector<Tensor> inputs;
    const Tensor* candidates[] = {&x, &w1, &w2, &b1, &b2};
    for (size_t i = 0; i < 5; ++i) {
      if (mask[i]) {
        inputs.push_back(*candidates[i]);
      }
    }
    const auto grads = torch::autograd::grad(
        outputs, inputs, output_grads, /*retain_graph=*/true, /*create_graph=*/true,
        /*allow_unused=*/true);
    Tensor result[5];
    for (size_t i = 0, k = 0; i < 5; ++i) {
      if (mask[i]) {
        result[i] = grads[k++];
      }
    }
    return {result[0], result[1], result[2], result[3], result[4]};
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
    bool save_hidden) {
  // Checked before dispatch too: a target on another device would otherwise pick the kernel.
  TORCH_CHECK(
      target.device() == x.device(), "fused_mlp_loss: expected target on the device of x (",
      x.device(), "), but got target on ", target.device());
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(target.requires_grad() && at::GradMode::is_enabled()),
      "fused_mlp_loss: gradients with respect to target are not supported (target requires "
      "grad); detach it, or use fused_mlp with torch's loss");
  const auto requires_grad = [](const std::optional<Tensor>& t) {
    return t && t->requires_grad();
  };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || w1.requires_grad() || w2.requires_grad() || requires_grad(b1) ||
        requires_grad(b2))) {
    // No gradient to come (evaluation): the forward op alone, without forming dL/do.
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mlp_ext::fused_mlp_loss_forward", "")
                         .typed<LossForwardResult(
                             const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                             const std::optional<Tensor>&, const std::optional<Tensor>&,
                             c10::string_view, double, c10::string_view, c10::string_view,
                             bool)>();
    auto result = op.call(
        x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
        /*keep_gradient=*/false);
    return {std::get<0>(result), std::get<1>(result)};
  }
  auto outputs = FusedMLPLossFunction::apply(
      x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction, save_hidden);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlp_ext, m) {
  m.def(
      "fused_mlp_loss(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1=None, "
      "Tensor? b2=None, *, str activation=\"relu\", float weight_decay=0.0, "
      "str loss=\"cross_entropy\", str reduction=\"mean\", bool save_hidden=True) -> "
      "(Tensor J, Tensor o)");
  m.def(
      "fused_mlp_loss_forward(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1, "
      "Tensor? b2, str activation, float weight_decay, str loss, str reduction, "
      "bool keep_gradient) -> "
      "(Tensor J, Tensor o, Tensor dloss_do, Tensor z, Tensor h)");
  m.def(
      "fused_mlp_loss_backward(Tensor? grad_J, Tensor? grad_o, Tensor dloss_do, Tensor x, "
      "Tensor w1, Tensor w2, Tensor z, Tensor? h, str activation, float weight_decay, "
      "bool[5] output_mask) -> (Tensor dx, Tensor dw1, Tensor dw2, Tensor db1, Tensor db2)");
  m.impl(
      "fused_mlp_loss", c10::DispatchKey::CompositeImplicitAutograd,
      TORCH_FN(fused_mlp_loss_autograd));
  m.impl(
      "fused_mlp_loss_forward", c10::DispatchKey::CompositeExplicitAutograd,
      TORCH_FN(fused_mlp_loss_forward));
  m.impl(
      "fused_mlp_loss_backward", c10::DispatchKey::CompositeExplicitAutograd,
      TORCH_FN(fused_mlp_loss_backward));
}

}  // namespace mlp_ext
