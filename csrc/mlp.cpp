// The fused MLP operator, device-independent part: the op schemas (declared
// once, here), argument checks, the matrix-product orchestration shared by every
// device, and the autograd node (a C++ torch::autograd::Function, so a training
// step runs no Python between the op call and the gradients).
#include <Python.h>

#include <ATen/EmptyTensor.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <string>

#include "cuda/narrow_path.h"
#include "mlp.h"

namespace mlp_ext {

namespace {

constexpr std::string_view kActivationNames[] = {
    "identity", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh", "silu"};

std::string valid_activations() {
  std::string names;
  for (auto name : kActivationNames) {
    names += names.empty() ? "" : ", ";
    names += '"';
    names += name;
    names += '"';
  }
  return names;
}

// Every tensor argument shares the dtype and the device of x.
void check_like_x(const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(),
      "fused_mlp: expected ", name, " to have the dtype of x (", x.scalar_type(), "), but got ",
      t.scalar_type());
  TORCH_CHECK(
      t.device() == x.device(),
      "fused_mlp: expected ", name, " on the device of x (", x.device(), "), but got ", name,
      " on ", t.device());
}

void check_bias(
    const char* name, const std::optional<Tensor>& b, int64_t size, const char* what,
    const Tensor& x) {
  if (!b) {
    return;
  }
  TORCH_CHECK(
      b->dim() == 1 && b->size(0) == size,
      "fused_mlp: expected ", name, " of shape (", what, ",) = [", size, "], but got ", name,
      ".shape = ", b->sizes());
  check_like_x(name, *b, x);
}

}  // namespace

Activation parse_activation(std::string_view name) {
  for (size_t i = 0; i < std::size(kActivationNames); ++i) {
    if (name == kActivationNames[i]) {
      return static_cast<Activation>(i);
    }
  }
  TORCH_CHECK_VALUE(
      false, "fused_mlp: unknown activation \"", name, "\"; expected one of ",
      valid_activations());
}

void check_forward_inputs(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    double weight_decay,
    bool allow_reduced_precision) {
  TORCH_CHECK_VALUE(
      std::isfinite(weight_decay) && weight_decay >= 0,
      "fused_mlp: expected weight_decay to be a finite number >= 0, but got ", weight_decay);
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
  check_like_x("w1", w1, x);
  check_like_x("w2", w2, x);
  check_bias("b1", b1, w1.size(0), "hidden_features", x);
  check_bias("b2", b2, w2.size(0), "out_features", x);
}

void check_backward_inputs(
    const Tensor& grad_o,
    const std::optional<Tensor>& grad_s,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const Tensor& z,
    const std::optional<Tensor>& h) {
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

namespace {

// out = beta * addend + op(a) op(b) (see DeviceKernels::matmul).
void matmul(
    const DeviceKernels& kernels,
    Tensor& out,
    const Tensor* addend,
    const Tensor& a,
    bool trans_a,
    const Tensor& b,
    bool trans_b,
    double beta = 1.0) {
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

void column_sums(const DeviceKernels& kernels, Tensor& out, const Tensor& g) {
  if (kernels.column_sums != nullptr) {
    kernels.column_sums(out, g);
  } else {
    at::sum_out(out, g, 0);
  }
}

}  // namespace

ForwardResult fused_mlp_forward(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay,
    bool keep_z) {
  const Activation act = parse_activation(activation);
  check_forward_inputs(x, w1, w2, b1, b2, weight_decay, kernels.reduced_precision);

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
  Tensor o = empty({n, out_features}, options);
  matmul(kernels, o, b2 ? &*b2 : nullptr, h, false, w2, /*trans_b=*/true);

  Tensor s = weight_decay == 0 ? empty({}, options).zero_() : kernels.penalty(w1, w2, weight_decay);
  if (x.dim() != 2) {
    auto o_shape = x.sizes().vec();
    o_shape.back() = out_features;
    o = o.view(o_shape);
  }
  return {o, s, z, h};
}

InferenceResult fused_mlp_inference(
    const DeviceKernels& kernels,
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    std::string_view activation,
    double weight_decay) {
  auto [o, s, z, h] =
      fused_mlp_forward(kernels, x, w1, w2, b1, b2, activation, weight_decay, /*keep_z=*/false);
  return {o, s};
}

namespace {

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

}  // namespace

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
    std::array<bool, 5> output_mask) {
  const Activation act = parse_activation(activation);
  check_backward_inputs(grad_o, grad_s, x, w1, w2, z, h);
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

namespace {

Tensor activation_op(const Tensor& z, Activation act) {
  switch (act) {
    case Activation::Identity: return z;
    case Activation::Relu: return at::relu(z);
    case Activation::Sigmoid: return at::sigmoid(z);
    case Activation::Tanh: return at::tanh(z);
    case Activation::Gelu: return at::gelu(z, "none");
    case Activation::GeluTanh: return at::gelu(z, "tanh");
    case Activation::Silu: return at::silu(z);
  }
  TORCH_INTERNAL_ASSERT(false, "unreachable");
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Saved for backward: x, w1, w2, b1 (if given; read only for second
// derivatives), and the intermediates z and h of the forward (z only when
// save_hidden is false: the backward then recomputes h = phi(z)).
class FusedMLPFunction : public torch::autograd::Function<FusedMLPFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const Tensor& w1,
      const Tensor& w2,
      const std::optional<Tensor>& b1,
      const std::optional<Tensor>& b2,
      std::string_view activation,
      double weight_decay,
      bool save_hidden) {
    // Function::apply turns grad mode off but leaves the autograd keys on: skip
    // them, or the call would go through the (boxed) autograd fallback.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [o, s, z, h] = forward_op().call(x, w1, w2, b1, b2, activation, weight_decay);
    ctx->save_for_backward({x, w1, w2, b1.value_or(Tensor()), z, save_hidden ? h : Tensor()});
    ctx->saved_data["activation"] = static_cast<int64_t>(parse_activation(activation));
    ctx->saved_data["weight_decay"] = weight_decay;
    ctx->saved_data["has_b2"] = b2.has_value();
    ctx->set_materialize_grads(false);
    return {o, s};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w1 = saved[1], &w2 = saved[2], &b1 = saved[3];
    const Tensor &z = saved[4], &h = saved[5];
    const auto act = static_cast<Activation>(ctx->saved_data["activation"].toInt());
    const double weight_decay = ctx->saved_data["weight_decay"].toDouble();
    const Tensor &grad_o = grads[0], &grad_s = grads[1];
    // needs_input_grad counts only the tensors given: an absent b1 shifts b2.
    const bool has_b2 = ctx->saved_data["has_b2"].toBool();
    const size_t b2_edge = b1.defined() ? 4 : 3;
    const std::array<bool, 5> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
        b1.defined() && ctx->needs_input_grad(3), has_b2 && ctx->needs_input_grad(b2_edge)};

    Tensor dx, dw1, dw2, db1, db2;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: recompute the forward from differentiable ATen ops and
      // differentiate it, so second derivatives are exact. Only taken on demand.
      std::tie(dx, dw1, dw2, db1, db2) =
          differentiable_backward(x, w1, w2, b1, grad_o, mask, act);
    } else if (grad_o.defined()) {
      // fused_mlp_backward has no autograd kernel of its own: go straight to
      // the device kernel instead of through the (boxed) autograd fallback.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(dx, dw1, dw2, db1, db2) = backward_op().call(
          grad_o, grad_s.defined() ? std::optional<Tensor>(grad_s) : std::nullopt, x, w1, w2,
          z, h.defined() ? std::optional<Tensor>(h) : std::nullopt,
          kActivationNames[static_cast<size_t>(act)], weight_decay, mask);
      return {dx, dw1, dw2, db1, db2, Tensor(), Tensor(), Tensor()};
    }
    // Only s reached the loss, or the differentiable path: add g_s * lambda * W.
    if (grad_s.defined() && weight_decay != 0) {
      if (mask[1]) {
        const Tensor decay = w1 * (grad_s * weight_decay);
        dw1 = dw1.defined() ? dw1 + decay : decay;
      }
      if (mask[2]) {
        const Tensor decay = w2 * (grad_s * weight_decay);
        dw2 = dw2.defined() ? dw2 + decay : decay;
      }
    }
    return {dx, dw1, dw2, db1, db2, Tensor(), Tensor(), Tensor()};
  }

 private:
  static BackwardResult differentiable_backward(
      const Tensor& x,
      const Tensor& w1,
      const Tensor& w2,
      const Tensor& b1,
      const Tensor& grad_o,
      const std::array<bool, 5>& mask,
      Activation act) {
    if (!grad_o.defined()) {
      return {};
    }
    Tensor z = at::matmul(x, w1.t());
    if (b1.defined()) {
      z = z + b1;
    }
    const Tensor o = at::matmul(activation_op(z, act), w2.t());  // b2 drops out of every derivative
    std::vector<Tensor> inputs;
    const Tensor* candidates[] = {&x, &w1, &w2, &b1};
    for (size_t i = 0; i < 4; ++i) {
      if (mask[i]) {
        inputs.push_back(*candidates[i]);
      }
    }
    std::vector<Tensor> grads;
    if (!inputs.empty()) {
      grads = torch::autograd::grad(
          {o}, inputs, {grad_o}, /*retain_graph=*/true, /*create_graph=*/true,
          /*allow_unused=*/true);
    }
    Tensor result[5];
    for (size_t i = 0, k = 0; i < 4; ++i) {
      if (mask[i]) {
        result[i] = grads[k++];
      }
    }
    if (mask[4]) {
      result[4] = grad_o.reshape({-1, w2.size(0)}).sum(0);
    }
    return {result[0], result[1], result[2], result[3], result[4]};
  }
};

// Whether the call must be recorded for a derivative: backward (grad mode on
// and an input requiring grad) or forward mode (an input with a tangent, which
// FusedMLPFunction rejects with a clear error).
bool needs_autograd(std::initializer_list<const Tensor*> inputs) {
  const bool grad_mode = at::GradMode::is_enabled();
  for (const Tensor* t : inputs) {
    if (t->defined() && ((grad_mode && t->requires_grad()) || t->_fw_grad(0).defined())) {
      return true;
    }
  }
  return false;
}

std::tuple<Tensor, Tensor> fused_mlp_autograd(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    bool save_hidden) {
  const Tensor none;
  if (!needs_autograd({&x, &w1, &w2, b1 ? &*b1 : &none, b2 ? &*b2 : &none})) {
    // Inference: no autograd node to build, nothing to save.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return inference_op().call(x, w1, w2, b1, b2, activation, weight_decay);
  }
  auto outputs =
      FusedMLPFunction::apply(x, w1, w2, b1, b2, activation, weight_decay, save_hidden);
  return {outputs[0], outputs[1]};
}

// For tests and diagnostics: which path the CUDA op takes for a problem of these
// properties (choose_narrow_path): "fused: <why>" or "gemm: <why>".
std::string narrow_path_choice(
    int64_t n,
    int64_t d,
    int64_t h,
    int64_t q,
    at::ScalarType dtype,
    bool allow_tf32,
    bool aligned,
    int64_t compute_capability,
    int64_t smem_per_block,
    c10::string_view mode) {
  const auto narrow_mode = parse_narrow_mode(mode);
  TORCH_CHECK_VALUE(
      narrow_mode, "_narrow_path_choice: expected mode \"off\", \"on\" or \"auto\", but got \"",
      mode, "\"");
  NarrowProblem p;
  p.n = n, p.d = d, p.h = h, p.q = q;
  p.dtype = dtype == at::kHalf       ? std::optional<NarrowDType>(NarrowDType::Float16)
      : dtype == at::kBFloat16       ? std::optional<NarrowDType>(NarrowDType::BFloat16)
      : dtype == at::kFloat          ? std::optional<NarrowDType>(NarrowDType::Float32)
                                     : std::nullopt;
  p.allow_tf32 = allow_tf32, p.aligned = aligned;
  p.compute_capability = static_cast<int>(compute_capability);
  p.smem_per_block = static_cast<int>(smem_per_block);
  const NarrowChoice choice = choose_narrow_path(*narrow_mode, p);
  return std::string(choice.fused ? "fused: " : "gemm: ") + choice.reason;
}

}  // namespace

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlp_ext::fused_mlp_forward", "")
                             .typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<InferenceSignature>& inference_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlp_ext::fused_mlp_inference", "")
                             .typed<InferenceSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlp_ext::fused_mlp_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

