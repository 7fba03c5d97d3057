// The CPU elementwise kernels, written once over at::vec::Vectorized. Included
// (after kernels.h, and after the capability's #pragma GCC target and
// CPU_CAPABILITY macros) by one .cpp file per instruction set; it defines
// IsaKernels kTable in namespace mlp_ext::CPU_CAPABILITY.
//
// Parallel over rows (forward) or row blocks x column blocks (backward). Column
// sums are deterministic: the row blocks depend on the shape only, each column
// is summed row by row within a block, and the blocks are added in order.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "activation.h"
#include "gemm_impl.h"

namespace mlp_ext {

template <typename T>
struct Math<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V constant(double c) { return V(static_cast<T>(c)); }
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
  static V erf(V x) { return x.erf(); }
  static V relu(V x) { return at::vec::maximum(x, V(T(0))); }  // propagates NaN
  // torch's convention (threshold_backward): 0 for z <= 0, else 1, so 1 at NaN.
  static V step(V x) { return V::blendv(V(T(1)), V(T(0)), x <= V(T(0))); }
};

namespace CPU_CAPABILITY {
namespace {

// Elements per parallel task: below this a pass runs on the calling thread.
constexpr int64_t kGrainElements = 32768;

// Calls f(j, count) over [begin, end) in steps of Step elements; the last step
// may be short (count < Step) and is read and written with partial loads /
// stores, so the formulas only ever run on vectors.
template <int64_t Step, typename F>
C10_ALWAYS_INLINE void for_each_step(int64_t begin, int64_t end, const F& f) {
  int64_t j = begin;
  for (; j + Step <= end; j += Step) {
    f(j, Step);
  }
  if (j < end) {
    f(j, end - j);
  }
}

template <typename V, typename F>
C10_ALWAYS_INLINE void for_each_vector(int64_t begin, int64_t end, const F& f) {
  for_each_step<V::size()>(begin, end, f);
}

template <typename T>
constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// The vectors the kernels compute on for elements stored as T: T's own for
// float and double; for float16 and bfloat16, float vectors (each step loads
// one vector of T and widens it into kParts float vectors), since the operator
// computes in float32 between half-precision loads and stores, as the CUDA
// kernels do. Acc is the type of column sums and other accumulators.
template <typename T, typename = void>
struct Lanes {
  using Acc = T;
  using V = at::vec::Vectorized<T>;
  static constexpr int kParts = 1;
  static constexpr int64_t kStep = V::size();
  using Pack = std::array<V, kParts>;
  static C10_ALWAYS_INLINE Pack load(const T* p, int64_t count) { return {V::loadu(p, count)}; }
  static C10_ALWAYS_INLINE void store(const Pack& v, T* p, int64_t count) { v[0].store(p, count); }
};

template <typename T>
struct Lanes<T, std::enable_if_t<kReduced<T>>> {
  using Acc = float;
  using V = at::vec::Vectorized<float>;
  using Stored = at::vec::Vectorized<T>;
  static constexpr int kParts = 2;
  static constexpr int64_t kStep = Stored::size();
  static_assert(kStep == kParts * V::size());
  using Pack = std::array<V, kParts>;
  static C10_ALWAYS_INLINE Pack load(const T* p, int64_t count) {
    const auto [lo, hi] = at::vec::convert_to_float<T>(Stored::loadu(p, count));
    return {lo, hi};
  }
  static C10_ALWAYS_INLINE void store(const Pack& v, T* p, int64_t count) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p, count);
  }
};

// Elements [part * V::size(), ...) of a step of `count` elements, clamped to [0, V::size()].
template <typename V>
C10_ALWAYS_INLINE int64_t part_count(int64_t count, int part) {
  return std::clamp<int64_t>(count - part * V::size(), 0, V::size());
}

// sum[j, j + count) += v (kParts vectors of accumulators).
template <typename L>
C10_ALWAYS_INLINE void accumulate(typename L::Acc* sum, const typename L::Pack& v, int64_t count) {
  using V = typename L::V;
  for (int part = 0; part < L::kParts; ++part) {
    const int64_t c = part_count<V>(count, part);
    if (c > 0) {
      typename L::Acc* s = sum + part * V::size();
      (V::loadu(s, c) + v[part]).store(s, c);
    }
  }
}

