// The fused MLP operator, device-independent part: argument checks, and the
// forward, inference and backward as matrix products and elementwise passes
// over a device's DeviceKernels (see mlp.h).
#include "mlp.h"

#include <ATen/EmptyTensor.h>

#include <cmath>
#include <cstring>
#include <string>

namespace mlp_ext {

namespace {

std::string valid_activations() {
  std::string names;
  for (const Activation a : kActivations) {
    names += names.empty() ? "\"" : ", \"";
    names += activation_name(a);
    names += '"';
  }
  return names;
}


}  // namespace

void check_like_x(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(),
      op, ": expected ", name, " to have the dtype of x (", x.scalar_type(), "), but got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == x.device(),
      op, ": expected ", name, " on the device of x (", x.device(), "), but got ", name,
      " on ", t.device());
}

void check_bias(
    const char* op, const char* name, const std::optional<Tensor>& b, int64_t size, const char* what,
    const Tensor& x) {
  if (!b) {
    return;
  }
  TORCH_CHECK(
      b->dim() == 1 && b->size(0) == size,
      op, ": expected ", name, " of shape (", what, ",) = [", size, "], but got ", name,
      ".shape = ", b->sizes());
  check_like_x(op, name, *b, x);
}

void check_dropout(const char* op, double dropout) {
  // Written so that NaN fails too.
  TORCH_CHECK_VALUE(
      dropout >= 0 && dropout <= 1, op, ": expected dropout to be a probability in [0, 1], but got ",
      dropout);
}

Activation parse_activation(std::string_view name) {
  const auto activation = find_activation(name);
  TORCH_CHECK_VALUE(
      activation, "fused_mlp: unknown activation \"", name, "\"; expected one of ",
      valid_activations());
  return *activation;
}

void check_forward_inputs(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    double weight_decay,
    double dropout,
    bool allow_reduced_precision) {
  TORCH_CHECK_VALUE(
      std::isfinite(weight_decay) && weight_decay >= 0,
      "fused_mlp: expected weight_decay to be a finite number >= 0, but got ", weight_decay);
  check_dropout("fused_mlp", dropout);
  TORCH_CHECK(
      x.dim() >= 1,
      "fused_mlp: expected x of shape (*, in_features) with at least 1 dimension, but got a "
      "0-dim tensor");
  const auto dtype = x.scalar_type();
  const bool supported = dtype == at::kFloat || dtype == at::kDouble ||
      (allow_reduced_precision && (dtype == at::kHalf || dtype == at::kBFloat16));
  TORCH_CHECK_TYPE(
      supported, "fused_mlp: expected x of a floating dtype (",
      allow_reduced_precision ? "float32, float64, float16 or bfloat16"
                              : "float32 or float64 on ",
      allow_reduced_precision ? "" : x.device().str(), "), but got ", dtype);
  TORCH_CHECK(
      w1.dim() == 2,
      "fused_mlp: expected w1 of shape (hidden_features, in_features), but got w1.shape = ",
      w1.sizes());
  TORCH_CHECK(
      w2.dim() == 2,
      "fused_mlp: expected w2 of shape (out_features, hidden_features), but got w2.shape = ",
      w2.sizes());
  TORCH_CHECK(
      x.size(-1) == w1.size(1),
      "fused_mlp: x.shape[-1] = ", x.size(-1), " does not match in_features = w1.shape[1] = ",
      w1.size(1), " (x.shape = ", x.sizes(), ", w1.shape = ", w1.sizes(), ")");
  TORCH_CHECK(
      w2.size(1) == w1.size(0),
      "fused_mlp: w2.shape[1] = ", w2.size(1), " does not match hidden_features = w1.shape[0] = ",
      w1.size(0), " (w1.shape = ", w1.sizes(), ", w2.shape = ", w2.sizes(), ")");
  check_like_x("fused_mlp", "w1", w1, x);
  check_like_x("fused_mlp", "w2", w2, x);
  check_bias("fused_mlp", "b1", b1, w1.size(0), "hidden_features", x);
  check_bias("fused_mlp", "b2", b2, w2.size(0), "out_features", x);
}

