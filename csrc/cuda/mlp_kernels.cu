// Raw CUDA kernels of the fused MLP (see mlp_kernels.cuh for the contract).
//
// Layout of the two elementwise passes: a rows x width row-major matrix is cut
// into column tiles (blockIdx.x) and row chunks (blockIdx.y). Thread (x, y) of
// a block owns one group of VEC adjacent columns and walks the rows
// r0 + y, r0 + y + blockDim.y, ... of its chunk, so the bias is loaded once per
// thread, no index needs a division, and the backward's column sums need no
// atomics: each thread sums its rows in order, a block adds its row lanes in
// order, and a second pass adds the chunks in order.
//
// VEC = 16 / sizeof(T) (one 16-byte access) when the pointers are 16-byte
// aligned and width % VEC == 0 (so a vector never straddles two rows);
// otherwise VEC = 1. Block shape and row chunks come from the shape and the
// element type only, never from the pointers, so the order of every addition --
// and so every result bit -- is the same on the vector and the scalar path.
#include "mlp_kernels.cuh"

#include "convert.cuh"

#include "philox.cuh"

#include <algorithm>
#include <climits>

namespace mlp_ext::gpu {

namespace {

constexpr int kThreads = 256;             // threads per block, every kernel
constexpr int kAlignment = 16;            // bytes of one vector access
constexpr int kMaxBlockX = 32;            // one warp across the columns at most
constexpr int64_t kTargetBlocks = 2048;   // ~16 blocks of 256 threads per SM of an H100/H200 (132 SMs)
constexpr int64_t kMinRowsPerThread = 4;  // fewer rows per thread: not worth another chunk
constexpr int64_t kMaxChunks = 65535;     // the gridDim.y limit
constexpr int kSumX = 32, kSumY = kThreads / kSumX;  // block of the chunk-sum pass
constexpr int64_t kPenaltyElementsPerThread = 16;
constexpr int64_t kMaxPenaltyBlocks = 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__host__ __device__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kAlignment == 0;
}

// Products rounded on their own: nvcc would otherwise fuse a product and a
// following sum into one FMA where it can, so that db1 would not be the sum of
// G_Z as stored, and the fusing could differ between instantiations.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// N elements moved as one access of N * sizeof(T) bytes.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& x) {
  *reinterpret_cast<Pack<T, N>*>(p) = x;
}

// ---------------------------------------------------------------------------
// Column-tiled elementwise passes

struct ColumnPlan {
  int block_x;             // threads across column groups (a power of two <= 32)
  int block_y;             // threads down the rows: kThreads / block_x
  int64_t chunks;          // row chunks, gridDim.y
  int64_t rows_per_chunk;  // every chunk but the last has exactly this many rows
};

// rows, width >= 1. Depends on the shape and the element type only (see the file
// comment): blocks are shaped for the vector path's 16 / sizeof(T) columns per
// thread, so that no thread of a vectorized block is idle for want of columns.
template <typename T>
ColumnPlan plan_columns(int64_t rows, int64_t width) {
  const int64_t nominal_groups = ceil_div(width, kAlignment / static_cast<int64_t>(sizeof(T)));
  int block_x = 1;
  while (block_x < kMaxBlockX && block_x < nominal_groups) {
    block_x *= 2;
  }
  const int block_y = kThreads / block_x;
  const int64_t nominal_tiles = ceil_div(nominal_groups, block_x);
  const int64_t wanted = std::min(
      ceil_div(kTargetBlocks, nominal_tiles), ceil_div(rows, block_y * kMinRowsPerThread));
  const int64_t chunks = std::clamp<int64_t>(wanted, 1, kMaxChunks);
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  // Recounted so that no chunk is empty (at most `chunks`).
  return {block_x, block_y, ceil_div(rows, rows_per_chunk), rows_per_chunk};
}

// The grid for groups of `vec` columns; false if it exceeds gridDim.x.
bool column_grid(const ColumnPlan& plan, int64_t width, int vec, dim3* grid) {
  const int64_t tiles = ceil_div(ceil_div(width, vec), plan.block_x);
  if (tiles > INT_MAX) {
    return false;
  }
  *grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(plan.chunks));
  return true;
}