template <typename T, typename A>
void bias_activation_rows(T* z, T* h, const T* b1, int64_t rows, int64_t width) {
  using L = Lanes<T>;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* zr = z + i * width;
      T* hr = h + i * width;
      for_each_step<L::kStep>(0, width, [&](int64_t j, int64_t count) {
        auto v = L::load(zr + j, count);
        if (b1 != nullptr) {
          const auto b = L::load(b1 + j, count);
          for (int part = 0; part < L::kParts; ++part) {
            v[part] = v[part] + b[part];
          }
          L::store(v, zr + j, count);
          if constexpr (kReduced<T>) {
            v = L::load(zr + j, count);  // h = phi(z) of the z saved (rounded to T)
          }
        }
        for (int part = 0; part < L::kParts; ++part) {
          v[part] = A::forward(v[part]);
        }
        L::store(v, hr + j, count);
      });
    }
  });
}

// Runs block(r0, r1, c0, c1, sum) over a grid of row blocks x column blocks of
// a rows x width matrix, where sum (width entries, zeroed on [c0, c1)) receives
// that block's column sums, and writes the total into colsum (if not null).
template <typename T, typename Block>
void column_blocks(int64_t rows, int64_t width, T* colsum, const Block& block) {
  using Acc = typename Lanes<T>::Acc;
  constexpr int64_t kColumnBlock = 256;
  constexpr int64_t kRowsPerBlock = 1024;
  const int64_t column_blocks = std::max<int64_t>(1, (width + kColumnBlock - 1) / kColumnBlock);
  const int64_t row_blocks =
      colsum ? std::clamp<int64_t>(rows / kRowsPerBlock, 1, 64) : std::max<int64_t>(rows, 1);
  const int64_t rows_per_block = (rows + row_blocks - 1) / row_blocks;
  // One partial sum row per row block; with a single block of a wide type, sum
  // into colsum. Half types sum in float32 and round once, at the end.
  constexpr bool kWiden = !std::is_same_v<Acc, T>;
  std::vector<Acc> partial(colsum && (row_blocks > 1 || kWiden) ? row_blocks * width : 0);
  const int64_t tasks = row_blocks * column_blocks;
  const int64_t grain =
      std::max<int64_t>(1, kGrainElements / std::max<int64_t>(rows_per_block * kColumnBlock, 1));

  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rb = task / column_blocks, cb = task % column_blocks;
      const int64_t r0 = rb * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      const int64_t c0 = cb * kColumnBlock, c1 = std::min(width, c0 + kColumnBlock);
      Acc* sum = nullptr;
      if (colsum != nullptr) {
        if constexpr (kWiden) {
          sum = &partial[rb * width];
        } else {
          sum = partial.empty() ? colsum : &partial[rb * width];
        }
        std::fill(sum + c0, sum + c1, Acc(0));
      }
      block(r0, r1, c0, c1, sum);
    }
  });
  if (!partial.empty()) {
    for (int64_t rb = 1; rb < row_blocks; ++rb) {
      for (int64_t j = 0; j < width; ++j) {
        partial[j] += partial[rb * width + j];
      }
    }
    std::copy(partial.begin(), partial.begin() + width, colsum);  // rounded to T once
  }
}

template <typename T, typename A>
void activation_backward_rows(T* g, const T* z, T* colsum, int64_t rows, int64_t width) {
  using L = Lanes<T>;
  using Acc = typename L::Acc;
  column_blocks<T>(rows, width, colsum, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, Acc* sum) {
    for (int64_t i = r0; i < r1; ++i) {
      T* gr = g + i * width;
      const T* zr = z + i * width;
      for_each_step<L::kStep>(c0, c1, [&](int64_t j, int64_t count) {
        auto gz = L::load(gr + j, count);
        const auto zv = L::load(zr + j, count);
        for (int part = 0; part < L::kParts; ++part) {
          gz[part] = gz[part] * A::derivative(zv[part]);
        }
        L::store(gz, gr + j, count);
        if (sum != nullptr) {
          if constexpr (kReduced<T>) {
            gz = L::load(gr + j, count);  // db1 sums G_Z as stored (as on CUDA)
          }
          accumulate<L>(sum + j, gz, count);
        }
      });
    }
  });
}