void check_backward_inputs(
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& z,
    const std::optional<Tensor>& h,
    const std::optional<Tensor>& dropout_mask,
    double dropout) {
  check_dropout("fused_mlp_backward", dropout);
  TORCH_CHECK(
      w1.dim() == 2 && w2.dim() == 2 && w2.size(1) == w1.size(0),
      "fused_mlp_backward: expected w1 of shape (hidden_features, in_features) and w2 of shape "
      "(out_features, hidden_features), but got w1.shape = ", w1.sizes(), ", w2.shape = ",
      w2.sizes());
  const int64_t in_features = w1.size(1), hidden = w1.size(0), out_features = w2.size(0);
  TORCH_CHECK(
      z.dim() == 2 && z.size(1) == hidden,
      "fused_mlp_backward: expected z of shape (batch, hidden_features = ", hidden,
      "), but got z.shape = ", z.sizes());
  const int64_t n = z.size(0);
  TORCH_CHECK(
      !h || h->sizes() == z.sizes(), "fused_mlp_backward: expected h of shape ", z.sizes(),
      " (the shape of z), but got h.shape = ", h->sizes());
  TORCH_CHECK(
      x.dim() >= 1 && x.size(-1) == in_features && x.numel() == n * in_features,
      "fused_mlp_backward: expected x of ", n, " rows of in_features = ", in_features,
      ", but got x.shape = ", x.sizes());
  TORCH_CHECK(
      grad_o.numel() == n * out_features,
      "fused_mlp_backward: expected grad_o with ", n, " x ", out_features,
      " elements, but got grad_o.shape = ", grad_o.sizes());
  TORCH_CHECK(
      !grad_s || grad_s->numel() == 1,
      "fused_mlp_backward: expected grad_s with one element, but got grad_s.shape = ",
      grad_s->sizes());
  TORCH_CHECK(
      dropout_mask || dropout == 0, "fused_mlp_backward: expected dropout_mask (the forward's "
      "mask) with dropout = ", dropout, ", but got None");
  if (dropout_mask) {
    TORCH_CHECK(
        dropout_mask->sizes() == z.sizes(), "fused_mlp_backward: expected dropout_mask of shape ",
        z.sizes(), " (the shape of z), but got dropout_mask.shape = ", dropout_mask->sizes());
    TORCH_CHECK_TYPE(
        dropout_mask->scalar_type() == at::kBool,
        "fused_mlp_backward: expected dropout_mask of dtype Bool, but got ",
        dropout_mask->scalar_type());
    TORCH_CHECK(
        dropout_mask->device() == z.device(),
        "fused_mlp_backward: expected dropout_mask on the device of z (", z.device(),
        "), but got dropout_mask on ", dropout_mask->device());
  }
  const std::pair<const char*, const Tensor*> tensors[] = {
      {"grad_o", &grad_o}, {"x", &x}, {"w1", &w1}, {"w2", &w2}, {"h", h ? &*h : nullptr}};
  for (const auto& [name, t] : tensors) {
    if (t == nullptr) {
      continue;
    }
    TORCH_CHECK_TYPE(
        t->scalar_type() == z.scalar_type(), "fused_mlp_backward: expected ", name,
        " to have the dtype of z (", z.scalar_type(), "), but got ", t->scalar_type());
    TORCH_CHECK(
        t->device() == z.device(), "fused_mlp_backward: expected ", name, " on the device of z (",
        z.device(), "), but got ", name, " on ", t->device());
  }
}

// The helpers below are shared with the gated op (gated.cpp; declared in mlp.h).

// out = beta * addend + op(a) op(b) (see DeviceKernels::matmul).
void matmul(
    const DeviceKernels& kernels,
    Tensor& out,
    const Tensor* addend,
    const Tensor& a,
    bool trans_a,
    const Tensor& b,
    bool trans_b,
    double beta) {
  if (kernels.matmul != nullptr) {
    kernels.matmul(out, addend, a, trans_a, b, trans_b, beta);
    return;
  }
  const Tensor lhs = trans_a ? a.t() : a, rhs = trans_b ? b.t() : b;
  if (addend == nullptr) {
    at::mm_out(out, lhs, rhs);
  } else {
    at::addmm_out(out, *addend, lhs, rhs, beta);
  }
}

// at::empty without the dispatcher on CPU: a small MLP's step allocates about
// ten tensors, and at that size each dispatch costs as much as its kernel.
Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? Tensor(at::detail::empty_cpu(sizes, options))
                                   : at::empty(sizes, options);
}