TORCH_LIBRARY(mlp_ext, m) {
  m.def(
      "fused_mlp(Tensor x, Tensor w1, Tensor w2, Tensor? b1=None, Tensor? b2=None, *, "
      "str activation=\"relu\", float weight_decay=0.0, bool save_hidden=True) -> "
      "(Tensor o, Tensor s)");
  m.def(
      "fused_mlp_forward(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
      "str activation, float weight_decay) -> (Tensor o, Tensor s, Tensor z, Tensor h)");
  m.def(
      "fused_mlp_inference(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
      "str activation, float weight_decay) -> (Tensor o, Tensor s)");
  m.def(
      "fused_mlp_backward(Tensor grad_o, Tensor? grad_s, Tensor x, Tensor w1, Tensor w2, "
      "Tensor z, Tensor? h, str activation, float weight_decay, bool[5] output_mask) -> "
      "(Tensor dx, Tensor dw1, Tensor dw2, Tensor db1, Tensor db2)");
  m.impl("fused_mlp", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(fused_mlp_autograd));
  m.def(
      "_narrow_path_choice(int n, int d, int h, int q, ScalarType dtype, bool allow_tf32, "
      "bool aligned, int compute_capability, int smem_per_block, str mode) -> str",
      TORCH_FN(narrow_path_choice));
}

}  // namespace mlp_ext

// `import mlp_ext._C` loads this library, whose static initializers register
// the ops with the dispatcher; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
