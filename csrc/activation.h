// The activations phi of the fused MLP: each one's enum value, name and math
// (phi and its derivative phi').
//
// This header is the one place that holds them. It includes no torch header, so
// the CPU kernels (with at::vec::Vectorized) and the raw CUDA kernels share it:
// every formula is written once over a value type V whose primitives (exp, tanh,
// erf, relu, step) come from Math<V>. The Python side takes the names from here
// (torch.ops.mlp_ext._activation_names).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string_view>

#if defined(__CUDACC__)
#define MLP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLP_HOST_DEVICE inline
#endif

namespace mlp_ext {

// The values are part of no public ABI; the op schemas take the names below.
enum class Activation : int64_t {
  Identity,
  Relu,
  Sigmoid,
  Tanh,
  Gelu,      // exact: z * Phi(z), Phi the standard normal CDF (erf form)
  GeluTanh,  // the tanh approximation of GELU
  Silu,
  QuickGelu,  // z * sigmoid(1.702 z): CLIP's (and OpenAI's CLIP checkpoints') activation
};

// The name the op schemas take (the one torch gives the function, where it has one).
constexpr std::string_view activation_name(Activation a) {
  switch (a) {
    case Activation::Identity: return "identity";
    case Activation::Relu: return "relu";
    case Activation::Sigmoid: return "sigmoid";
    case Activation::Tanh: return "tanh";
    case Activation::Gelu: return "gelu";
    case Activation::GeluTanh: return "gelu_tanh";
    case Activation::Silu: return "silu";
    case Activation::QuickGelu: return "quick_gelu";
  }
  return {};
}

// Every activation, in the enum's order.
inline constexpr Activation kActivations[] = {
    Activation::Identity, Activation::Relu, Activation::Sigmoid, Activation::Tanh,
    Activation::Gelu,     Activation::GeluTanh, Activation::Silu, Activation::QuickGelu};
// The value after the last one listed has no name: kActivations covers the enum.
static_assert(
    activation_name(static_cast<Activation>(std::size(kActivations))).empty(),
    "kActivations must list every Activation");

// The activation of a schema name; nullopt for an unknown name.
constexpr std::optional<Activation> find_activation(std::string_view name) {
  for (const Activation a : kActivations) {
    if (activation_name(a) == name) {
      return a;
    }
  }
  return std::nullopt;
}

// Primitives for a scalar V (float or double; CUDA half types compute in float).
// cpu/kernels_impl.h specialises Math for at::vec::Vectorized<T>.
template <typename V>
struct Math {
  MLP_HOST_DEVICE static V constant(double c) { return static_cast<V>(c); }
  MLP_HOST_DEVICE static V exp(V x) { return std::exp(x); }
  MLP_HOST_DEVICE static V tanh(V x) { return std::tanh(x); }
  MLP_HOST_DEVICE static V erf(V x) { return std::erf(x); }
  // Written so that NaN propagates (torch.relu(nan) is nan; fmax would give 0).
  MLP_HOST_DEVICE static V relu(V x) { return x < V(0) ? V(0) : x; }
  // relu'(z) as torch's threshold_backward defines it: 0 for z <= 0, else 1
  // (so 1 at NaN, where the incoming gradient passes through).
  MLP_HOST_DEVICE static V step(V x) { return x <= V(0) ? V(0) : V(1); }
};

template <Activation A>
struct Act;

template <>
struct Act<Activation::Identity> {
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) { return z; }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V) { return Math<V>::constant(1.0); }
};

template <>
struct Act<Activation::Relu> {
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) { return Math<V>::relu(z); }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) { return Math<V>::step(z); }
};

template <>
struct Act<Activation::Sigmoid> {
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) {
    using M = Math<V>;
    return M::constant(1.0) / (M::constant(1.0) + M::exp(M::constant(0.0) - z));
  }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) {
    const V s = forward(z);
    return s * (Math<V>::constant(1.0) - s);
  }
};

template <>
struct Act<Activation::Tanh> {
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) { return Math<V>::tanh(z); }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) {
    const V t = Math<V>::tanh(z);
    return Math<V>::constant(1.0) - t * t;
  }
};

template <>
struct Act<Activation::Gelu> {
  static constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/sqrt(2)
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/sqrt(2 pi)
  template <typename V>
  MLP_HOST_DEVICE static V cdf(V z) {
    using M = Math<V>;
    return M::constant(0.5) * (M::constant(1.0) + M::erf(z * M::constant(kSqrtHalf)));
  }
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) { return z * cdf(z); }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) {
    using M = Math<V>;
    const V pdf = M::exp(M::constant(-0.5) * z * z) * M::constant(kInvSqrt2Pi);
    return cdf(z) + z * pdf;
  }
};

template <>
struct Act<Activation::GeluTanh> {
  static constexpr double kBeta = 0.79788456080286535588;  // sqrt(2/pi)
  static constexpr double kKappa = 0.044715;
  template <typename V>
  MLP_HOST_DEVICE static V inner_tanh(V z) {
    using M = Math<V>;
    return M::tanh(M::constant(kBeta) * (z + M::constant(kKappa) * z * z * z));
  }
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) {
    using M = Math<V>;
    return M::constant(0.5) * z * (M::constant(1.0) + inner_tanh(z));
  }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) {
    using M = Math<V>;
    const V t = inner_tanh(z);
    const V dinner = M::constant(kBeta) * (M::constant(1.0) + M::constant(3.0 * kKappa) * z * z);
    return M::constant(0.5) * (M::constant(1.0) + t) +
        M::constant(0.5) * z * (M::constant(1.0) - t * t) * dinner;
  }
};

template <>
struct Act<Activation::Silu> {
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) { return z * Act<Activation::Sigmoid>::forward(z); }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) {
    using M = Math<V>;
    const V s = Act<Activation::Sigmoid>::forward(z);
    return s * (M::constant(1.0) + z * (M::constant(1.0) - s));
  }
};

// quick_gelu(z) = z sigmoid(a z), a = 1.702 (Hendrycks & Gimpel's sigmoid
// approximation of GELU, as CLIP / transformers' QuickGELUActivation compute it):
// silu of a z, divided by a. phi'(z) = s (1 + a z (1 - s)), s = sigmoid(a z).
template <>
struct Act<Activation::QuickGelu> {
  static constexpr double kAlpha = 1.702;
  template <typename V>
  MLP_HOST_DEVICE static V forward(V z) {
    return z * Act<Activation::Sigmoid>::forward(Math<V>::constant(kAlpha) * z);
  }
  template <typename V>
  MLP_HOST_DEVICE static V derivative(V z) {
    using M = Math<V>;
    const V az = M::constant(kAlpha) * z;
    const V s = Act<Activation::Sigmoid>::forward(az);
    return s * (M::constant(1.0) + az * (M::constant(1.0) - s));
  }
};

// Calls f(Act<A>{}) for the run-time activation a, so kernels are instantiated
// once per activation and the activation is a compile-time constant inside them.
template <typename F>
inline void visit_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Identity: f(Act<Activation::Identity>{}); return;
    case Activation::Relu: f(Act<Activation::Relu>{}); return;
    case Activation::Sigmoid: f(Act<Activation::Sigmoid>{}); return;
    case Activation::Tanh: f(Act<Activation::Tanh>{}); return;
    case Activation::Gelu: f(Act<Activation::Gelu>{}); return;
    case Activation::GeluTanh: f(Act<Activation::GeluTanh>{}); return;
    case Activation::Silu: f(Act<Activation::Silu>{}); return;
    case Activation::QuickGelu: f(Act<Activation::QuickGelu>{}); return;
  }
}

}  // namespace mlp_ext
