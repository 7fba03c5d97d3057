// The dispatcher's typed handles of mlp_ext's ops (declared in ops.cpp), looked
// up once: the composite ops and the autograd nodes call the device kernels and
// each other through them.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include "gated.h"
#include "mlp.h"

namespace mlp_ext {

// J, o, dL/do, z, h, mask
using LossForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

using FusedMLPSignature = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, c10::string_view, double, bool, double);
using ForwardSignature = ForwardResult(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, c10::string_view, double, double);
using InferenceSignature = InferenceResult(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, c10::string_view, double, double);
using BackwardSignature = BackwardResult(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const std::optional<Tensor>&, c10::string_view, double, std::array<bool, 5>,
    const std::optional<Tensor>&, double);
using LossForwardSignature = LossForwardResult(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, c10::string_view, double, c10::string_view, c10::string_view,
    bool, double);
using LossBackwardSignature = BackwardResult(
    const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
    double, std::array<bool, 5>, const std::optional<Tensor>&, double);

// The gated ops (gated.h).
using GatedForwardSignature = GatedForwardResult(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, c10::string_view, double);
using GatedInferenceSignature = InferenceResult(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
    const std::optional<Tensor>&, const std::optional<Tensor>&, c10::string_view, double);
using GatedBackwardSignature = GatedBackwardResult(
    const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view, double,
    std::array<bool, 7>);

const c10::TypedOperatorHandle<FusedMLPSignature>& fused_mlp_op();
const c10::TypedOperatorHandle<ForwardSignature>& forward_op();
const c10::TypedOperatorHandle<InferenceSignature>& inference_op();
const c10::TypedOperatorHandle<BackwardSignature>& backward_op();
const c10::TypedOperatorHandle<LossForwardSignature>& loss_forward_op();
const c10::TypedOperatorHandle<LossBackwardSignature>& loss_backward_op();
const c10::TypedOperatorHandle<GatedForwardSignature>& gated_forward_op();
const c10::TypedOperatorHandle<GatedInferenceSignature>& gated_inference_op();
const c10::TypedOperatorHandle<GatedBackwardSignature>& gated_backward_op();

}  // namespace mlp_ext
