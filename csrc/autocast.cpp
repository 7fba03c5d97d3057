// torch.autocast for the public ops, one implementation for every device type
// (registered for AutocastCPU and AutocastCUDA below), following what autocast
// does to nn.Linear and to torch's losses on that device:
//
// - fused_mlp (and gated_mlp, three linears) is treated like aten::linear (a "lower_precision_fp" op on CPU
//   and CUDA): its floating inputs on the autocast device, other than float64,
//   are cast to the device's autocast dtype (at::autocast::get_autocast_dtype;
//   bfloat16 by default on CPU, float16 on CUDA), then the op runs below
//   autocast, so o and s come out in that dtype. float64 inputs are left alone.
// - fused_mlp_loss is the products of fused_mlp followed by cross_entropy /
//   mse_loss, which autocast runs in float32 ("fp32" ops on CPU and CUDA):
//   the inputs are cast like fused_mlp's (a class-probability target too, as it
//   must have x's dtype), the op takes its loss in float32 internally (as it
//   does for half-precision inputs anyway), and J is returned in float32 as
//   torch's loss would be. Its value carries the half-precision rounding of
//   the op's J (the loss is computed in float32 and rounded once, with s, to
//   the autocast dtype); its gradients are those of the autocast Sequential.
//
// Why on the composite ops and not on fused_mlp_forward: the Autocast keys sit
// above Autograd, so these casts are recorded by autograd (cached_cast is
// Tensor::to) and the op's autograd node sees, saves and differentiates the
// cast tensors only. Its backward then runs entirely in the autocast dtype
// (fused_mlp_backward gets matching dtypes), and the casts' own backward returns
// each gradient in its parameter's dtype, as with nn.Linear. A cast inside
// fused_mlp_forward instead would leave the node with float32 saved inputs, a
// half-precision z/h and grad_o, and gradients of mixed dtype.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "ops.h"

namespace mlp_ext {

namespace {

using FusedMLPLossSignature = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, c10::string_view, double, c10::string_view, c10::string_view,
    bool, double);

const c10::TypedOperatorHandle<FusedMLPLossSignature>& fused_mlp_loss_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlp_ext::fused_mlp_loss", "")
                             .typed<FusedMLPLossSignature>();
  return op;
}

using GatedMLPSignature = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, c10::string_view, double, bool);

const c10::TypedOperatorHandle<GatedMLPSignature>& gated_mlp_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mlp_ext::gated_mlp", "")
                             .typed<GatedMLPSignature>();
  return op;
}

// Casts the inputs of one call to the autocast dtype of `device`, or leaves
// them all alone: with tensors on several devices nothing is cast, so that the
// argument checks report the device mismatch rather than a dtype mismatch that
// casting made.
template <c10::DeviceType device>
struct AutocastInputs {
  bool cast;
  at::ScalarType dtype;

  explicit AutocastInputs(std::initializer_list<const std::optional<Tensor>*> tensors)
      : cast(true), dtype(at::autocast::get_autocast_dtype(device)) {
    std::optional<c10::Device> first;
    for (const auto* t : tensors) {
      if (!t->has_value()) {
        continue;
      }
      const c10::Device d = (*t)->device();
      cast = cast && d.type() == device && (!first || d == *first);
      first = first ? first : d;
    }
  }

  // cached_cast casts floating tensors of `device` other than float64 only
  // (at::autocast::is_eligible), and caches the casts of leaf parameters for
  // the autocast region, as for nn.Linear's weights.
  Tensor operator()(const Tensor& t) const {
    return cast ? at::autocast::cached_cast(dtype, t, device) : t;
  }
  std::optional<Tensor> operator()(const std::optional<Tensor>& t) const {
    return cast ? at::autocast::cached_cast(dtype, t, device) : t;
  }
};

constexpr c10::DispatchKey autocast_key(c10::DeviceType device) {
  return device == c10::DeviceType::CUDA ? c10::DispatchKey::AutocastCUDA
                                         : c10::DispatchKey::AutocastCPU;
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> fused_mlp_autocast(
    const Tensor& x,
    const Tensor& w1,
    const Tensor& w2,
    const std::optional<Tensor>& b1,
    const std::optional<Tensor>& b2,
    c10::string_view activation,
    double weight_decay,
    bool save_hidden,
    double dropout) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(device));
  const std::optional<Tensor> x_opt(x), w1_opt(w1), w2_opt(w2);
  const AutocastInputs<device> cast({&x_opt, &w1_opt, &w2_opt, &b1, &b2});
  return fused_mlp_op().call(
      cast(x), cast(w1), cast(w2), cast(b1), cast(b2), activation, weight_decay, save_hidden,
      dropout);
}

template <c10::DeviceType device>
std::tuple<Tensor, Tensor> fused_mlp_loss_autocast(
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
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(device));
  const std::optional<Tensor> x_opt(x), target_opt(target), w1_opt(w1), w2_opt(w2);
  const AutocastInputs<device> cast({&x_opt, &target_opt, &w1_opt, &w2_opt, &b1, &b2});
  auto [objective, o] = fused_mlp_loss_op().call(
      cast(x), cast(target), cast(w1), cast(w2), cast(b1), cast(b2), activation, weight_decay,
      loss, reduction, save_hidden, dropout);
  // J in float32, as autocast returns torch's losses (float64 stays float64).
  if (cast.cast && (objective.scalar_type() == at::kHalf ||
                    objective.scalar_type() == at::kBFloat16)) {
    objective = objective.to(at::kFloat);
  }
  return {objective, o};
}

// The gated block's three products are linears too: cast as fused_mlp.
template <c10::DeviceType device>
std::tuple<Tensor, Tensor> gated_mlp_autocast(
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
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key(device));
  const std::optional<Tensor> x_opt(x), w_gate_opt(w_gate), w_up_opt(w_up), w_down_opt(w_down);
  const AutocastInputs<device> cast(
      {&x_opt, &w_gate_opt, &w_up_opt, &w_down_opt, &b_gate, &b_up, &b_down});
  return gated_mlp_op().call(
      cast(x), cast(w_gate), cast(w_up), cast(w_down), cast(b_gate), cast(b_up), cast(b_down),
      activation, weight_decay, save_hidden);
}

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, AutocastCPU, m) {
  m.impl("fused_mlp", TORCH_FN(fused_mlp_autocast<c10::DeviceType::CPU>));
  m.impl("fused_mlp_loss", TORCH_FN(fused_mlp_loss_autocast<c10::DeviceType::CPU>));
  m.impl("gated_mlp", TORCH_FN(gated_mlp_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(mlp_ext, AutocastCUDA, m) {
  m.impl("fused_mlp", TORCH_FN(fused_mlp_autocast<c10::DeviceType::CUDA>));
  m.impl("fused_mlp_loss", TORCH_FN(fused_mlp_loss_autocast<c10::DeviceType::CUDA>));
  m.impl("gated_mlp", TORCH_FN(gated_mlp_autocast<c10::DeviceType::CUDA>));
}

}  // namespace mlp_ext
