// phi from differentiable ATen ops: what the create_graph paths of the autograd
// nodes (autograd.cpp, gated_autograd.cpp) differentiate for exact second
// derivatives. The kernels' own phi is activation.h's.
#pragma once

#include <ATen/ATen.h>

#include "activation.h"

namespace mlp_ext {

inline at::Tensor activation_op(const at::Tensor& z, Activation act) {
  switch (act) {
    case Activation::Identity: return z;
    case Activation::Relu: return at::relu(z);
    case Activation::Sigmoid: return at::sigmoid(z);
    case Activation::Tanh: return at::tanh(z);
    case Activation::Gelu: return at::gelu(z, "none");
    case Activation::GeluTanh: return at::gelu(z, "tanh");
    case Activation::Silu: return at::silu(z);
    case Activation::QuickGelu: return z * at::sigmoid(z * Act<Activation::QuickGelu>::kAlpha);
  }
  TORCH_INTERNAL_ASSERT(false, "unreachable");
}

}  // namespace mlp_ext
