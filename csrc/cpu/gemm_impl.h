// Matrix products with a short side, written over at::vec::Vectorized (see
// kernels_impl.h for how it is compiled once per instruction set).
//
// The fused MLP's products at small and mid batch sizes have one short side: 32
// rows (Z = X W1^T), or an inner dimension of 32 (dW1 = G_Z^T X). There the
// BLAS's general GEMM spends most of its time packing its operands and waking
// threads, not multiplying (MKL on 2 Zen 4 cores: ~80-110 GFLOP/s at
// 32 x 784 x 256). These kernels never pack:
//
// - B not transposed (NN, TN): rows of B are contiguous along the output's
//   columns, so a register tile of out (kRows rows x kVectors vectors) is
//   built by broadcasting one element of op(A) a row and multiplying it into
//   the tile's vectors of that row of B.
// - B transposed (NT): rows of A and of B are both contiguous along the inner
//   dimension, so each entry of a register tile (kDotRows x kDotCols) is a dot
//   product accumulated in vector lanes and summed across them once, at the end.
//
// out (m x n, rows ld_out apart) = beta * addend + op(A) op(B), the addend
// read as each tile is written (no pass over out of its own). Element (i, p)
// of op(A) is a[i * a_row + p * a_col].
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace mlp_ext {
namespace CPU_CAPABILITY {
namespace {

template <typename T>
struct GemmShape {
  using V = at::vec::Vectorized<T>;
  // Accumulators: kRows x kVectors (outer) and kDotRows x kDotCols (dot) vector
  // registers, leaving room for the operands: 24 and 16 of AVX-512's 32, 12 and
  // 8 of AVX2's 16.
  static constexpr int kWide = V::size() * sizeof(T) >= 64;
  static constexpr int kRows = 6, kVectors = kWide ? 4 : 2;
  static constexpr int kDotRows = kWide ? 4 : 2, kDotCols = 4;
};

// beta * addend, added to out: element (i, j) at data[i * ld + j], so ld = 0
// broadcasts one row over every row; no addend where data is null.
template <typename T>
struct Addend {
  const T* data;
  int64_t ld;
  T beta;
  Addend at(int64_t i, int64_t j) const {
    return {data == nullptr ? nullptr : data + i * ld + j, ld, beta};
  }
};

// Calls f over 0..N-1 with each index a compile-time constant (fully unrolled,
// so the accumulators stay in registers).
template <typename F, int... I>
C10_ALWAYS_INLINE void unroll_impl(const F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
C10_ALWAYS_INLINE void unroll(const F& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// out[r][:] += beta * addend[r][:] over R rows of NV vectors (the last `last` wide).
template <typename T, bool Partial>
C10_NOINLINE void add_to_tile(T* out, int64_t ld_out, Addend<T> add, int R, int NV, int64_t last) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V beta(add.beta);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const int64_t count = Partial && v == NV - 1 ? last : W;
      T* o = out + r * ld_out + v * W;
      at::vec::fmadd(beta, V::loadu(add.data + r * add.ld + v * W, count), V::loadu(o, count))
          .store(o, count);
    }
  }
}

// One tile of R rows x NV vectors of out; the last vector holds `last` (<= V::size()) columns.
template <typename T, int R, int NV, bool Partial>
C10_ALWAYS_INLINE void outer_tile(
    const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ld_b, T* out, int64_t ld_out,
    int64_t k, int64_t last, Addend<T> add) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V acc[R][NV];
  unroll<R>([&](auto r) { unroll<NV>([&](auto v) { acc[r][v] = V(T(0)); }); });
  for (int64_t p = 0; p < k; ++p) {
    const T* b_row = b + p * ld_b;
    V bv[NV];
    unroll<NV>([&](auto v) {
      bv[v] = (Partial && v == NV - 1) ? V::loadu(b_row + v * W, last) : V::loadu(b_row + v * W);
    });
    const T* a_col_p = a + p * a_col;
    unroll<R>([&](auto r) {
      const V av(a_col_p[r * a_row]);
      unroll<NV>([&](auto v) { acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]); });
    });
  }
  unroll<R>([&](auto r) {
    T* out_row = out + r * ld_out;
    unroll<NV>([&](auto v) {
      const bool partial = Partial && v == NV - 1;
      partial ? acc[r][v].store(out_row + v * W, last) : acc[r][v].store(out_row + v * W);
    });
  });
  if (add.data != nullptr) {
    add_to_tile<T, Partial>(out, ld_out, add, R, NV, last);
  }
}

