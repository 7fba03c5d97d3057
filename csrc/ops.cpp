// mlp_ext's ops: every schema (declared once, here), the dispatcher handles of
// ops.h, two small diagnostic ops, and the Python module whose loading
// registers them all.
//
// The kernels are registered beside their code: fused_mlp and fused_mlp_loss
// (CompositeImplicitAutograd) in autograd.cpp, the loss ops' compositions
// (CompositeExplicitAutograd) in loss.cpp, each device's kernels of the three
// core ops in cpu/mlp_cpu.cpp and cuda/mlp_cuda.cpp.
#include <Python.h>

#include <torch/library.h>

#include <string>
#include <vector>

#include "cuda/narrow_path.h"
#include "ops.h"

namespace mlp_ext {

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The activation names, for the Python side (mlp_ext.ACTIVATIONS).
std::vector<std::string> activation_names() {
  std::vector<std::string> names;
  for (const Activation a : kActivations) {
    names.emplace_back(activation_name(a));
  }
  return names;
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
    c10::string_view mode,
    bool dropout) {
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
  p.dropout = dropout;
  const NarrowChoice choice = choose_narrow_path(*narrow_mode, p);
  return std::string(choice.fused ? "fused: " : "gemm: ") + choice.reason;
}

}  // namespace

const c10::TypedOperatorHandle<FusedMLPSignature>& fused_mlp_op() {
  static const auto op = find_op<FusedMLPSignature>("mlp_ext::fused_mlp");
  return op;
}

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op = find_op<ForwardSignature>("mlp_ext::fused_mlp_forward");
  return op;
}

const c10::TypedOperatorHandle<InferenceSignature>& inference_op() {
  static const auto op = find_op<InferenceSignature>("mlp_ext::fused_mlp_inference");
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = find_op<BackwardSignature>("mlp_ext::fused_mlp_backward");
  return op;
}

const c10::TypedOperatorHandle<LossForwardSignature>& loss_forward_op() {
  static const auto op = find_op<LossForwardSignature>("mlp_ext::fused_mlp_loss_forward");
  return op;
}

const c10::TypedOperatorHandle<LossBackwardSignature>& loss_backward_op() {
  static const auto op = find_op<LossBackwardSignature>("mlp_ext::fused_mlp_loss_backward");
  return op;
}

const c10::TypedOperatorHandle<GatedForwardSignature>& gated_forward_op() {
  static const auto op = find_op<GatedForwardSignature>("mlp_ext::gated_mlp_forward");
  return op;
}

const c10::TypedOperatorHandle<GatedInferenceSignature>& gated_inference_op() {
  static const auto op = find_op<GatedInferenceSignature>("mlp_ext::gated_mlp_inference");
  return op;
}

const c10::TypedOperatorHandle<GatedBackwardSignature>& gated_backward_op() {
  static const auto op = find_op<GatedBackwardSignature>("mlp_ext::gated_mlp_backward");
  return op;
}

TORCH_LIBRARY(mlp_ext, m) {
  // The ops that may draw a dropout mask from the device's generator are tagged
  // nondeterministic_seeded, so that graph passes neither merge two calls nor
  // drop or recompute one (FX counts them impure).
  const std::vector<at::Tag> seeded = {at::Tag::nondeterministic_seeded};
  // The public ops (mlp_ext.fused_mlp, mlp_ext.fused_mlp_loss).
  m.def(
      "fused_mlp(Tensor x, Tensor w1, Tensor w2, Tensor? b1=None, Tensor? b2=None, *, "
      "str activation=\"relu\", float weight_decay=0.0, bool save_hidden=True, "
      "float dropout=0.0) -> (Tensor o, Tensor s)",
      seeded);
  m.def(
      "fused_mlp_loss(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1=None, "
      "Tensor? b2=None, *, str activation=\"relu\", float weight_decay=0.0, "
      "str loss=\"cross_entropy\", str reduction=\"mean\", bool save_hidden=True, "
      "float dropout=0.0) -> (Tensor J, Tensor o)",
      seeded);
  // What their autograd nodes call: one op for the forward, one for the backward.
  // The forward returns the dropout mask (n x hidden_features bool; 0 elements
  // when dropout = 0), which the node saves and hands to the backward.
  m.def(
      "fused_mlp_forward(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
      "str activation, float weight_decay, float dropout=0.0) -> "
      "(Tensor o, Tensor s, Tensor z, Tensor h, Tensor mask)",
      seeded);
  m.def(
      "fused_mlp_inference(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
      "str activation, float weight_decay, float dropout=0.0) -> (Tensor o, Tensor s)",
      seeded);
  m.def(
      "fused_mlp_backward(Tensor grad_o, Tensor? grad_s, Tensor x, Tensor w1, Tensor w2, "
      "Tensor z, Tensor? h, str activation, float weight_decay, bool[5] output_mask, "
      "Tensor? dropout_mask=None, float dropout=0.0) -> "
      "(Tensor dx, Tensor dw1, Tensor dw2, Tensor db1, Tensor db2)");
  m.def(
      "fused_mlp_loss_forward(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1, "
      "Tensor? b2, str activation, float weight_decay, str loss, str reduction, "
      "bool keep_gradient, float dropout=0.0) -> "
      "(Tensor J, Tensor o, Tensor dloss_do, Tensor z, Tensor h, Tensor mask)",
      seeded);
  m.def(
      "fused_mlp_loss_backward(Tensor? grad_J, Tensor? grad_o, Tensor dloss_do, Tensor x, "
      "Tensor w1, Tensor w2, Tensor z, Tensor? h, str activation, float weight_decay, "
      "bool[5] output_mask, Tensor? dropout_mask=None, float dropout=0.0) -> "
      "(Tensor dx, Tensor dw1, Tensor dw2, Tensor db1, Tensor db2)");
  // The gated feed-forward block (SwiGLU / GeGLU / ReGLU / GLU; csrc/gated.h):
  // the public op, and what its autograd node calls. z = [Z_g | Z_u] (n x 2h).
  m.def(
      "gated_mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? b_gate=None, "
      "Tensor? b_up=None, Tensor? b_down=None, *, str activation=\"silu\", "
      "float weight_decay=0.0, bool save_hidden=True) -> (Tensor o, Tensor s)");
  m.def(
      "gated_mlp_forward(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? b_gate, "
      "Tensor? b_up, Tensor? b_down, str activation, float weight_decay) -> "
      "(Tensor o, Tensor s, Tensor z, Tensor h)");
  m.def(
      "gated_mlp_inference(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? b_gate, "
      "Tensor? b_up, Tensor? b_down, str activation, float weight_decay) -> (Tensor o, Tensor s)");
  m.def(
      "gated_mlp_backward(Tensor grad_o, Tensor? grad_s, Tensor x, Tensor w_gate, Tensor w_up, "
      "Tensor w_down, Tensor z, Tensor? h, str activation, float weight_decay, "
      "bool[7] output_mask) -> (Tensor dx, Tensor dw_gate, Tensor dw_up, Tensor dw_down, "
      "Tensor db_gate, Tensor db_up, Tensor db_down)");
  // Diagnostics (no tensors: one kernel for every device).
  m.def("_activation_names() -> str[]", TORCH_FN(activation_names));
  m.def(
      "_narrow_path_choice(int n, int d, int h, int q, ScalarType dtype, bool allow_tf32, "
      "bool aligned, int compute_capability, int smem_per_block, str mode, "
      "bool dropout=False) -> str",
      TORCH_FN(narrow_path_choice));
}

}  // namespace mlp_ext

// `import mlp_ext._C` loads this library, whose static initializers register
// the ops with the dispatcher; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
