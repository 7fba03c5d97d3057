// The gated feed-forward block, device-independent part: argument checks and
// the forward, inference and backward over a device's GatedDeviceKernels (see
// gated.h). The math is that of mlp.cpp with one more elementwise product in
// the hidden layer; the products, column sums and the decay folded into the
// weight-gradient products are mlp.cpp's own helpers.
#include "gated.h"

#include <cmath>

namespace mlp_ext {

namespace {

// [W_g; W_u] (2h x d): the gate and up products as one product (see gated.h).
Tensor stacked_weights(const Tensor& w_gate, const Tensor& w_up) {
  return at::cat({w_gate, w_up}, 0);
}

// [b_g | b_u] (2h), a missing one as zeros; nullopt when both are missing.
std::optional<Tensor> stacked_bias(
    const std::optional<Tensor>& b_gate, const std::optional<Tensor>& b_up, int64_t hidden,
    const at::TensorOptions& options) {
  if (!b_gate && !b_up) {
    return std::nullopt;
  }
  return at::cat({b_gate ? *b_gate : at::zeros({hidden}, options),
                  b_up ? *b_up : at::zeros({hidden}, options)});
}

}  // namespace

void check_gated_forward_inputs(
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const std::optional<Tensor>& b_gate,
    const std::optional<Tensor>& b_up,
    const std::optional<Tensor>& b_down,
    double weight_decay,
    bool allow_reduced_precision) {
  TORCH_CHECK_VALUE(
      std::isfinite(weight_decay) && weight_decay >= 0,
      "gated_mlp: expected weight_decay to be a finite number >= 0, but got ", weight_decay);
  TORCH_CHECK(
      x.dim() >= 1,
      "gated_mlp: expected x of shape (*, in_features) with at least 1 dimension, but got a "
      "0-dim tensor");
  const auto dtype = x.scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kDouble ||
      (allow_reduced_precision && (dtype == at::kHalf || dtype == at::kBFloat16));
  TORCH_CHECK_TYPE(
      supported, "gated_mlp: expected x of a floating dtype (",
      allow_reduced_precision ? "float32, float64, float16 or bfloat16"
                              : "float32 or float64 on ",
      allow_reduced_precision ? "" : x.device().str(), "), but got ", dtype);
  TORCH_CHECK(
      w_gate.dim() == 2,
      "gated_mlp: expected w_gate of shape (hidden_features, in_features), but got "
      "w_gate.shape = ", w_gate.sizes());
  TORCH_CHECK(
      w_up.sizes() == w_gate.sizes(),
      "gated_mlp: expected w_up of the shape of w_gate ", w_gate.sizes(),
      " (hidden_features, in_features), but got w_up.shape = ", w_up.sizes());
  TORCH_CHECK(
      w_down.dim() == 2,
      "gated_mlp: expected w_down of shape (out_features, hidden_features), but got "
      "w_down.shape = ", w_down.sizes());
  TORCH_CHECK(
      x.size(-1) == w_gate.size(1),
      "gated_mlp: x.shape[-1] = ", x.size(-1), " does not match in_features = w_gate.shape[1] = ",
      w_gate.size(1), " (x.shape = ", x.sizes(), ", w_gate.shape = ", w_gate.sizes(), ")");
  TORCH_CHECK(
      w_down.size(1) == w_gate.size(0),
      "gated_mlp: w_down.shape[1] = ", w_down.size(1),
      " does not match hidden_features = w_gate.shape[0] = ", w_gate.size(0),
      " (w_gate.shape = ", w_gate.sizes(), ", w_down.shape = ", w_down.sizes(), ")");
  check_like_x("gated_mlp", "w_gate", w_gate, x);
  check_like_x("gated_mlp", "w_up", w_up, x);
  check_like_x("gated_mlp", "w_down", w_down, x);
  check_bias("gated_mlp", "b_gate", b_gate, w_gate.size(0), "hidden_features", x);
  check_bias("gated_mlp", "b_up", b_up, w_gate.size(0), "hidden_features", x);
  check_bias("gated_mlp", "b_down", b_down, w_down.size(0), "out_features", x);
}

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
    double weight_decay) {
  const Activation act = parse_activation(activation);
  check_gated_forward_inputs(
      x, w_gate, w_up, w_down, b_gate, b_up, b_down, weight_decay, kernels.reduced_precision);
  const DeviceKernels& products = *kernels.products;
  const int64_t in_features = w_gate.size(1), hidden = w_gate.size(0);
  const int64_t out_features = w_down.size(0);
  const int64_t n = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const Tensor x2d = x.dim() == 2 ? x : x.reshape({n, in_features});
  const auto options = x.options();

  // z = [Z_g | Z_u] = X [W_g; W_u]^T + [b_g | b_u]: one product, the biases as
  // its addend (rounded once, as nn.Linear's).
  const Tensor w = stacked_weights(w_gate, w_up);
  const std::optional<Tensor> b = stacked_bias(b_gate, b_up, hidden, options);
  Tensor z = empty({n, 2 * hidden}, options);
  matmul(products, z, b ? &*b : nullptr, x2d, false, w, /*trans_b=*/true);
  Tensor h = empty({n, hidden}, options);
  kernels.gated_activation(z, h, act);
  Tensor o = empty({n, out_features}, options);
  matmul(products, o, b_down ? &*b_down : nullptr, h, false, w_down, /*trans_b=*/true);

  // ||W_g||^2 + ||W_u||^2 = ||[W_g; W_u]||^2: the stacked weights serve the penalty too.
  Tensor s = weight_decay == 0 ? zero_scalar(options) : products.penalty(w, w_down, weight_decay);
  return {with_leading_dims(o, x), s, z, h};
}

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
    double weight_decay) {
  auto result = gated_mlp_forward(
      kernels, x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation, weight_decay);
  return {std::get<0>(result), std::get<1>(result)};
}