template <typename T>
void column_sums_rows(const T* g, T* out, int64_t rows, int64_t width) {
  using L = Lanes<T>;
  using Acc = typename L::Acc;
  column_blocks<T>(rows, width, out, [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, Acc* sum) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* gr = g + i * width;
      for_each_step<L::kStep>(c0, c1, [&](int64_t j, int64_t count) {
        accumulate<L>(sum + j, L::load(gr + j, count), count);
      });
    }
  });
}

// Sum of squares in vector lanes of T (float for the half types), folded into
// double every chunk so that float32 weights of any size keep float32 accuracy.
// The chunks' sums are added in order, whatever thread computed them:
// deterministic.
template <typename T>
double sum_of_squares_impl(const T* data, int64_t size) {
  using L = Lanes<T>;
  using V = typename L::V;
  using Acc = typename L::Acc;
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, kGrainElements / kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      // Four independent accumulators: one would wait on each FMA's latency.
      V acc0(Acc(0)), acc1(Acc(0)), acc2(Acc(0)), acc3(Acc(0));
      const int64_t first = c * kChunk, last = std::min(size, first + kChunk);
      int64_t j = first;
      if constexpr (L::kParts == 1) {
        constexpr int64_t kStep = 4 * V::size();
        for (; j + kStep <= last; j += kStep) {
          const V v0 = V::loadu(data + j), v1 = V::loadu(data + j + V::size());
          const V v2 = V::loadu(data + j + 2 * V::size()), v3 = V::loadu(data + j + 3 * V::size());
          acc0 = at::vec::fmadd(v0, v0, acc0);
          acc1 = at::vec::fmadd(v1, v1, acc1);
          acc2 = at::vec::fmadd(v2, v2, acc2);
          acc3 = at::vec::fmadd(v3, v3, acc3);
        }
      } else {
        constexpr int64_t kStep = 2 * L::kStep;
        for (; j + kStep <= last; j += kStep) {
          const auto a = L::load(data + j, L::kStep), b = L::load(data + j + L::kStep, L::kStep);
          acc0 = at::vec::fmadd(a[0], a[0], acc0);
          acc1 = at::vec::fmadd(a[1], a[1], acc1);
          acc2 = at::vec::fmadd(b[0], b[0], acc2);
          acc3 = at::vec::fmadd(b[1], b[1], acc3);
        }
      }
      // The rest (partial loads read zeros past `count`).
      for_each_step<L::kStep>(j, last, [&](int64_t i, int64_t count) {
        const auto v = L::load(data + i, count);
        for (int part = 0; part < L::kParts; ++part) {
          acc0 = at::vec::fmadd(v[part], v[part], acc0);
        }
      });
      Acc lanes[V::size()];
      ((acc0 + acc1) + (acc2 + acc3)).store(lanes);
      double sum = 0;
      for (int64_t l = 0; l < V::size(); ++l) {
        sum += lanes[l];
      }
      partial[c] = sum;
    }
  });
  double total = 0;
  for (const double sum : partial) {
    total += sum;
  }
  return total;
}

// The table's entries: the dtype picks T, the activation picks A.
template <typename F>
void with_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Double: return f(double{});
    case c10::ScalarType::Float: return f(float{});
    case c10::ScalarType::BFloat16: return f(c10::BFloat16{});
    case c10::ScalarType::Half: return f(c10::Half{});
    default: TORCH_INTERNAL_ASSERT(false, "mlp_ext CPU kernels: unexpected dtype ", dtype);
  }
}

void bias_activation(
    c10::ScalarType dtype, Activation act, void* z, void* h, const void* b1, int64_t rows,
    int64_t width) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    visit_activation(act, [&](auto a) {
      bias_activation_rows<T, decltype(a)>(
          static_cast<T*>(z), static_cast<T*>(h), static_cast<const T*>(b1), rows, width);
    });
  });
}

void activation_backward(
    c10::ScalarType dtype, Activation act, void* g, const void* z, void* colsum, int64_t rows,
    int64_t width) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    visit_activation(act, [&](auto a) {
      activation_backward_rows<T, decltype(a)>(
          static_cast<T*>(g), static_cast<const T*>(z), static_cast<T*>(colsum), rows, width);
    });
  });
}

