// The gated op's CPU elementwise kernels over at::vec::Vectorized, with the
// phi / phi' of activation.h (through kernels_impl.h's Math<Vectorized>).
// Included at the end of kernels_impl.h (see gated_kernels.h); defines and
// registers kGatedTable in namespace mlp_ext::CPU_CAPABILITY.
#include "gated_kernels.h"

#define MLP_EXT_STRINGIFY_(x) #x
#define MLP_EXT_STRINGIFY(x) MLP_EXT_STRINGIFY_(x)

namespace mlp_ext {
namespace CPU_CAPABILITY {
namespace {

// Rows split over the threads; each row's columns in vector steps.
template <typename F>
void for_each_row(int64_t rows, int64_t width, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      f(i);
    }
  });
}

// Lanes<T> (kernels_impl.h): T's own vectors for float and double; float32
// vectors between half-precision loads and stores for float16 / bfloat16, as in
// fused_mlp's kernels and on CUDA.
template <typename T, typename A>
void gated_activation_rows(const T* z, T* h, int64_t rows, int64_t width) {
  using L = Lanes<T>;
  for_each_row(rows, width, [&](int64_t i) {
    const T* z_gate = z + i * 2 * width;
    const T* z_up = z_gate + width;
    T* hr = h + i * width;
    for_each_step<L::kStep>(0, width, [&](int64_t j, int64_t count) {
      auto v = L::load(z_gate + j, count);
      const auto up = L::load(z_up + j, count);
      for (int part = 0; part < L::kParts; ++part) {
        v[part] = A::forward(v[part]) * up[part];
      }
      L::store(v, hr + j, count);
    });
  });
}

template <typename T, typename A>
void gated_activation_backward_rows(const T* g_h, const T* z, T* g, int64_t rows, int64_t width) {
  using L = Lanes<T>;
  for_each_row(rows, width, [&](int64_t i) {
    const T* z_gate = z + i * 2 * width;
    const T* z_up = z_gate + width;
    const T* ghr = g_h + i * width;
    T* g_gate = g + i * 2 * width;
    T* g_up = g_gate + width;
    for_each_step<L::kStep>(0, width, [&](int64_t j, int64_t count) {
      const auto gh = L::load(ghr + j, count), zg = L::load(z_gate + j, count);
      const auto up = L::load(z_up + j, count);
      typename L::Pack grad_gate, grad_up;
      for (int part = 0; part < L::kParts; ++part) {
        grad_gate[part] = gh[part] * up[part] * A::derivative(zg[part]);
        grad_up[part] = gh[part] * A::forward(zg[part]);
      }
      L::store(grad_gate, g_gate + j, count);
      L::store(grad_up, g_up + j, count);
    });
  });
}

// The dtypes of the gated kernels: the one place to add one.
template <typename F>
void with_gated_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Double: f(double{}); return;
    case c10::ScalarType::Float: f(float{}); return;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); return;
    case c10::ScalarType::Half: f(c10::Half{}); return;
    default: TORCH_CHECK_TYPE(false, "gated_mlp: no CPU kernel for ", dtype);
  }
}

void gated_activation(
    c10::ScalarType dtype, Activation act, const void* z, void* h, int64_t rows, int64_t width) {
  with_gated_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    visit_activation(act, [&](auto a) {
      gated_activation_rows<T, decltype(a)>(
          static_cast<const T*>(z), static_cast<T*>(h), rows, width);
    });
  });
}

void gated_activation_backward(
    c10::ScalarType dtype, Activation act, const void* g_h, const void* z, void* g, int64_t rows,
    int64_t width) {
  with_gated_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    visit_activation(act, [&](auto a) {
      gated_activation_backward_rows<T, decltype(a)>(
          static_cast<const T*>(g_h), static_cast<const T*>(z), static_cast<T*>(g), rows, width);
    });
  });
}

const GatedIsaKernels kGatedTable{gated_activation, gated_activation_backward};
[[maybe_unused]] const bool kGatedRegistered =
    register_gated_isa_kernels(MLP_EXT_STRINGIFY(CPU_CAPABILITY), &kGatedTable);

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace mlp_ext

#undef MLP_EXT_STRINGIFY
#undef MLP_EXT_STRINGIFY_