__device__ __forceinline__ int64_t chunk_end(int64_t rows, int64_t r0, int64_t rows_per_chunk) {
  return rows - r0 < rows_per_chunk ? rows : r0 + rows_per_chunk;
}

template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kThreads) bias_activation_kernel(
    T* z,
    T* __restrict__ h,
    const T* __restrict__ b1,
    int64_t rows,
    int64_t width,
    int64_t rows_per_chunk) {
  using C = Convert<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= width) {  // width % VEC == 0, so col < width means all VEC columns exist
    return;
  }
  const bool has_bias = b1 != nullptr;
  Pack<T, VEC> bias;
  if (has_bias) {
    bias = load<VEC>(b1 + col);
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = chunk_end(rows, r0, rows_per_chunk);
  for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
    const int64_t offset = r * width + col;
    Pack<T, VEC> zv = load<VEC>(z + offset);
    Pack<T, VEC> hv;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (has_bias) {
        // Rounded to T before phi, so that h = phi(z) holds for the saved z.
        zv.v[v] = C::from_acc(C::to_acc(zv.v[v]) + C::to_acc(bias.v[v]));
      }
      hv.v[v] = C::from_acc(A::forward(C::to_acc(zv.v[v])));
    }
    if (has_bias) {
      store(z + offset, zv);
    }
    store(h + offset, hv);
  }
}

// g <- g * phi'(z). With db1: block (x, y) sums its chunk's rows of each of its
// columns and writes the sums to db1 (one chunk) or to partial[chunk][column].
template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kThreads) activation_backward_kernel(
    T* __restrict__ g,
    const T* __restrict__ z,
    T* __restrict__ db1,
    acc_t<T>* __restrict__ partial,
    int64_t rows,
    int64_t width,
    int64_t rows_per_chunk) {
  using C = Convert<T>;
  using Acc = acc_t<T>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = chunk_end(rows, r0, rows_per_chunk);
  Acc sum[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sum[v] = Acc(0);
  }
  if (col < width) {  // no early return: every thread reaches __syncthreads below
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const int64_t offset = r * width + col;
      Pack<T, VEC> gv = load<VEC>(g + offset);
      const Pack<T, VEC> zv = load<VEC>(z + offset);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        gv.v[v] = C::from_acc(mul_rn(C::to_acc(gv.v[v]), A::derivative(C::to_acc(zv.v[v]))));
        sum[v] += C::to_acc(gv.v[v]);  // db1 sums G_Z as stored
      }
      store(g + offset, gv);
    }
  }
  if (db1 == nullptr) {  // the same for the whole grid
    return;
  }

  // Add the block_y row lanes of each of the block's block_x * VEC columns, in
  // lane order. Lane y's sum of column group x, element v, sits at
  // shared[v * (kThreads + block_x) + y * block_x + x]: the stores of one v are
  // consecutive in the thread index, and the loads of one lane y are consecutive
  // in k = v * block_x + x (kThreads is a multiple of the 32 banks), so neither
  // has bank conflicts.
  __shared__ Acc shared[VEC * (kThreads + kMaxBlockX)];
  const int block_x = blockDim.x, block_y = blockDim.y;
  const int v_stride = kThreads + block_x;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    shared[v * v_stride + threadIdx.y * block_x + threadIdx.x] = sum[v];
  }
  __syncthreads();
  const int64_t tile_col = static_cast<int64_t>(blockIdx.x) * block_x * VEC;
  for (int k = threadIdx.y * block_x + threadIdx.x; k < block_x * VEC; k += kThreads) {
    const int v = k / block_x, x = k % block_x;
    const Acc* lanes = shared + v * v_stride + x;
    Acc total = lanes[0];  // lane 0
    for (int y = 1; y < block_y; ++y) {
      total += lanes[y * block_x];
    }
    const int64_t column = tile_col + static_cast<int64_t>(x) * VEC + v;
    if (column < width) {
      if (gridDim.y == 1) {
        db1[column] = C::from_acc(total);
      } else {
        partial[static_cast<int64_t>(blockIdx.y) * width + column] = total;
      }
    }
  }
}