namespace {

void check_gated_backward_inputs(
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const Tensor& z,
    const std::optional<Tensor>& h) {
  TORCH_CHECK(
      w_gate.dim() == 2 && w_up.sizes() == w_gate.sizes() && w_down.dim() == 2 &&
          w_down.size(1) == w_gate.size(0),
      "gated_mlp_backward: expected w_gate and w_up of shape (hidden_features, in_features) and "
      "w_down of shape (out_features, hidden_features), but got w_gate.shape = ", w_gate.sizes(),
      ", w_up.shape = ", w_up.sizes(), ", w_down.shape = ", w_down.sizes());
  const int64_t in_features = w_gate.size(1), hidden = w_gate.size(0);
  const int64_t out_features = w_down.size(0);
  TORCH_CHECK(
      z.dim() == 2 && z.size(1) == 2 * hidden,
      "gated_mlp_backward: expected z of shape (batch, 2 * hidden_features = ", 2 * hidden,
      "), but got z.shape = ", z.sizes());
  const int64_t n = z.size(0);
  TORCH_CHECK(
      !h || (h->dim() == 2 && h->size(0) == n && h->size(1) == hidden),
      "gated_mlp_backward: expected h of shape [", n, ", ", hidden, "], but got h.shape = ",
      h->sizes());
  TORCH_CHECK(
      x.dim() >= 1 && x.size(-1) == in_features && x.numel() == n * in_features,
      "gated_mlp_backward: expected x of ", n, " rows of in_features = ", in_features,
      ", but got x.shape = ", x.sizes());
  TORCH_CHECK(
      grad_o.numel() == n * out_features,
      "gated_mlp_backward: expected grad_o with ", n, " x ", out_features,
      " elements, but got grad_o.shape = ", grad_o.sizes());
  TORCH_CHECK(
      !grad_s || grad_s->numel() == 1,
      "gated_mlp_backward: expected grad_s with one element, but got grad_s.shape = ",
      grad_s->sizes());
  const std::pair<const char*, const Tensor*> tensors[] = {
      {"grad_o", &grad_o}, {"x", &x},         {"w_gate", &w_gate},
      {"w_up", &w_up},     {"w_down", &w_down}, {"h", h ? &*h : nullptr}};
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) {
      continue;
    }
    TORCH_CHECK_TYPE(
        t->scalar_type() == z.scalar_type(), "gated_mlp_backward: expected ", name,
        " to have the dtype of z (", z.scalar_type(), "), but got ", t->scalar_type());
    TORCH_CHECK(
        t->device() == z.device(), "gated_mlp_backward: expected ", name,
        " on the device of z (", z.device(), "), but got ", name, " on ", t->device());
  }
}

}  // namespace