// Rows [r0, r1) x columns [c0, c1) of out, tile by tile.
template <typename T>
void outer_block(
    const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ld_b, T* out, int64_t ld_out,
    int64_t k, int64_t r0, int64_t r1, int64_t c0, int64_t c1, Addend<T> add) {
  using S = GemmShape<T>;
  constexpr int64_t W = S::V::size(), kTileCols = S::kVectors * W;
  for (int64_t i = r0; i < r1; i += S::kRows) {
    const int64_t rows = std::min<int64_t>(S::kRows, r1 - i);
    const T* a_i = a + i * a_row;
    T* out_i = out + i * ld_out;
    // Dispatches the row count (1..kRows) to the template.
    const auto tile = [&](auto nv, auto partial, int64_t j, int64_t last) {
      constexpr int NV = decltype(nv)::value;
      constexpr bool P = decltype(partial)::value;
      const T* b_j = b + j;
      T* o = out_i + j;
      const Addend<T> add_ij = add.at(i, j);
      switch (rows) {
#define MLP_EXT_OUTER_TILE(R)                                                               \
  case R:                                                                                   \
    outer_tile<T, R, NV, P>(a_i, a_row, a_col, b_j, ld_b, o, ld_out, k, last, add_ij); \
    break;
        MLP_EXT_OUTER_TILE(1)
        MLP_EXT_OUTER_TILE(2)
        MLP_EXT_OUTER_TILE(3)
        MLP_EXT_OUTER_TILE(4)
        MLP_EXT_OUTER_TILE(5)
        default:
          outer_tile<T, S::kRows, NV, P>(a_i, a_row, a_col, b_j, ld_b, o, ld_out, k, last,
                                         add_ij);
#undef MLP_EXT_OUTER_TILE
      }
    };
    int64_t j = c0;
    for (; j + kTileCols <= c1; j += kTileCols) {
      tile(std::integral_constant<int, S::kVectors>{}, std::false_type{}, j, W);
    }
    for (; j + W <= c1; j += W) {
      tile(std::integral_constant<int, 1>{}, std::false_type{}, j, W);
    }
    if (j < c1) {
      tile(std::integral_constant<int, 1>{}, std::true_type{}, j, c1 - j);
    }
  }
}

// Folds N vectors of partial sums into N / 2, then on to one: vector i becomes
// the pairwise sums of vectors 2i and 2i + 1, in order, each over twice as many
// lanes as before (deinterleave2 splits the concatenated pair into its even and
// odd lanes).
template <int N, typename V>
C10_ALWAYS_INLINE void fold_pairs(V* part) {
  if constexpr (N > 1) {
    unroll<N / 2>([&](auto i) {
      auto [even, odd] = at::vec::deinterleave2(part[2 * i], part[2 * i + 1]);
      part[i] = even + odd;
    });
    fold_pairs<N / 2>(part);
  }
}

// Lane l of the result is the sum of the lanes of acc[offset + l]: a tree of
// V::size() - 1 deinterleave-and-add steps instead of one reduction a vector.
template <typename V, int N>
C10_ALWAYS_INLINE V lane_sums(V (&acc)[N], int offset) {
  V part[V::size()];
  unroll<V::size()>([&](auto l) { part[l] = acc[offset + l]; });
  fold_pairs<V::size()>(part);
  return part[0];
}