// out[c] = sum over chunks of partial[chunk][c], chunks added in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_chunks_kernel(
    const acc_t<T>* __restrict__ partial, T* __restrict__ out, int64_t chunks, int64_t width) {
  using Acc = acc_t<T>;
  __shared__ Acc shared[kSumY][kSumX];
  const int64_t column = static_cast<int64_t>(blockIdx.x) * kSumX + threadIdx.x;
  Acc sum = Acc(0);
  if (column < width) {
    for (int64_t c = threadIdx.y; c < chunks; c += kSumY) {
      sum += partial[c * width + column];
    }
  }
  shared[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && column < width) {
    Acc total = shared[0][threadIdx.x];
    for (int y = 1; y < kSumY; ++y) {
      total += shared[y][threadIdx.x];
    }
    out[column] = Convert<T>::from_acc(total);
  }
}

// ---------------------------------------------------------------------------
// Sum of squares

// Sum over a block of kThreads threads, in a fixed tree order; valid in thread 0.
__device__ double block_sum(double x) {
  __shared__ double shared[kThreads];
  shared[threadIdx.x] = x;
  __syncthreads();
  for (unsigned stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      shared[threadIdx.x] += shared[threadIdx.x + stride];
    }
    __syncthreads();
  }
  return shared[0];
}

// This thread's share of sum p[i]^2: packs of VEC elements k = thread,
// thread + threads, ..., each loaded as one vector when p is aligned and
// element by element otherwise (the same additions either way), then the tail.
template <typename T>
__device__ double thread_sum_of_squares(const T* p, int64_t n, int64_t thread, int64_t threads) {
  constexpr int VEC = kAlignment / sizeof(T);
  const bool vectorized = is_aligned(p);
  const int64_t packs = n / VEC;
  double sum = 0;
  for (int64_t k = thread; k < packs; k += threads) {
    Pack<T, VEC> x;
    if (vectorized) {
      x = load<VEC>(p + k * VEC);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        x.v[v] = p[k * VEC + v];
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const double d = Convert<T>::to_acc(x.v[v]);
      sum = __fma_rn(d, d, sum);
    }
  }
  for (int64_t i = packs * VEC + thread; i < n; i += threads) {
    const double d = Convert<T>::to_acc(p[i]);
    sum = __fma_rn(d, d, sum);
  }
  return sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_kernel(
    const T* __restrict__ w1,
    int64_t n1,
    const T* __restrict__ w2,
    int64_t n2,
    double scale,
    T* __restrict__ s,
    double* __restrict__ partial) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * kThreads;
  const double sum = thread_sum_of_squares(w1, n1, thread, threads) +
      thread_sum_of_squares(w2, n2, thread, threads);
  const double total = block_sum(sum);
  if (threadIdx.x == 0) {
    if (gridDim.x == 1) {
      *s = Convert<T>::from_double(scale * total);
    } else {
      partial[blockIdx.x] = total;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) penalty_finish_kernel(
    const double* __restrict__ partial, int64_t count, double scale, T* __restrict__ s) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    sum += partial[i];
  }
  const double total = block_sum(sum);
  if (threadIdx.x == 0) {
    *s = Convert<T>::from_double(scale * total);
  }
}

// ---------------------------------------------------------------------------
// Dropout: grid-stride loops (the mask does not depend on the grid)

