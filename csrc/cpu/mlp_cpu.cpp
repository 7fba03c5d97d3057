// The CPU operator: its DeviceKernels (the elementwise kernels of kernels_*.cpp
// for the widest instruction set the CPU has, and the matrix products of
// gemm.cpp) and their registration for the CPU dispatch key.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cpu/gemm.h"
#include "cpu/kernels.h"
#include "device_registration.h"
#include "mlp.h"

namespace mlp_ext {
namespace {

void bias_activation_cpu(Tensor& z, Tensor& h, const std::optional<Tensor>& b1, Activation act) {
  const std::optional<Tensor> bias = b1 ? std::optional<Tensor>(b1->contiguous()) : std::nullopt;
  isa_kernels().bias_activation(
      z.scalar_type(), act, z.data_ptr(), h.data_ptr(), bias ? bias->const_data_ptr() : nullptr,
      z.size(0), z.size(1));
}

void activation_backward_cpu(Tensor& g, const Tensor& z, Tensor& db1, Activation act) {
  isa_kernels().activation_backward(
      g.scalar_type(), act, g.data_ptr(), z.const_data_ptr(),
      db1.defined() ? db1.data_ptr() : nullptr, g.size(0), g.size(1));
}

void column_sums_cpu(Tensor& out, const Tensor& g) {
  const Tensor gc = g.contiguous();
  isa_kernels().column_sums(g.scalar_type(), gc.const_data_ptr(), out.data_ptr(), gc.size(0), gc.size(1));
}

Tensor penalty_cpu(const Tensor& w1, const Tensor& w2, double weight_decay) {
  const Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  const auto& k = isa_kernels();
  const double squares = k.sum_of_squares(w1.scalar_type(), w1c.const_data_ptr(), w1c.numel()) +
      k.sum_of_squares(w2.scalar_type(), w2c.const_data_ptr(), w2c.numel());
  // Summed in double, rounded once to the weights' dtype (as the CUDA kernel does).
  Tensor s = empty({}, w1.options());  // mlp.cpp's: no dispatch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "penalty_cpu", [&] {
    *s.data_ptr<scalar_t>() = static_cast<scalar_t>(0.5 * weight_decay * squares);
  });
  return s;
}

// g *= mask * scale, element by element as a product (so that NaN and Inf in a
// dropped unit propagate as in torch's dropout, which multiplies by 0); the rows
// split over the threads like ATen's elementwise kernels. Half types multiply
// in float32 by the float32 scale and round once (as on CUDA).
template <typename T>
void apply_mask(T* g, const bool* mask, double scale, int64_t size) {
  using Acc = at::opmath_type<T>;
  const Acc keep = static_cast<Acc>(scale);
  at::parallel_for(0, size, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      g[i] = static_cast<T>(static_cast<Acc>(g[i]) * (mask[i] ? keep : Acc(0)));
    }
  });
}

void apply_dropout_cpu(Tensor& g, const Tensor& mask, double p) {
  TORCH_INTERNAL_ASSERT(g.is_contiguous() && mask.is_contiguous() && g.numel() == mask.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "apply_dropout_cpu", [&] {
    apply_mask(g.data_ptr<scalar_t>(), mask.const_data_ptr<bool>(), dropout_scale(p), g.numel());
  });
}

// The mask from torch's CPU generator by ATen's bernoulli_ (its lock, its
// per-element draws; MKL's on Intel CPUs), so that torch.manual_seed reproduces
// it and it is the mask nn.Dropout would draw into a tensor of that shape.
void dropout_cpu(Tensor& h, Tensor& mask, double p) {
  mask.bernoulli_(1 - p);
  apply_dropout_cpu(h, mask, p);
}

DeviceKernels make_cpu_kernels() {
  DeviceKernels k{bias_activation_cpu, activation_backward_cpu, penalty_cpu,
                  /*reduced_precision=*/true};
  k.matmul = cpu_matmul;
  k.column_sums = column_sums_cpu;
  k.activation_in_place = true;  // each vector is read before it is written
  k.dropout = dropout_cpu;
  k.apply_dropout = apply_dropout_cpu;
  return k;
}

}  // namespace

const DeviceKernels kCpuKernels = make_cpu_kernels();

TORCH_LIBRARY_IMPL(mlp_ext, CPU, m) {
  register_device_kernels<kCpuKernels>(m);
}

}  // namespace mlp_ext
