// The section's objective J = L + s in one forward op and one backward op:
//
//   fused_mlp_loss(x, target, w1, w2, b1?, b2?, *, activation, weight_decay, loss,
//                  reduction, save_hidden, dropout) -> (J, o)
//
// The forward op runs fused_mlp_forward, then the loss L and its gradient
// dL/do (softmax - target for cross-entropy, 2 (o - target) for the squared
// error), which it keeps for backward instead of o: the backward op starts from
// G_O = g_J dL/do (+ the gradient of o if o was used too) and runs
// fused_mlp_backward with g_s = g_J. Both ops are CompositeExplicitAutograd
// compositions of the dispatcher's fused_mlp_forward / fused_mlp_backward and
// ATen, so they run on every device that has those two kernels. (The autograd
// node that calls them is in autograd.cpp.)
#include "loss.h"

#include <torch/library.h>

#include <string>

#include "ops.h"

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

// J = L + s, o, and (with keep_gradient) dL/do; without it dL/do is an empty tensor.
// z, h and the dropout mask as fused_mlp_forward returns them.
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
    bool keep_gradient,
    double dropout) {
  const Loss loss = parse_loss(loss_name);
  const Reduction reduction = parse_reduction(reduction_name);
  auto [o, s, z, h, mask] =
      forward_op().call(x, w1, w2, b1, b2, activation, weight_decay, dropout);
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
  return {objective, o, dloss_do, z, h, mask};
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
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& dropout_mask,
    double dropout) {
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
      g_o, grad_J, x, w1, w2, z, h, activation, weight_decay, output_mask, dropout_mask,
      dropout);
}

}  // namespace

Tensor differentiable_loss(
    const Tensor& o, const Tensor& target, std::string_view loss, std::string_view reduction) {
  const auto at_reduction =
      parse_reduction(reduction) == Reduction::Mean ? at::Reduction::Mean : at::Reduction::Sum;
  if (parse_loss(loss) == Loss::CrossEntropy) {
    const int64_t classes = o.size(-1);
    const bool indices = !at::isFloatingType(target.scalar_type());
    return at::cross_entropy_loss(
        o.reshape({-1, classes}), indices ? target.reshape({-1}) : target.reshape({-1, classes}),
        {}, at_reduction);
  }
  return at::mse_loss(o, target, at_reduction);
}

TORCH_LIBRARY_IMPL(mlp_ext, CompositeExplicitAutograd, m) {
  m.impl("fused_mlp_loss_forward", TORCH_FN(fused_mlp_loss_forward));
  m.impl("fused_mlp_loss_backward", TORCH_FN(fused_mlp_loss_backward));
}

}  // namespace mlp_ext