void column_sums(c10::ScalarType dtype, const void* g, void* out, int64_t rows, int64_t width) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    column_sums_rows<T>(static_cast<const T*>(g), static_cast<T*>(out), rows, width);
  });
}

double sum_of_squares(c10::ScalarType dtype, const void* data, int64_t size) {
  double total = 0;
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    total = sum_of_squares_impl<T>(static_cast<const T*>(data), size);
  });
  return total;
}

void scaled_copy(c10::ScalarType dtype, const void* src, void* dst, double scale, int64_t size) {
  with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using V = typename Lanes<T>::V;  // float vectors for the half types (at::vec::map widens)
    const V factor(static_cast<typename Lanes<T>::Acc>(scale));
    at::vec::map([&](V v) { return v * factor; }, static_cast<T*>(dst),
                 static_cast<const T*>(src), size);
  });
}

// Elements per parallel task of the conversions: memory-bound passes that take
// ~10 us per 64K elements on one core, less than a parallel region costs on a
// busy machine.
constexpr int64_t kConvertGrain = int64_t(1) << 18;

template <typename F>
void with_half_dtype(c10::ScalarType dtype, const F& f) {
  TORCH_INTERNAL_ASSERT(dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half);
  if (dtype == c10::ScalarType::BFloat16) {
    f(c10::BFloat16{});
  } else {
    f(c10::Half{});
  }
}

void widen(c10::ScalarType dtype, const void* src, float* dst, int64_t size) {
  with_half_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using L = Lanes<T>;
    using V = typename L::V;
    const T* from = static_cast<const T*>(src);
    at::parallel_for(0, size, kConvertGrain, [&](int64_t begin, int64_t end) {
      for_each_step<L::kStep>(begin, end, [&](int64_t j, int64_t count) {
        const auto v = L::load(from + j, count);
        for (int part = 0; part < L::kParts; ++part) {
          const int64_t c = part_count<V>(count, part);
          if (c > 0) {
            v[part].store(dst + j + part * V::size(), c);
          }
        }
      });
    });
  });
}

void narrow(c10::ScalarType dtype, const float* src, void* dst, int64_t size) {
  with_half_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    using L = Lanes<T>;
    using V = typename L::V;
    T* to = static_cast<T*>(dst);
    at::parallel_for(0, size, kConvertGrain, [&](int64_t begin, int64_t end) {
      for_each_step<L::kStep>(begin, end, [&](int64_t j, int64_t count) {
        typename L::Pack v;
        for (int part = 0; part < L::kParts; ++part) {
          v[part] = V::loadu(src + j + part * V::size(), part_count<V>(count, part));
        }
        L::store(v, to + j, count);
      });
    });
  });
}

// Without a capability at::vec is scalar code, and the BLAS is faster.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define MLP_EXT_SHORT_GEMM short_gemm
void short_gemm(
    c10::ScalarType dtype, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
    const void* a, int64_t ld_a, const void* b, int64_t ld_b, void* out, int64_t ld_out,
    const void* addend, int64_t ld_addend, double beta, bool parallel) {
  // float32 and float64 only: cpu_matmul never sends the half types here.
  TORCH_INTERNAL_ASSERT(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double);
  with_dtype(dtype, [&](auto t) {
    using T = std::conditional_t<std::is_same_v<decltype(t), double>, double, float>;
    const Addend<T> add{static_cast<const T*>(addend), addend ? ld_addend : 0, static_cast<T>(beta)};
    short_gemm_impl<T>(trans_a, trans_b, m, n, k, static_cast<const T*>(a), ld_a,
                       static_cast<const T*>(b), ld_b, static_cast<T*>(out), ld_out, add,
                       parallel);
  });
}
#else
#define MLP_EXT_SHORT_GEMM nullptr
#endif

}  // namespace

const IsaKernels kTable{bias_activation, activation_backward, column_sums, sum_of_squares,
                        scaled_copy,     MLP_EXT_SHORT_GEMM,  widen,       narrow};
#undef MLP_EXT_SHORT_GEMM

}  // namespace CPU_CAPABILITY
}  // namespace mlp_ext

// The gated op's kernels, built for the same instruction set (gated_kernels.h).
#include "gated_kernels_impl.h"
