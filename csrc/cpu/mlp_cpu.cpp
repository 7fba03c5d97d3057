// The CPU operator: its DeviceKernels (the elementwise kernels of kernels_*.cpp
// for the widest instruction set the CPU has, and the matrix products of
// gemm.cpp) and their registration for the CPU dispatch key.
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
  Tensor s = at::empty({}, w1.options());
  if (s.scalar_type() == at::kDouble) {
    *s.data_ptr<double>() = 0.5 * weight_decay * squares;
  } else {
    *s.data_ptr<float>() = static_cast<float>(0.5 * weight_decay * squares);
  }
  return s;
}

DeviceKernels make_cpu_kernels() {
  DeviceKernels k{bias_activation_cpu, activation_backward_cpu, penalty_cpu,
                  /*reduced_precision=*/false};
  k.matmul = cpu_matmul;
  k.column_sums = column_sums_cpu;
  k.activation_in_place = true;  // each vector is read before it is written
  return k;
}

const DeviceKernels kCpuKernels = make_cpu_kernels();

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CPU, m) {
  register_device_kernels<kCpuKernels>(m);
}

}  // namespace mlp_ext