constexpr int64_t kMaxDropoutBlocks = 4 * kTargetBlocks;

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_kernel(
    T* __restrict__ h,
    uint8_t* __restrict__ mask,
    int64_t size,
    acc_t<T> keep,
    acc_t<T> scale,
    PhiloxState philox) {
  using C = Convert<T>;
  using Acc = acc_t<T>;
  uint64_t seed = philox.seed, offset = philox.offset;
  if (philox.seed_ptr != nullptr) {  // captured in a CUDA graph
    seed = static_cast<uint64_t>(*philox.seed_ptr);
    offset = static_cast<uint64_t>(*philox.offset_ptr) + philox.offset_intragraph;
  }
  const int64_t groups = (size + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const philox::Words words = philox::philox_words(seed, static_cast<uint64_t>(g), offset);
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t i = 4 * g + v;
      if (i < size) {
        // Compared in the accumulate type, as torch's fused dropout compares.
        const bool kept = static_cast<Acc>(philox::uniform(words.v[v])) < keep;
        mask[i] = kept ? 1 : 0;
        h[i] = C::from_acc(mul_rn(C::to_acc(h[i]), kept ? scale : Acc(0)));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) apply_dropout_kernel(
    T* __restrict__ g, const uint8_t* __restrict__ mask, int64_t size, acc_t<T> scale) {
  using C = Convert<T>;
  using Acc = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += stride) {
    g[i] = C::from_acc(mul_rn(C::to_acc(g[i]), mask[i] != 0 ? scale : Acc(0)));
  }
}

unsigned dropout_blocks(int64_t items) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, kThreads), 1, kMaxDropoutBlocks));
}

int64_t penalty_blocks(int64_t n1, int64_t n2) {
  return std::clamp<int64_t>(
      ceil_div(n1 + n2, kThreads * kPenaltyElementsPerThread), 1, kMaxPenaltyBlocks);
}

}  // namespace

// ---------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t bias_activation(
    T* z, T* h, const T* b1, int64_t rows, int64_t width, Activation act, cudaStream_t stream) {
  if (rows <= 0 || width <= 0) {
    return cudaSuccess;
  }
  constexpr int kVec = kAlignment / sizeof(T);
  const bool vectorized =
      width % kVec == 0 && is_aligned(z) && is_aligned(h) && (b1 == nullptr || is_aligned(b1));
  const ColumnPlan plan = plan_columns<T>(rows, width);
  dim3 grid;
  if (!column_grid(plan, width, vectorized ? kVec : 1, &grid)) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 block(plan.block_x, plan.block_y);
  const int64_t rows_per_chunk = plan.rows_per_chunk;
  visit_activation(act, [&](auto a) {
    using A = decltype(a);
    if (vectorized) {
      bias_activation_kernel<T, A, kVec>
          <<<grid, block, 0, stream>>>(z, h, b1, rows, width, rows_per_chunk);
    } else {
      bias_activation_kernel<T, A, 1>
          <<<grid, block, 0, stream>>>(z, h, b1, rows, width, rows_per_chunk);
    }
  });
  return cudaGetLastError();
}

template <typename T>
int64_t activation_backward_scratch(int64_t rows, int64_t width) {
  if (rows <= 0 || width <= 0) {
    return 0;
  }
  const ColumnPlan plan = plan_columns<T>(rows, width);
  return plan.chunks > 1 ? plan.chunks * width : 0;
}

template <typename T>
cudaError_t activation_backward(
    T* g,
    const T* z,
    T* db1,
    acc_t<T>* scratch,
    int64_t rows,
    int64_t width,
    Activation act,
    cudaStream_t stream) {
  if (width <= 0) {
    return cudaSuccess;
  }
  if (rows <= 0) {  // an empty sum: db1 = 0 (all-zero bits are 0 in every T)
    return db1 == nullptr ? cudaSuccess
                          : cudaMemsetAsync(db1, 0, static_cast<size_t>(width) * sizeof(T), stream);
  }
  constexpr int kVec = kAlignment / sizeof(T);
  const bool vectorized = width % kVec == 0 && is_aligned(g) && is_aligned(z);
  const ColumnPlan plan = plan_columns<T>(rows, width);
  const bool two_pass = db1 != nullptr && plan.chunks > 1;
  if (two_pass && scratch == nullptr) {
    return cudaErrorInvalidValue;
  }
  dim3 grid;
  if (!column_grid(plan, width, vectorized ? kVec : 1, &grid)) {
    return cudaErrorInvalidConfiguration;
  }
  const dim3 block(plan.block_x, plan.block_y);
  const int64_t rows_per_chunk = plan.rows_per_chunk;
  visit_activation(act, [&](auto a) {
    using A = decltype(a);
    if (vectorized) {
      activation_backward_kernel<T, A, kVec>
          <<<grid, block, 0, stream>>>(g, z, db1, scratch, rows, width, rows_per_chunk);
    } else {
      activation_backward_kernel<T, A, 1>
          <<<grid, block, 0, stream>>>(g, z, db1, scratch, rows, width, rows_per_chunk);
    }
  });
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || !two_pass) {
    return status;
  }
  const int64_t column_blocks = ceil_div(width, kSumX);
  if (column_blocks > INT_MAX) {
    return cudaErrorInvalidConfiguration;
  }
  sum_chunks_kernel<T><<<static_cast<unsigned>(column_blocks), dim3(kSumX, kSumY), 0, stream>>>(
      scratch, db1, plan.chunks, width);
  return cudaGetLastError();
}