// A 0-dim zero; on CPU written in place rather than by a dispatched zero_().
Tensor zero_scalar(const at::TensorOptions& options) {
  Tensor s = empty({}, options);
  if (options.device().is_cpu()) {
    std::memset(s.data_ptr(), 0, s.nbytes());
  } else {
    s.zero_();
  }
  return s;
}

Tensor with_leading_dims(const Tensor& o, const Tensor& x) {
  if (x.dim() == 2) {
    return o;
  }
  auto o_shape = x.sizes().vec();
  o_shape.back() = o.size(1);
  return o.view(o_shape);
}

// g *= mask * dropout_scale(p).
void apply_dropout(const DeviceKernels& kernels, Tensor& g, const Tensor& mask, double p) {
  if (kernels.apply_dropout != nullptr) {
    kernels.apply_dropout(g, mask, p);
  } else {
    g.mul_(mask.to(g.scalar_type()).mul_(dropout_scale(p)));
  }
}

// mask drawn with keep probability 1 - p; h *= mask * dropout_scale(p).
void draw_dropout(const DeviceKernels& kernels, Tensor& h, Tensor& mask, double p) {
  if (p >= 1) {
    // Everything dropped, nothing drawn (as torch's dropout, which multiplies by
    // zeros then and leaves the generator as it is).
    mask.zero_();
    apply_dropout(kernels, h, mask, p);
  } else if (kernels.dropout != nullptr) {
    kernels.dropout(h, mask, p);
  } else {
    mask.bernoulli_(1 - p);
    apply_dropout(kernels, h, mask, p);
  }
}

void column_sums(const DeviceKernels& kernels, Tensor& out, const Tensor& g) {
  if (kernels.column_sums != nullptr) {
    kernels.column_sums(out, g);
  } else {
    at::sum_out(out, g, 0);
  }
}


ForwardResult fused_mlp_forward(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay,
    double dropout,
    bool keep_z) {
  const Activation act = parse_activation(activation);
  check_forward_inputs(x, w1, w2, b1, b2, weight_decay, dropout, kernels.reduced_precision);
  if (kernels.fully_fused_forward != nullptr) {
    if (auto result = kernels.fully_fused_forward(
            x, w1, w2, b1, b2, act, weight_decay, dropout, keep_z)) {
      return *std::move(result);
    }
  }

  // Leading dimensions flatten to n rows, as nn.Linear does; the product of the
  // leading sizes (not -1) keeps n = 0 well defined.
  const int64_t in_features = w1.size(1), hidden = w1.size(0), out_features = w2.size(0);
  const int64_t n = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const Tensor x2d = x.dim() == 2 ? x : x.reshape({n, in_features});
  const auto options = x.options();

  // b1 rides in the product as its addend, so that z is rounded once (as
  // nn.Linear's is): a half-precision product rounded before b1 is added would be
  // rounded twice.
  Tensor z = empty({n, hidden}, options);
  matmul(kernels, z, b1 ? &*b1 : nullptr, x2d, false, w1, /*trans_b=*/true);
  Tensor h = keep_z || !kernels.activation_in_place ? empty({n, hidden}, options) : z;
  kernels.bias_activation(z, h, std::nullopt, act);
  // dropout = 0: nothing drawn, no pass over h; the forward op's mask is a
  // 0-element tensor (no storage), as the op has to return a tensor; the
  // inference op returns none.
  const auto bool_options = options.dtype(at::kBool);
  Tensor mask = dropout > 0 ? empty({n, hidden}, bool_options)
      : keep_z              ? empty({0}, bool_options)
                            : Tensor();
  if (dropout > 0) {
    draw_dropout(kernels, h, mask, dropout);
  }
  Tensor o = empty({n, out_features}, options);
  matmul(kernels, o, b2 ? &*b2 : nullptr, h, false, w2, /*trans_b=*/true);

  Tensor s = weight_decay == 0 ? zero_scalar(options) : kernels.penalty(w1, w2, weight_decay);
  return {with_leading_dims(o, x), s, z, h, mask};
}

InferenceResult fused_mlp_inference(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay,
    double dropout) {
  auto result = fused_mlp_forward(
      kernels, x, w1, w2, b1, b2, activation, weight_decay, dropout, /*keep_z=*/false);
  return {std::get<0>(result), std::get<1>(result)};
}