GatedBackwardResult gated_mlp_backward(
    const GatedDeviceKernels& kernels,
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w_gate,
    const Tensor& w_up,
    const Tensor& w_down,
    const Tensor& z,
    const std::optional<Tensor>& h,
    std::string_view activation,
    double weight_decay,
    GatedGradientMask output_mask) {
  const Activation act = parse_activation(activation);
  check_gated_backward_inputs(grad_o, grad_s, x, w_gate, w_up, w_down, z, h);
  const DeviceKernels& products = *kernels.products;
  const auto [need_dx, need_dwg, need_dwu, need_dwd, need_dbg, need_dbu, need_dbd] = output_mask;
  const int64_t n = z.size(0);
  const int64_t in_features = w_gate.size(1), hidden = w_gate.size(0);
  const int64_t out_features = w_down.size(0);
  const Tensor g_o = grad_o.dim() == 2 ? grad_o : grad_o.reshape({n, out_features});
  const Tensor z_contiguous = z.contiguous();
  const auto options = z.options();

  Tensor dx, dwg, dwu, dwd, dbg, dbu, dbd;
  if (need_dwd) {
    Tensor saved_h;
    if (h) {
      saved_h = *h;
    } else {
      // save_hidden=False: H again by the forward's own kernel (bitwise the same H).
      saved_h = empty({n, hidden}, options);
      kernels.gated_activation(z_contiguous, saved_h, act);
    }
    dwd = empty({out_features, hidden}, options);
    weight_gradient(products, dwd, g_o, saved_h, w_down, grad_s, weight_decay);
  }
  if (need_dbd) {
    dbd = empty({out_features}, options);
    column_sums(products, dbd, g_o);
  }
  if (need_dx || need_dwg || need_dwu || need_dbg || need_dbu) {
    Tensor g_h = empty({n, hidden}, options);  // G_H = G_O W_2
    matmul(products, g_h, nullptr, g_o, false, w_down, false);
    Tensor g = empty({n, 2 * hidden}, options);  // [G_Zg | G_Zu], one pass
    kernels.gated_activation_backward(g_h, z_contiguous, g, act);
    g_h.reset();
    const Tensor g_gate = g.narrow(1, 0, hidden), g_up = g.narrow(1, hidden, hidden);
    if (need_dbg) {
      dbg = empty({hidden}, options);
      column_sums(products, dbg, g_gate);
    }
    if (need_dbu) {
      dbu = empty({hidden}, options);
      column_sums(products, dbu, g_up);
    }
    const Tensor x2d = x.dim() == 2 ? x : x.reshape({n, in_features});
    const Tensor w = stacked_weights(w_gate, w_up);
    if (need_dwg || need_dwu) {
      // [dW_g; dW_u] = [G_Zg | G_Zu]^T X + g_s lambda [W_g; W_u]: one product over
      // the whole of g, then copied into the two gradients (which must not share a
      // storage). A product over a column half of g (rows 2h apart) ran 2-3x
      // slower in oneDNN than this one product plus the copies (docs/gated.md).
      Tensor dw = empty({2 * hidden, in_features}, options);
      weight_gradient(products, dw, g, x2d, w, grad_s, weight_decay);
      if (need_dwg) {
        dwg = empty({hidden, in_features}, options);
        dwg.copy_(dw.narrow(0, 0, hidden));
      }
      if (need_dwu) {
        dwu = empty({hidden, in_features}, options);
        dwu.copy_(dw.narrow(0, hidden, hidden));
      }
    }
    if (need_dx) {
      // dX = G_Zg W_g + G_Zu W_u = [G_Zg | G_Zu] [W_g; W_u]: one product.
      dx = empty({n, in_features}, options);
      matmul(products, dx, nullptr, g, false, w, false);
      if (x.dim() != 2) {
        dx = dx.view(x.sizes());
      }
    }
  }
  return {dx, dwg, dwu, dwd, dbg, dbu, dbd};
}

}  // namespace mlp_ext