int64_t penalty_scratch(int64_t n1, int64_t n2) {
  const int64_t blocks = penalty_blocks(n1, n2);
  return blocks > 1 ? blocks : 0;
}

template <typename T>
cudaError_t penalty(
    const T* w1,
    int64_t n1,
    const T* w2,
    int64_t n2,
    double weight_decay,
    T* s,
    double* scratch,
    cudaStream_t stream) {
  const int64_t blocks = penalty_blocks(n1, n2);
  if (blocks > 1 && scratch == nullptr) {
    return cudaErrorInvalidValue;
  }
  const double scale = 0.5 * weight_decay;
  penalty_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      w1, n1, w2, n2, scale, s, scratch);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || blocks == 1) {
    return status;
  }
  penalty_finish_kernel<T><<<1, kThreads, 0, stream>>>(scratch, blocks, scale, s);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dropout(
    T* h, uint8_t* mask, int64_t size, double keep, double scale, PhiloxState philox,
    cudaStream_t stream) {
  if (size <= 0) {
    return cudaSuccess;
  }
  using Acc = acc_t<T>;
  dropout_kernel<T><<<dropout_blocks(ceil_div(size, 4)), kThreads, 0, stream>>>(
      h, mask, size, static_cast<Acc>(keep), static_cast<Acc>(scale), philox);
  return cudaGetLastError();
}

template <typename T>
cudaError_t apply_dropout(
    T* g, const uint8_t* mask, int64_t size, double scale, cudaStream_t stream) {
  if (size <= 0) {
    return cudaSuccess;
  }
  apply_dropout_kernel<T><<<dropout_blocks(size), kThreads, 0, stream>>>(
      g, mask, size, static_cast<acc_t<T>>(scale));
  return cudaGetLastError();
}

#define MLP_EXT_INSTANTIATE(T)                                                               \
  template cudaError_t bias_activation<T>(                                                   \
      T*, T*, const T*, int64_t, int64_t, Activation, cudaStream_t);                         \
  template int64_t activation_backward_scratch<T>(int64_t, int64_t);                          \
  template cudaError_t activation_backward<T>(                                               \
      T*, const T*, T*, acc_t<T>*, int64_t, int64_t, Activation, cudaStream_t);              \
  template cudaError_t penalty<T>(                                                           \
      const T*, int64_t, const T*, int64_t, double, T*, double*, cudaStream_t);              \
  template cudaError_t dropout<T>(                                                           \
      T*, uint8_t*, int64_t, double, double, PhiloxState, cudaStream_t);                     \
  template cudaError_t apply_dropout<T>(T*, const uint8_t*, int64_t, double, cudaStream_t);

MLP_EXT_INSTANTIATE(float)
MLP_EXT_INSTANTIATE(double)
MLP_EXT_INSTANTIATE(__half)
MLP_EXT_INSTANTIATE(__nv_bfloat16)

#undef MLP_EXT_INSTANTIATE

}  // namespace mlp_ext::gpu