// One tile of kDotRows rows of A x kDotCols rows of B (NT): dot products of
// length k, of which the first `rows` x `cols` are written (a short tile
// repeats its last row / column rather than branch in the inner loop).
template <typename T>
C10_ALWAYS_INLINE void dot_tile(
    const T* a, int64_t ld_a, int64_t rows, const T* b, int64_t ld_b, int64_t cols, T* out,
    int64_t ld_out, int64_t k, Addend<T> add) {
  using S = GemmShape<T>;
  using V = typename S::V;
  constexpr int R = S::kDotRows, C = S::kDotCols, W = V::size();
  static_assert((R * C) % W == 0, "dot_tile: whole vectors of sums");
  const T* a_row[R];
  const T* b_row[C];
  unroll<R>([&](auto r) { a_row[r] = a + std::min<int64_t>(r, rows - 1) * ld_a; });
  unroll<C>([&](auto c) { b_row[c] = b + std::min<int64_t>(c, cols - 1) * ld_b; });
  V acc[R * C];
  unroll<R * C>([&](auto i) { acc[i] = V(T(0)); });
  const auto step = [&](int64_t p, int64_t count) {
    V av[R];
    unroll<R>([&](auto r) { av[r] = V::loadu(a_row[r] + p, count); });
    unroll<C>([&](auto c) {
      const V bv = V::loadu(b_row[c] + p, count);
      unroll<R>([&](auto r) { acc[r * C + c] = at::vec::fmadd(av[r], bv, acc[r * C + c]); });
    });
  };
  int64_t p = 0;
  for (; p + W <= k; p += W) {
    step(p, W);
  }
  if (p < k) {
    step(p, k - p);  // lanes past k are loaded as zeros
  }
  T sums[R * C];
  unroll<R * C / W>([&](auto g) { lane_sums<V>(acc, g * W).store(sums + g * W); });
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const T sum = sums[r * C + c];
      out[r * ld_out + c] = add.data == nullptr ? sum : add.beta * add.data[r * add.ld + c] + sum;
    }
  }
}

// Rows [r0, r1) x columns [c0, c1) of out = A B^T, columns outside: each block
// of B's rows stays in cache while every row tile of A passes over it.
template <typename T>
void dot_block(
    const T* a, int64_t ld_a, const T* b, int64_t ld_b, T* out, int64_t ld_out, int64_t k,
    int64_t r0, int64_t r1, int64_t c0, int64_t c1, Addend<T> add) {
  using S = GemmShape<T>;
  constexpr int64_t kColumnBlock = 4 * S::kDotCols;
  for (int64_t jb = c0; jb < c1; jb += kColumnBlock) {
    const int64_t je = std::min(c1, jb + kColumnBlock);
    for (int64_t i = r0; i < r1; i += S::kDotRows) {
      const int64_t rows = std::min<int64_t>(S::kDotRows, r1 - i);
      for (int64_t j = jb; j < je; j += S::kDotCols) {
        dot_tile<T>(a + i * ld_a, ld_a, rows, b + j * ld_b, ld_b,
                    std::min<int64_t>(S::kDotCols, je - j), out + i * ld_out + j, ld_out, k,
                    add.at(i, j));
      }
    }
  }
}

// out (m x n) = beta * addend + op(A) op(B) in parallel over blocks of out. op(A) is m x k:
// A is row-major with rows ld_a apart, transposed where trans_a (likewise B).
// Not for trans_a and trans_b together (the MLP has no such product).
template <typename T>
void short_gemm_impl(
    bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T* a, int64_t ld_a,
    const T* b, int64_t ld_b, T* out, int64_t ld_out, Addend<T> add, bool parallel) {
  using S = GemmShape<T>;
  // Blocks: whole row tiles x whole column tiles, the longer side split first.
  const int64_t row_unit = trans_b ? S::kDotRows : S::kRows;
  const int64_t col_unit = trans_b ? 4 * S::kDotCols : S::kVectors * S::V::size();
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  const int64_t row_tiles = (m + row_unit - 1) / row_unit, col_tiles = (n + col_unit - 1) / col_unit;
  int64_t row_parts = 1, col_parts = 1;
  if (threads > 1) {
    // The side with more tiles is split into up to `threads` parts.
    (row_tiles >= col_tiles ? row_parts : col_parts) =
        std::min<int64_t>(threads, std::max(row_tiles, col_tiles));
  }
  const auto run = [&](int64_t part) {
    const int64_t rp = part / col_parts, cp = part % col_parts;
    const int64_t r0 = std::min(m, (rp * row_tiles / row_parts) * row_unit);
    const int64_t r1 = std::min(m, ((rp + 1) * row_tiles / row_parts) * row_unit);
    const int64_t c0 = std::min(n, (cp * col_tiles / col_parts) * col_unit);
    const int64_t c1 = std::min(n, ((cp + 1) * col_tiles / col_parts) * col_unit);
    if (trans_b) {
      dot_block<T>(a, ld_a, b, ld_b, out, ld_out, k, r0, r1, c0, c1, add);
    } else {
      outer_block<T>(a, trans_a ? 1 : ld_a, trans_a ? ld_a : 1, b, ld_b, out, ld_out, k, r0, r1,
                     c0, c1, add);
    }
  };
  const int64_t parts = row_parts * col_parts;
  if (parts == 1) {
    run(0);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      run(part);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace mlp_ext