// dW = G^T A + g_s * weight_decay * W: the decay term rides in the product's beta.
void weight_gradient(
    const DeviceKernels& kernels,
    Tensor& dw,
    const Tensor& g,
    const Tensor& a,
    const Tensor& w,
    const std::optional<Tensor>& grad_s,
    double weight_decay) {
  if (!grad_s || weight_decay == 0) {
    matmul(kernels, dw, nullptr, g, /*trans_a=*/true, a, false);
  } else if (grad_s->is_cpu()) {
    // Read in place: item() would be one more dispatch.
    const double g_s = grad_s->scalar_type() == at::kDouble ? *grad_s->const_data_ptr<double>()
        : grad_s->scalar_type() == at::kFloat             ? *grad_s->const_data_ptr<float>()
                                                          : grad_s->item<double>();
    matmul(kernels, dw, &w, g, /*trans_a=*/true, a, false, g_s * weight_decay);
  } else {
    // On an accelerator g_s stays on the device (reading it would synchronize).
    const Tensor scaled = w * *grad_s;
    matmul(kernels, dw, &scaled, g, /*trans_a=*/true, a, false, weight_decay);
  }
}


BackwardResult fused_mlp_backward(
    const DeviceKernels& kernels,
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& z,
    const std::optional<Tensor>& h,
    std::string_view activation,
    double weight_decay,
    std::array<bool, 5> output_mask,
    const std::optional<Tensor>& dropout_mask,
    double dropout) {
  const Activation act = parse_activation(activation);
  check_backward_inputs(grad_o, grad_s, x, w1, w2, z, h, dropout_mask, dropout);
  if (kernels.fully_fused_backward != nullptr) {
    if (auto result = kernels.fully_fused_backward(
            grad_o, grad_s, x, w1, w2, z, h, dropout_mask, act, weight_decay, output_mask)) {
      return *std::move(result);
    }
  }
  // With dropout, D = mask * dropout_scale: the saved h is already phi(Z) D, and
  // G_H = (G_O W2) D.
  const Tensor mask = dropout_mask ? dropout_mask->contiguous() : Tensor();
  const auto [need_dx, need_dw1, need_dw2, need_db1, need_db2] = output_mask;
  const int64_t n = z.size(0);
  const int64_t in_features = w1.size(1), hidden = w1.size(0), out_features = w2.size(0);
  const Tensor g_o = grad_o.dim() == 2 ? grad_o : grad_o.reshape({n, out_features});
  const auto options = z.options();

  Tensor dx, dw1, dw2, db1, db2;
  if (need_dw2) {
    Tensor saved_h;
    if (h) {
      saved_h = *h;
    } else {
      // save_hidden=False: H = phi(Z) again, by the forward's own kernel (bitwise the
      // same H); without b1 the kernel leaves z as it is.
      Tensor z_contiguous = z.contiguous();
      saved_h = empty(z_contiguous.sizes(), options);
      kernels.bias_activation(z_contiguous, saved_h, std::nullopt, act);
      if (mask.defined()) {  // the same mask by the same kernel: the forward's bits
        apply_dropout(kernels, saved_h, mask, dropout);
      }
    }
    dw2 = empty({out_features, hidden}, options);
    weight_gradient(kernels, dw2, g_o, saved_h, w2, grad_s, weight_decay);
  }
  if (need_db2) {
    db2 = empty({out_features}, options);
    column_sums(kernels, db2, g_o);
  }
  if (need_dx || need_dw1 || need_db1) {
    Tensor g = empty({n, hidden}, options);  // G_H, turned into G_Z in place
    matmul(kernels, g, nullptr, g_o, false, w2, false);
    if (mask.defined()) {
      apply_dropout(kernels, g, mask, dropout);
    }
    if (need_db1) {
      db1 = empty({hidden}, options);
    }
    kernels.activation_backward(g, z.contiguous(), db1, act);
    if (need_dw1) {
      dw1 = empty({hidden, in_features}, options);
      weight_gradient(
          kernels, dw1, g, x.dim() == 2 ? x : x.reshape({n, in_features}), w1, grad_s,
          weight_decay);
    }
    if (need_dx) {
      dx = empty({n, in_features}, options);
      matmul(kernels, dx, nullptr, g, false, w1, false);
      if (x.dim() != 2) {
        dx = dx.view(x.sizes());
      }
    }
  }
  return {dx, dw1, dw2, db1, db2};
}

}  // namespace mlp_ext
