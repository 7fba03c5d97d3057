// CPU kernels of the fused MLP: the two elementwise passes and the
// regularization term, vectorized with ATen's Vectorized and parallel over rows
// (forward) or row blocks x column blocks (backward, deterministic sums).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "mlp.h"

namespace mlp_ext {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V constant(double c) { return V(static_cast<T>(c)); }
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
  static V erf(V x) { return x.erf(); }
  static V relu(V x) { return at::vec::maximum(x, V(T(0))); }  // propagates NaN
  static V step(V x) { return V::blendv(V(T(1)), V(T(0)), x <= V(T(0))); }
};

namespace {

// Elements per parallel task: below this a pass runs on the calling thread.
constexpr int64_t kGrainElements = 32768;

template <typename T>
T* data_or_null(const std::optional<Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

template <typename T, typename A>
void bias_activation_rows(T* z, T* h, const T* b1, int64_t rows, int64_t width) {
  using V = at::vec::Vectorized<T>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* zr = z + i * width;
      T* hr = h + i * width;
      int64_t j = 0;
      for (; j + V::size() <= width; j += V::size()) {
        V v = V::loadu(zr + j);
        if (b1) {
          v = v + V::loadu(b1 + j);
          v.store(zr + j);
        }
        A::forward(v).store(hr + j);
      }
      for (; j < width; ++j) {
        const T v = b1 ? zr[j] + b1[j] : zr[j];
        zr[j] = v;
        hr[j] = A::forward(v);
      }
    }
  });
}

void bias_activation_cpu(Tensor& z, Tensor& h, const std::optional<Tensor>& b1, Activation act) {
  const std::optional<Tensor> bias = b1 ? std::optional<Tensor>(b1->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fused_mlp_bias_activation", [&] {
    visit_activation(act, [&](auto a) {
      bias_activation_rows<scalar_t, decltype(a)>(
          z.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), data_or_null<scalar_t>(bias),
          z.size(0), z.size(1));
    });
  });
}

// g <- g * phi'(z) over a rows x width matrix; colsum (if not null) gets the
// column sums. Rows are split into a number of blocks that depends on the
// shape only, so the sums are the same whatever the thread count.
template <typename T, typename A>
void activation_backward_rows(T* g, const T* z, T* colsum, int64_t rows, int64_t width) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kColumnBlock = 256;
  constexpr int64_t kRowsPerBlock = 1024;
  const int64_t column_blocks = std::max<int64_t>(1, (width + kColumnBlock - 1) / kColumnBlock);
  const int64_t row_blocks =
      colsum ? std::clamp<int64_t>(rows / kRowsPerBlock, 1, 64) : std::max<int64_t>(rows, 1);
  const int64_t rows_per_block = (rows + row_blocks - 1) / row_blocks;
  // One partial sum row per row block; with a single block, sum into colsum.
  std::vector<T> partial(colsum && row_blocks > 1 ? row_blocks * width : 0);
  const int64_t tasks = row_blocks * column_blocks;
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / std::max<int64_t>(rows_per_block * kColumnBlock, 1));

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / column_blocks, cb = task % column_blocks;
      const int64_t r0 = rb * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      const int64_t c0 = cb * kColumnBlock, c1 = std::min(width, c0 + kColumnBlock);
      T* sum = colsum == nullptr ? nullptr : (partial.empty() ? colsum : &partial[rb * width]);
      if (sum) {
        std::fill(sum + c0, sum + c1, T(0));
      }
      for (int64_t i = r0; i < r1; ++i) {
        T* gr = g + i * width;
        const T* zr = z + i * width;
        int64_t j = c0;
        for (; j + V::size() <= c1; j += V::size()) {
          const V gz = V::loadu(gr + j) * A::derivative(V::loadu(zr + j));
          gz.store(gr + j);
          if (sum) {
            (V::loadu(sum + j) + gz).store(sum + j);
          }
        }
        for (; j < c1; ++j) {
          gr[j] *= A::derivative(zr[j]);
          if (sum) {
            sum[j] += gr[j];
          }
        }
      }
    }
  });
  if (!partial.empty()) {
    std::copy(partial.begin(), partial.begin() + width, colsum);
    for (int64_t rb = 1; rb < row_blocks; ++rb) {
      for (int64_t j = 0; j < width; ++j) {
        colsum[j] += partial[rb * width + j];
      }
    }
  }
}

void activation_backward_cpu(Tensor& g, const Tensor& z, Tensor& db1, Activation act) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fused_mlp_activation_backward", [&] {
    visit_activation(act, [&](auto a) {
      activation_backward_rows<scalar_t, decltype(a)>(
          g.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
          db1.defined() ? db1.data_ptr<scalar_t>() : nullptr, g.size(0), g.size(1));
    });
  });
}

// Sum of squares in vector lanes of T, folded into double every chunk so that
// float32 weights of any size keep float32 accuracy.
template <typename T>
double sum_of_squares(const T* data, int64_t size) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kChunk = 4096;
  double total = 0;
  for (int64_t i = 0; i < size; i += kChunk) {
    total += at::vec::map_reduce_all<T>(
        [](V v) { return v * v; }, [](V a, V b) { return a + b; }, data + i,
        std::min(kChunk, size - i));
  }
  return total;
}

Tensor penalty_cpu(const Tensor& w1, const Tensor& w2, double weight_decay) {
  const Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  Tensor s = at::empty({}, w1.options());
  AT_DISPATCH_FLOATING_TYPES(w1.scalar_type(), "fused_mlp_penalty", [&] {
    const double squares = sum_of_squares(w1c.data_ptr<scalar_t>(), w1c.numel()) +
        sum_of_squares(w2c.data_ptr<scalar_t>(), w2c.numel());
    *s.data_ptr<scalar_t>() = static_cast<scalar_t>(0.5 * weight_decay * squares);
  });
  return s;
}

const DeviceKernels kCpuKernels{
    bias_activation_cpu, activation_backward_cpu, penalty_cpu, /*reduced_precision=*/false};

}  // namespace

TORCH_LIBRARY_IMPL(mlp_ext, CPU, m) {
  m.impl(
      "fused_mlp_forward",
      [](const Tensor& x, const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& b1,
         const std::optional<Tensor>& b2, c10::string_view activation, double weight_decay) {
        return fused_mlp_forward(kCpuKernels, x, w1, w2, b1, b2, activation, weight_decay);
      });
  m.impl(
      "fused_mlp_backward",
      [](const Tensor& grad_o, const std::optional<Tensor>& grad_s, const Tensor& x,
         const Tensor& w1, const Tensor& w2, const Tensor& z, const std::optional<Tensor>& h,
         c10::string_view activation, double weight_decay, std::array<bool, 5> output_mask) {
        return fused_mlp_backward(
            kCpuKernels, grad_o, grad_s, x, w1, w2, z, h, activation, weight_decay,
            output_mask);
      });
}

}  // namespace mlp_ext
