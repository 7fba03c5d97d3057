// Fully fused CUDA kernels for narrow MLPs (widths <= 128); API in narrow_mlp.cuh.
//
// Shapes: n rows; d, h, q (in, hidden, out) each a multiple of 16 in [16, 128].
// Every array is contiguous row-major: x (n,d), w1 (h,d), w2 (q,h), z/H (n,h), o (n,q).
//
// Work decomposition (both kernels; 8 warps = 256 threads per block):
// * A batch tile is BM = 16 * strips rows (strips <= 8, the most that fits in shared
//   memory). Blocks are persistent: block b takes tiles b, b + grid, b + 2 grid, ...
//   and prefetches its next tile with cp.async into a second buffer while it works
//   on the current one. Rows past n are zero-filled in shared memory and never stored.
// * The per-row products (X W1^T, H W2^T, G_O W2, G_Z W1) are split into work items
//   of one 16-row strip x one 64-column chunk (up to 4 wmma accumulator tiles; 32
//   columns for the backward's G_H, to leave registers for the dW accumulators).
//   A warp computes its item on the tensor cores, stores the float accumulators to
//   its private staging area, and applies the elementwise epilogue (bias,
//   activation or its derivative, rounding) from there: 16-byte vectors, coalesced
//   row segments in global memory.
// * Backward weight gradients dW2 = G_O^T H and dW1 = G_Z^T X are sums over the
//   batch: each warp owns fixed 16-row bands of dW2/dW1 (up to 2 bands of up to 8
//   tiles, in registers for the block's whole life), so a block sums its tiles in a
//   fixed order; bias gradients are column sums by one thread per column. Each block
//   writes its partial sums to a workspace, and a second kernel adds the blocks'
//   partials in block order (no atomics anywhere: bitwise deterministic).
//
// wmma fragment shapes: m16n16k16 for __half / __nv_bfloat16, m16n16k8 for TF32
// (float in memory, rounded to TF32 on load). Accumulation is always float32.
//
// Shared-memory rows of T are padded by one 16-byte vector (ld = width + 16/sizeof(T)):
// row starts then shift by 4 banks per row, so the 8 rows an 8x16-byte fragment load
// touches hit distinct banks. Every fragment pointer is 32-byte aligned (wmma
// requires it): tile offsets are multiples of 16 elements (8 for TF32 k-steps,
// 32 bytes) and every region starts on a 128-byte boundary.
#include "narrow_mlp.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

namespace mlp_ext {
namespace {

namespace wmma = nvcuda::wmma;

using namespace narrow;  // the constants and the shared-memory layout (narrow_path.h)

template <typename T>
struct ForwardParams {
  const T* x;
  const T* w1;
  const T* w2;
  const T* b1;  // nullable
  const T* b2;  // nullable
  T* o;
  T* z;         // nullable
  T* hid;       // nullable
  int64_t n, tiles;
  int d, h, q;
  Activation act;
  SmemLayout L;
};

template <typename T>
struct BackwardParams {
  const T* grad_o;
  const T* x;
  const T* w1;
  const T* w2;
  const T* z;
  const T* hid;
  T* dx;                 // nullable
  float* partials;       // gridDim.x x E floats: [dW2 (q*h) | dW1 (h*d) | db1 (h) | db2 (q)]
  int64_t n, tiles, E;
  int d, h, q;
  Activation act;
  bool need_dw1, need_dw2, need_db1, need_db2;
  SmemLayout L;
};

template <typename T>
struct ReduceParams {
  const float* partials;
  int blocks;
  int64_t E;
  int d, h, q;
  const T* w1;
  const T* w2;
  const T* grad_s;  // nullable
  float weight_decay;
  T* dw1;  // each nullable
  T* dw2;
  T* db1;
  T* db2;
};

// ---------------------------------------------------------------------------
// Device code: sm_80 and newer (bf16 and TF32 wmma, cp.async). In a build for several
// architectures the kernels of older targets have empty bodies; narrow_mlp_supported is
// false on such devices, so those never run. The host pass sees everything.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

constexpr int kChunkTiles = kChunk / 16;       // accumulator tiles per work item
// The backward's G_H items are half as wide: the dW accumulators already hold 128
// registers per thread, and the Z prefetch below needs room too.
constexpr int kGradChunk = 32;
constexpr int kBandTiles = kMaxWidth / 16;     // tiles in a 16-row band of dW1 / dW2
// dW2 has q/16 bands and dW1 h/16 bands: at most 16, so at most 2 per warp.
constexpr int kBandsPerWarp = (2 * kMaxWidth / 16 + kWarps - 1) / kWarps;
static_assert(kBandsPerWarp == 2, "band bookkeeping below assumes two bands per warp");

// Element types: storage type T, wmma operand type, k per mma, float conversions.

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  using Op = __half;              // wmma operand type
  static constexpr int kK = 16;   // k per mma
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Op = __nv_bfloat16;
  static constexpr int kK = 16;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Elem<float> {
  using Op = wmma::precision::tf32;
  static constexpr int kK = 8;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector; also the row padding

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, Elem<T>::kK, typename Elem<T>::Op,
                             wmma::row_major>;
template <typename T>
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, Elem<T>::kK, typename Elem<T>::Op,
                              wmma::col_major>;  // A given transposed: A(m, k) at p[m + k*ld]
template <typename T, typename Layout>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, Elem<T>::kK, typename Elem<T>::Op, Layout>;
template <typename T>
using Acc = wmma::fragment<wmma::accumulator, 16, 16, Elem<T>::kK, float>;

template <typename T>
struct alignas(16) Vec {
  T e[kVec<T>];
};

// ---------------------------------------------------------------------------
// Device helpers

template <typename T>
__device__ __forceinline__ float to_float(T v) { return Elem<T>::to_float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v) { return Elem<T>::from_float(v); }

template <typename T>
__device__ __forceinline__ Vec<T> load16(const T* p) {
  Vec<T> v;
  *reinterpret_cast<uint4*>(&v) = *reinterpret_cast<const uint4*>(p);
  return v;
}
template <typename T>
__device__ __forceinline__ void store16(T* p, const Vec<T>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}
template <typename T>
__device__ __forceinline__ Vec<T> zero16() {
  Vec<T> v;
  *reinterpret_cast<uint4*>(&v) = make_uint4(0, 0, 0, 0);
  return v;
}

__device__ __forceinline__ float4 ld_shared_float4(unsigned shared_address) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(shared_address)
               : "memory");
  return v;
}

// kVec<T> consecutive floats from shared memory (16-byte aligned) into f.
template <typename T>
__device__ __forceinline__ void load_floats(float (&f)[kVec<T>], const float* p) {
  if constexpr (kVec<T> == 8) {
    // A lane reads 32 bytes as two 16-byte loads. The 8 lanes of a quarter-warp
    // (one load phase) start 32 bytes apart, so their first halves alone span 256
    // bytes: two per bank. Lanes whose 32 bytes lie in an odd 128-byte line read
    // their second half first, so that each load of a quarter-warp covering 256
    // contiguous bytes hits every bank once. (Spelled in PTX: the compiler would
    // see that both orders load the same values and undo the swap.)
    const unsigned base = static_cast<unsigned>(__cvta_generic_to_shared(p));
    const unsigned swap = (base >> 7) & 1;
    const float4 a = ld_shared_float4(base + 16 * swap), b = ld_shared_float4(base + 16 * (swap ^ 1));
    const float4 lo = swap ? b : a, hi = swap ? a : b;
    f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w;
    f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
  } else {
    static_assert(kVec<T> == 4, "16-byte vectors of float or of a half type");
    const float4 a = *reinterpret_cast<const float4*>(p);
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
  }
}

// 16-byte global -> shared copy that bypasses L1 (cp.async.cg, sm_80+).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst),
               "l"(__cvta_generic_to_global(gmem_src))
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until at most N of this thread's most recent groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies rows [row0, row0 + rows) of a (total_rows x cols) row-major global array
// into shared memory with leading dimension ld (all threads of the block take part).
// Rows at or past total_rows are zero-filled so that they add nothing to any sum.
template <typename T>
__device__ __forceinline__ void load_rows_async(
    T* dst, int ld, const T* src, int64_t row0, int rows, int cols, int64_t total_rows) {
  const int per_row = cols / kVec<T>;
  for (int i = threadIdx.x; i < rows * per_row; i += kThreads) {
    const int r = i / per_row;
    const int c = (i - r * per_row) * kVec<T>;
    T* to = dst + r * ld + c;
    if (row0 + r < total_rows) {
      cp_async16(to, src + (row0 + r) * cols + c);
    } else {
      store16(to, zero16<T>());
    }
  }
}

// wmma.load / wmma.store on shared memory with the .shared state space spelled
// out. The wmma API takes generic pointers; for __half the compiler proves they
// point to shared memory (LDSM in SASS), for bf16 and TF32 it does not and emits
// generic loads (several LD per fragment instead of one LDSM), hence these.
// Each fragment here is four 32-bit registers (8 bf16 or 4 tf32 per lane).
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

#define MLP_EXT_WMMA_LOAD_SHARED(USE, PTX_USE, LAYOUT, PTX_LAYOUT, SHAPE, K, TYPE, PTX_TYPE)   \
  __device__ __forceinline__ void load_shared(                                                 \
      wmma::fragment<wmma::USE, 16, 16, K, TYPE, wmma::LAYOUT>& f, const void* p, int ld) {    \
    unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);                                        \
    asm volatile("wmma.load." PTX_USE ".sync.aligned." PTX_LAYOUT "." #SHAPE ".shared." PTX_TYPE \
                 " {%0, %1, %2, %3}, [%4], %5;\n"                                              \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                              \
                 : "r"(shared_address(p)), "r"(ld)                                             \
                 : "memory");                                                                  \
  }
#define MLP_EXT_WMMA_LOADS(SHAPE, K, TYPE, PTX_TYPE)                        \
  MLP_EXT_WMMA_LOAD_SHARED(matrix_a, "a", row_major, "row", SHAPE, K, TYPE, PTX_TYPE)   \
  MLP_EXT_WMMA_LOAD_SHARED(matrix_a, "a", col_major, "col", SHAPE, K, TYPE, PTX_TYPE)   \
  MLP_EXT_WMMA_LOAD_SHARED(matrix_b, "b", row_major, "row", SHAPE, K, TYPE, PTX_TYPE)   \
  MLP_EXT_WMMA_LOAD_SHARED(matrix_b, "b", col_major, "col", SHAPE, K, TYPE, PTX_TYPE)
MLP_EXT_WMMA_LOADS(m16n16k16, 16, __nv_bfloat16, "bf16")
MLP_EXT_WMMA_LOADS(m16n16k8, 8, wmma::precision::tf32, "tf32")
#undef MLP_EXT_WMMA_LOADS
#undef MLP_EXT_WMMA_LOAD_SHARED

// Fragment load from shared memory; TF32 operands are rounded (cvt.rna) as the
// TF32 wmma requires.
template <typename Frag, typename T>
__device__ __forceinline__ void load_fragment(Frag& f, const T* p, int ld) {
  if constexpr (std::is_same_v<T, __half>) {
    wmma::load_matrix_sync(f, p, ld);
  } else {
    load_shared(f, p, ld);
  }
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) {
      f.x[i] = wmma::__float_to_tf32(f.x[i]);
    }
  }
}

// Accumulator store to shared memory (row-major, ld floats); the m16n16k8 store is
// spelled out for the same reason as the loads above.
template <typename T>
__device__ __forceinline__ void store_accumulator_shared(float* p, const Acc<T>& acc, int ld) {
  if constexpr (std::is_same_v<T, float>) {
    asm volatile(
        "wmma.store.d.sync.aligned.row.m16n16k8.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;\n"
        ::"r"(shared_address(p)), "f"(acc.x[0]), "f"(acc.x[1]), "f"(acc.x[2]), "f"(acc.x[3]),
        "f"(acc.x[4]), "f"(acc.x[5]), "f"(acc.x[6]), "f"(acc.x[7]), "r"(ld)
        : "memory");
  } else {
    wmma::store_matrix_sync(p, acc, ld, wmma::mem_row_major);
  }
}

// acc[t] = A B[:, 16t : 16t+16] for t < tiles, where A (16 x k_total) is row-major at
// `a` and B (k_total x 16*tiles) is either row-major at `b` (B(k, n) = b[k*ldb + n])
// or, for BLayout = col_major, the transpose of a row-major weight: B(k, n) = b[n*ldb + k].
template <typename T, typename BLayout, int kTiles>
__device__ __forceinline__ void strip_product(
    Acc<T> (&acc)[kTiles], int tiles, const T* a, int lda, const T* b, int ldb, int k_total) {
  constexpr bool kTransposedB = std::is_same_v<BLayout, wmma::col_major>;
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    wmma::fill_fragment(acc[t], 0.0f);
  }
  for (int k = 0; k < k_total; k += Elem<T>::kK) {
    FragA<T> fa;
    load_fragment(fa, a + k, lda);
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      if (t < tiles) {
        FragB<T, BLayout> fb;
        load_fragment(fb, kTransposedB ? b + t * 16 * ldb + k : b + k * ldb + t * 16, ldb);
        wmma::mma_sync(acc[t], fa, fb, acc[t]);
      }
    }
  }
}

template <typename T, int kTiles>
__device__ __forceinline__ void store_stage(float* stage, Acc<T> (&acc)[kTiles], int tiles) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    if (t < tiles) {
      store_accumulator_shared<T>(stage + t * 16, acc[t], kStageLd);
    }
  }
}

// acc[j] += A^T B[:, 16j : 16j+16] for j < tiles: A^T is the transpose of a
// (k_total x 16) column band of a row-major strip at `a`, B (k_total x 16*tiles)
// row-major at `b`. k runs over the tile's rows, i.e. this sums over the batch.
template <typename T>
__device__ __forceinline__ void band_product(
    Acc<T> (&acc)[kBandTiles], int tiles, const T* a, int lda, const T* b, int ldb, int k_total) {
  for (int k = 0; k < k_total; k += Elem<T>::kK) {
    FragAT<T> fa;
    load_fragment(fa, a + k * lda, lda);
#pragma unroll
    for (int j = 0; j < kBandTiles; ++j) {
      if (j < tiles) {
        FragB<T, wmma::row_major> fb;
        load_fragment(fb, b + k * ldb + j * 16, ldb);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
  }
}

// The chunk epilogues below read a warp's staging area (16 rows x `width` floats)
// one 16-byte output vector per lane and step; `row0` is the global row of the
// strip's first row, `col0` the chunk's first column.

// Forward, first layer: z = acc + b1 (rounded to T), H = phi(z). Writes z and H to
// global memory (rows < n, where requested) and H to the shared tile for layer 2.
template <typename A, typename T>
__device__ __forceinline__ void bias_activation_epilogue(
    const float* stage, int width, const float* b1s, int64_t row0, int64_t n, int h, int col0,
    T* z, T* hid, T* hs, int ldh, int lane) {
  constexpr int V = kVec<T>;
  const int per_row = width / V;
  for (int v = lane; v < 16 * per_row; v += 32) {
    const int r = v / per_row;
    const int c = (v - r * per_row) * V;
    float acc[V], bias[V];
    load_floats<T>(acc, stage + r * kStageLd + c);
    load_floats<T>(bias, b1s + col0 + c);
    Vec<T> zv, hv;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      zv.e[e] = from_float<T>(acc[e] + bias[e]);
      // phi of the z that is saved, so that backward's phi'(z) sees the same value.
      hv.e[e] = from_float<T>(A::forward(to_float(zv.e[e])));
    }
    const int64_t row = row0 + r;
    if (row < n) {
      const int64_t at = row * h + col0 + c;
      if (z) store16(z + at, zv);
      if (hid) store16(hid + at, hv);
    }
    store16(hs + r * ldh + col0 + c, hv);
  }
}

// out = acc (+ bias), rounded to T, stored for rows < n (forward o, backward dX).
template <typename T>
__device__ __forceinline__ void store_epilogue(
    const float* stage, int width, const float* bias_s, int64_t row0, int64_t n, int ld_out,
    int col0, T* out, int lane) {
  constexpr int V = kVec<T>;
  const int per_row = width / V;
  for (int v = lane; v < 16 * per_row; v += 32) {
    const int r = v / per_row;
    const int c = (v - r * per_row) * V;
    const int64_t row = row0 + r;
    if (row >= n) continue;
    float acc[V];
    load_floats<T>(acc, stage + r * kStageLd + c);
    if (bias_s) {
      float bias[V];
      load_floats<T>(bias, bias_s + col0 + c);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += bias[e];
    }
    Vec<T> ov;
#pragma unroll
    for (int e = 0; e < V; ++e) ov.e[e] = from_float<T>(acc[e]);
    store16(out + row * ld_out + col0 + c, ov);
  }
}

// Vectors of a 16 x kGradChunk chunk that one lane handles in the backward epilogue.
template <typename T>
constexpr int kLaneVecs = 16 * kGradChunk / kVec<T> / 32;

// Z vectors for the G_Z epilogue, loaded before the G_H product so that the loads
// are in flight while the tensor cores work. Same lane -> (row, column) map as below.
template <typename T>
__device__ __forceinline__ void load_z_chunk(
    Vec<T> (&zr)[kLaneVecs<T>], const T* z, int width, int64_t row0, int64_t n, int h, int col0,
    int lane) {
  constexpr int V = kVec<T>;
  const int per_row = width / V;
#pragma unroll
  for (int i = 0; i < kLaneVecs<T>; ++i) {
    const int v = lane + 32 * i;
    const int r = v / per_row;
    const int c = (v - r * per_row) * V;
    zr[i] = (v < 16 * per_row && row0 + r < n) ? load16(z + (row0 + r) * h + col0 + c) : zero16<T>();
  }
}

// Backward: G_Z = G_H * phi'(Z) (0 for rows >= n), rounded to T into the shared tile.
template <typename A, typename T>
__device__ __forceinline__ void activation_grad_epilogue(
    const float* stage, int width, const Vec<T> (&zr)[kLaneVecs<T>], int64_t row0, int64_t n,
    T* gzs, int ldh, int col0, int lane) {
  constexpr int V = kVec<T>;
  const int per_row = width / V;
#pragma unroll
  for (int i = 0; i < kLaneVecs<T>; ++i) {
    const int v = lane + 32 * i;
    if (v < 16 * per_row) {
      const int r = v / per_row;
      const int c = (v - r * per_row) * V;
      const bool valid = row0 + r < n;
      float g[V];
      load_floats<T>(g, stage + r * kStageLd + c);
      Vec<T> out;
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out.e[e] = from_float<T>(valid ? g[e] * A::derivative(to_float(zr[i].e[e])) : 0.0f);
      }
      store16(gzs + r * ldh + col0 + c, out);
    }
  }
}

// Backward without a saved H: H = phi(Z) for this chunk, into the shared H tile
// (the same rounding as the forward's, so bitwise the H it would have saved).
// Rows past n hold phi(0): finite, and their G_O rows are zero.
template <typename A, typename T>
__device__ __forceinline__ void hidden_epilogue(
    int width, const Vec<T> (&zr)[kLaneVecs<T>], T* hs, int ldh, int col0, int lane) {
  constexpr int V = kVec<T>;
  const int per_row = width / V;
#pragma unroll
  for (int i = 0; i < kLaneVecs<T>; ++i) {
    const int v = lane + 32 * i;
    if (v < 16 * per_row) {
      const int r = v / per_row;
      const int c = (v - r * per_row) * V;
      Vec<T> out;
#pragma unroll
      for (int e = 0; e < V; ++e) out.e[e] = from_float<T>(A::forward(to_float(zr[i].e[e])));
      store16(hs + r * ldh + col0 + c, out);
    }
  }
}

// Calls f(Act<A>{}) for the run-time activation (the device-side twin of
// visit_activation): the activation is a compile-time constant inside each epilogue.
template <typename F>
__device__ __forceinline__ void with_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Identity: f(Act<Activation::Identity>{}); break;
    case Activation::Relu: f(Act<Activation::Relu>{}); break;
    case Activation::Sigmoid: f(Act<Activation::Sigmoid>{}); break;
    case Activation::Tanh: f(Act<Activation::Tanh>{}); break;
    case Activation::Gelu: f(Act<Activation::Gelu>{}); break;
    case Activation::GeluTanh: f(Act<Activation::GeluTanh>{}); break;
    case Activation::Silu: f(Act<Activation::Silu>{}); break;
    case Activation::QuickGelu: f(Act<Activation::QuickGelu>{}); break;
  }
}

#endif  // sm_80+ device code

// ---------------------------------------------------------------------------
// Forward: o = phi(x W1^T + b1) W2^T + b2, saving z and H.

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) narrow_forward_kernel(const __grid_constant__ ForwardParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemLayout& L = p.L;
  T* w1s = reinterpret_cast<T*>(smem + L.w1);
  T* w2s = reinterpret_cast<T*>(smem + L.w2);
  float* b1s = reinterpret_cast<float*>(smem + L.b1);
  float* b2s = reinterpret_cast<float*>(smem + L.b2);
  T* hs = reinterpret_cast<T*>(smem + L.mid);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* stage = reinterpret_cast<float*>(smem + L.stage) + warp * kStageFloats;
  const int ldd = p.d + kVec<T>, ldh = p.h + kVec<T>;
  const int bm = 16 * L.strips;
  const int h_items = L.strips * ((p.h + kChunk - 1) / kChunk);
  const int q_items = L.strips * ((p.q + kChunk - 1) / kChunk);

  // Once per block: the weights (async, with the first tile) and the biases.
  load_rows_async(w1s, ldd, p.w1, 0, p.h, p.d, p.h);
  load_rows_async(w2s, ldh, p.w2, 0, p.q, p.h, p.q);
  for (int i = threadIdx.x; i < p.h; i += kThreads) b1s[i] = p.b1 ? to_float(p.b1[i]) : 0.0f;
  for (int i = threadIdx.x; i < p.q; i += kThreads) b2s[i] = p.b2 ? to_float(p.b2[i]) : 0.0f;
  int64_t tile = blockIdx.x;
  if (tile < p.tiles) {
    load_rows_async(reinterpret_cast<T*>(smem + L.in[0]), ldd, p.x, tile * bm, bm, p.d, p.n);
  }
  cp_async_commit();

  for (int it = 0; tile < p.tiles; tile += gridDim.x, ++it) {
    const T* xs = reinterpret_cast<const T*>(smem + L.in[it & 1]);
    const int64_t next = tile + gridDim.x;
    if (next < p.tiles) {
      load_rows_async(reinterpret_cast<T*>(smem + L.in[(it + 1) & 1]), ldd, p.x, next * bm, bm,
                      p.d, p.n);
    }
    cp_async_commit();    // (possibly empty) group of the next tile
    cp_async_wait<1>();   // this tile's group (and the weights) have landed ...
    __syncthreads();      // ... for every thread's copies
    const int64_t row0 = tile * bm;

    // Layer 1: Z = X W1^T + b1, H = phi(Z). W1 (h x d) read as the col-major B = W1^T.
    for (int item = warp; item < h_items; item += kWarps) {
      const int s = item % L.strips, col0 = item / L.strips * kChunk;
      const int width = min(kChunk, p.h - col0);
      Acc<T> acc[kChunkTiles];
      strip_product<T, wmma::col_major>(acc, width / 16, xs + s * 16 * ldd, ldd,
                                        w1s + col0 * ldd, ldd, p.d);
      store_stage<T>(stage, acc, width / 16);
      __syncwarp();
      with_activation(p.act, [&](auto act) {
        bias_activation_epilogue<decltype(act)>(stage, width, b1s, row0 + s * 16, p.n, p.h, col0,
                                                p.z, p.hid, hs + s * 16 * ldh, ldh, lane);
      });
      __syncwarp();  // the staging area is rewritten by the next item
    }
    __syncthreads();  // H complete: layer 2 items read strips written by other warps

    // Layer 2: O = H W2^T + b2.
    for (int item = warp; item < q_items; item += kWarps) {
      const int s = item % L.strips, col0 = item / L.strips * kChunk;
      const int width = min(kChunk, p.q - col0);
      Acc<T> acc[kChunkTiles];
      strip_product<T, wmma::col_major>(acc, width / 16, hs + s * 16 * ldh, ldh,
                                        w2s + col0 * ldh, ldh, p.h);
      store_stage<T>(stage, acc, width / 16);
      __syncwarp();
      store_epilogue<T>(stage, width, b2s, row0 + s * 16, p.n, p.q, col0, p.o, lane);
      __syncwarp();
    }
    __syncthreads();  // before the next iteration overwrites H and this X buffer
  }
  cp_async_wait<0>();
#endif
}

// ---------------------------------------------------------------------------
// Backward: dX on chip, per-block partial dW2, dW1, db1, db2.

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) narrow_backward_kernel(const __grid_constant__ BackwardParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) unsigned char smem[];
  const SmemLayout& L = p.L;
  T* w1s = reinterpret_cast<T*>(smem + L.w1);
  T* w2s = reinterpret_cast<T*>(smem + L.w2);
  T* gzs = reinterpret_cast<T*>(smem + L.mid);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* stage = reinterpret_cast<float*>(smem + L.stage) + warp * kStageFloats;
  const int tid = threadIdx.x;
  const int ldd = p.d + kVec<T>, ldh = p.h + kVec<T>, ldq = p.q + kVec<T>;
  const int bm = 16 * L.strips;
  const bool need_gz = p.dx != nullptr || p.need_dw1 || p.need_db1;
  // No saved H (the forward kept only z): dW2's H = phi(Z) is recomputed on chip.
  const bool recompute_h = p.need_dw2 && p.hid == nullptr;
  const int h_items = L.strips * (p.h / kGradChunk + (p.h % kGradChunk != 0));
  const int d_items = L.strips * ((p.d + kChunk - 1) / kChunk);
  const int q_bands = p.q / 16, h_bands = p.h / 16;

  // This warp's bands: band index warp + kWarps * k; bands [0, q/16) are dW2's,
  // the next h/16 are dW1's. The accumulators live for the block's whole life.
  Acc<T> dw[kBandsPerWarp][kBandTiles];
#pragma unroll
  for (int k = 0; k < kBandsPerWarp; ++k) {
#pragma unroll
    for (int j = 0; j < kBandTiles; ++j) wmma::fill_fragment(dw[k][j], 0.0f);
  }
  float bias_sum = 0.0f;  // thread t < h: db1[t]; h <= t < h + q: db2[t - h]

  auto load_tile = [&](int buf, int64_t t) {
    unsigned char* in = smem + L.in[buf];
    const int64_t r0 = t * bm;
    load_rows_async(reinterpret_cast<T*>(in + L.in_go), ldq, p.grad_o, r0, bm, p.q, p.n);
    if (p.need_dw2 && !recompute_h) {
      load_rows_async(reinterpret_cast<T*>(in + L.in_h), ldh, p.hid, r0, bm, p.h, p.n);
    }
    if (p.need_dw1) load_rows_async(reinterpret_cast<T*>(in + L.in_x), ldd, p.x, r0, bm, p.d, p.n);
  };

  load_rows_async(w1s, ldd, p.w1, 0, p.h, p.d, p.h);
  load_rows_async(w2s, ldh, p.w2, 0, p.q, p.h, p.q);
  int64_t tile = blockIdx.x;
  if (tile < p.tiles) load_tile(0, tile);
  cp_async_commit();

  for (int it = 0; tile < p.tiles; tile += gridDim.x, ++it) {
    unsigned char* in = smem + L.in[it & 1];
    const T* gos = reinterpret_cast<const T*>(in + L.in_go);
    T* hs = reinterpret_cast<T*>(in + L.in_h);  // written here only when recompute_h
    const T* xs = reinterpret_cast<const T*>(in + L.in_x);
    if (tile + gridDim.x < p.tiles) load_tile((it + 1) & 1, tile + gridDim.x);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int64_t row0 = tile * bm;

    // G_H = G_O W2 (W2 is q x h: row-major B), G_Z = G_H * phi'(Z) into the shared tile
    // (and H = phi(Z) when it was not saved).
    if (need_gz || recompute_h) {
      for (int item = warp; item < h_items; item += kWarps) {
        const int s = item % L.strips, col0 = item / L.strips * kGradChunk;
        const int width = min(kGradChunk, p.h - col0);
        Vec<T> zr[kLaneVecs<T>];
        load_z_chunk<T>(zr, p.z, width, row0 + s * 16, p.n, p.h, col0, lane);
        if (need_gz) {
          Acc<T> acc[kGradChunk / 16];
          strip_product<T, wmma::row_major>(acc, width / 16, gos + s * 16 * ldq, ldq,
                                            w2s + col0, ldh, p.q);
          store_stage<T>(stage, acc, width / 16);
          __syncwarp();
        }
        with_activation(p.act, [&](auto act) {
          using A = decltype(act);
          if (need_gz) {
            activation_grad_epilogue<A>(stage, width, zr, row0 + s * 16, p.n,
                                        gzs + s * 16 * ldh, ldh, col0, lane);
          }
          if (recompute_h) hidden_epilogue<A>(width, zr, hs + s * 16 * ldh, ldh, col0, lane);
        });
        __syncwarp();
      }
    }
    __syncthreads();  // G_Z (and H) complete for every strip

    // dX = G_Z W1 (W1 is h x d: row-major B).
    if (p.dx != nullptr) {
      for (int item = warp; item < d_items; item += kWarps) {
        const int s = item % L.strips, col0 = item / L.strips * kChunk;
        const int width = min(kChunk, p.d - col0);
        Acc<T> acc[kChunkTiles];
        strip_product<T, wmma::row_major>(acc, width / 16, gzs + s * 16 * ldh, ldh, w1s + col0,
                                          ldd, p.h);
        store_stage<T>(stage, acc, width / 16);
        __syncwarp();
        store_epilogue<T>(stage, width, nullptr, row0 + s * 16, p.n, p.d, col0, p.dx, lane);
        __syncwarp();
      }
    }

    // dW2 band i += G_O[:, 16i:16i+16]^T H,  dW1 band i += G_Z[:, 16i:16i+16]^T X.
#pragma unroll
    for (int k = 0; k < kBandsPerWarp; ++k) {
      const int band = warp + kWarps * k;
      if (band < q_bands) {
        if (p.need_dw2) band_product<T>(dw[k], h_bands, gos + band * 16, ldq, hs, ldh, bm);
      } else if (band < q_bands + h_bands) {
        if (p.need_dw1) {
          band_product<T>(dw[k], p.d / 16, gzs + (band - q_bands) * 16, ldh, xs, ldd, bm);
        }
      }
    }

    // Bias gradients: column sums, one thread per column, rows in order.
    if (tid < p.h) {
      if (p.need_db1) {
        for (int r = 0; r < bm; ++r) bias_sum += to_float(gzs[r * ldh + tid]);
      }
    } else if (tid < p.h + p.q) {
      if (p.need_db2) {
        for (int r = 0; r < bm; ++r) bias_sum += to_float(gos[r * ldq + tid - p.h]);
      }
    }
    __syncthreads();  // before the next iteration overwrites G_Z and this input buffer
  }
  cp_async_wait<0>();

  // This block's partial sums.
  if (p.partials == nullptr) return;
  float* part = p.partials + blockIdx.x * p.E;
  const int64_t dw1_at = int64_t{p.q} * p.h, db1_at = dw1_at + int64_t{p.h} * p.d;
  const int64_t db2_at = db1_at + p.h;
#pragma unroll
  for (int k = 0; k < kBandsPerWarp; ++k) {
    const int band = warp + kWarps * k;
    if (band < q_bands) {
      if (p.need_dw2) {
#pragma unroll
        for (int j = 0; j < kBandTiles; ++j) {
          if (j < h_bands) {
            wmma::store_matrix_sync(part + band * 16 * p.h + j * 16, dw[k][j], p.h,
                                    wmma::mem_row_major);
          }
        }
      }
    } else if (band < q_bands + h_bands) {
      if (p.need_dw1) {
#pragma unroll
        for (int j = 0; j < kBandTiles; ++j) {
          if (j < p.d / 16) {
            wmma::store_matrix_sync(part + dw1_at + (band - q_bands) * 16 * p.d + j * 16,
                                    dw[k][j], p.d, wmma::mem_row_major);
          }
        }
      }
    }
  }
  if (tid < p.h) {
    if (p.need_db1) part[db1_at + tid] = bias_sum;
  } else if (tid < p.h + p.q) {
    if (p.need_db2) part[db2_at + tid - p.h] = bias_sum;
  }
#endif
}

// ---------------------------------------------------------------------------
// Reduction: each output element sums the blocks' partials in block order, then
// adds g_s * weight_decay * W for the weight gradients.

template <typename T>
__global__ void __launch_bounds__(256) narrow_reduce_kernel(const __grid_constant__ ReduceParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int64_t dw1_at = int64_t{p.q} * p.h, db1_at = dw1_at + int64_t{p.h} * p.d;
  const int64_t db2_at = db1_at + p.h;
  const bool add_decay = p.grad_s != nullptr && p.weight_decay != 0.0f;
  const float decay = add_decay ? p.weight_decay * to_float(*p.grad_s) : 0.0f;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < p.E;
       e += int64_t{gridDim.x} * blockDim.x) {
    T* out;
    const T* w = nullptr;
    int64_t i;
    if (e < dw1_at) {
      out = p.dw2, w = p.w2, i = e;
    } else if (e < db1_at) {
      out = p.dw1, w = p.w1, i = e - dw1_at;
    } else if (e < db2_at) {
      out = p.db1, i = e - db1_at;
    } else {
      out = p.db2, i = e - db2_at;
    }
    if (out == nullptr) continue;
    float sum = 0.0f;
#pragma unroll 4
    for (int b = 0; b < p.blocks; ++b) sum += p.partials[b * p.E + e];
    if (w != nullptr && add_decay) sum += decay * to_float(w[i]);
    out[i] = from_float<T>(sum);
  }
#endif
}

// ---------------------------------------------------------------------------
// Host side

// Testing and tuning knob: MLP_EXT_NARROW_MAX_BLOCKS=k caps the grid at k blocks, so
// that small problems exercise the persistent loop (several tiles per block).
int64_t max_blocks() {
  const char* v = std::getenv("MLP_EXT_NARROW_MAX_BLOCKS");
  const long long k = v ? std::atoll(v) : 0;
  return k > 0 ? k : std::numeric_limits<int64_t>::max();
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // max dynamic shared memory per block (opt-in)
  int major = 0;
};

// The current device's properties, read once per device.
DeviceInfo current_device_info() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();  // not ours to leave behind
    return {};
  }
  static std::mutex mutex;
  static std::vector<std::pair<int, DeviceInfo>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& entry : cache) {
    if (entry.first == device) return entry.second;
  }
  DeviceInfo info;
  if (cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device) !=
          cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  cache.emplace_back(device, info);
  return info;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Blocks of `kernel` resident per SM with `smem` bytes of dynamic shared memory.
// The first time a kernel is seen on a device its dynamic shared-memory limit is
// raised to the device's opt-in maximum (launches above 48 KB need that). Cached
// per (device, kernel, smem), so the launch path is a lookup.
template <typename Kernel>
cudaError_t blocks_per_sm(Kernel kernel, int smem, int smem_optin, int* blocks) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  struct Entry {
    int device;
    const void* kernel;
    int smem;  // -1: the entry records that the limit was raised
    int blocks;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  bool raised = false;
  for (const auto& e : cache) {
    if (e.device != device || e.kernel != key) continue;
    if (e.smem == smem) {
      *blocks = e.blocks;
      return cudaSuccess;
    }
    raised = raised || e.smem == -1;
  }
  if (!raised) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_optin);
    if (err != cudaSuccess) return err;
    cache.push_back({device, key, -1, 0});
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (*blocks < 1) return cudaErrorInvalidConfiguration;
  cache.push_back({device, key, smem, *blocks});
  return cudaSuccess;
}

struct BackwardPlan {
  SmemLayout layout;
  int64_t tiles = 0;
  int grid = 0;           // blocks of the main kernel (0: no rows)
  int64_t elements = 0;   // E: floats per block partial
  bool reduce = false;    // any of dW1, dW2, db1, db2 requested
  size_t workspace = 0;   // bytes
  cudaError_t status = cudaSuccess;
};

template <typename T>
BackwardPlan plan_backward(const NarrowBackwardArgs& a, const DeviceInfo& info) {
  BackwardPlan plan;
  const int strips = choose_strips(true, a.d, a.h, a.q, a.dtype, info.smem_optin);
  plan.layout = make_layout(true, static_cast<int>(a.d), static_cast<int>(a.h),
                            static_cast<int>(a.q), sizeof(T), strips);
  plan.tiles = (a.n + 16 * strips - 1) / (16 * strips);
  plan.elements = a.q * a.h + a.h * a.d + a.h + a.q;
  plan.reduce = a.dw1 || a.dw2 || a.db1 || a.db2;
  if (plan.tiles > 0) {
    int per_sm = 0;
    plan.status = blocks_per_sm(narrow_backward_kernel<T>, plan.layout.bytes, info.smem_optin, &per_sm);
    if (plan.status != cudaSuccess) return plan;
    plan.grid = static_cast<int>(
        std::min({plan.tiles, int64_t{info.sms} * per_sm, max_blocks()}));
  }
  if (plan.reduce) plan.workspace = sizeof(float) * plan.grid * plan.elements;
  return plan;
}

template <typename T>
cudaError_t launch_forward(const NarrowForwardArgs& a, cudaStream_t stream) {
  const DeviceInfo info = current_device_info();
  const int strips = choose_strips(false, a.d, a.h, a.q, a.dtype, info.smem_optin);
  ForwardParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.w1 = static_cast<const T*>(a.w1);
  p.w2 = static_cast<const T*>(a.w2);
  p.b1 = static_cast<const T*>(a.b1);
  p.b2 = static_cast<const T*>(a.b2);
  p.o = static_cast<T*>(a.o);
  p.z = static_cast<T*>(a.z);
  p.hid = static_cast<T*>(a.hidden);
  p.n = a.n;
  p.d = static_cast<int>(a.d), p.h = static_cast<int>(a.h), p.q = static_cast<int>(a.q);
  p.act = a.activation;
  p.L = make_layout(false, p.d, p.h, p.q, sizeof(T), strips);
  p.tiles = (a.n + 16 * strips - 1) / (16 * strips);
  int per_sm = 0;
  const cudaError_t err = blocks_per_sm(narrow_forward_kernel<T>, p.L.bytes, info.smem_optin, &per_sm);
  if (err != cudaSuccess) return err;
  const int grid =
      static_cast<int>(std::min({p.tiles, int64_t{info.sms} * per_sm, max_blocks()}));
  narrow_forward_kernel<T><<<grid, kThreads, p.L.bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(
    const NarrowBackwardArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const DeviceInfo info = current_device_info();
  const BackwardPlan plan = plan_backward<T>(a, info);
  if (plan.status != cudaSuccess) return plan.status;
  if (plan.reduce && plan.grid > 0 &&
      (workspace == nullptr || workspace_bytes < plan.workspace ||
       reinterpret_cast<uintptr_t>(workspace) % 256 != 0)) {
    return cudaErrorInvalidValue;
  }
  float* partials = plan.reduce ? static_cast<float*>(workspace) : nullptr;
  if (plan.grid > 0) {
    BackwardParams<T> p;
    p.grad_o = static_cast<const T*>(a.grad_o);
    p.x = static_cast<const T*>(a.x);
    p.w1 = static_cast<const T*>(a.w1);
    p.w2 = static_cast<const T*>(a.w2);
    p.z = static_cast<const T*>(a.z);
    p.hid = static_cast<const T*>(a.hidden);
    p.dx = static_cast<T*>(a.dx);
    p.partials = partials;
    p.n = a.n, p.tiles = plan.tiles, p.E = plan.elements;
    p.d = static_cast<int>(a.d), p.h = static_cast<int>(a.h), p.q = static_cast<int>(a.q);
    p.act = a.activation;
    p.need_dw1 = a.dw1 != nullptr, p.need_dw2 = a.dw2 != nullptr;
    p.need_db1 = a.db1 != nullptr, p.need_db2 = a.db2 != nullptr;
    p.L = plan.layout;
    narrow_backward_kernel<T><<<plan.grid, kThreads, plan.layout.bytes, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (plan.reduce) {
    ReduceParams<T> r;
    r.partials = partials;
    r.blocks = plan.grid;
    r.E = plan.elements;
    r.d = static_cast<int>(a.d), r.h = static_cast<int>(a.h), r.q = static_cast<int>(a.q);
    r.w1 = static_cast<const T*>(a.w1);
    r.w2 = static_cast<const T*>(a.w2);
    r.grad_s = static_cast<const T*>(a.grad_s);
    r.weight_decay = static_cast<float>(a.weight_decay);
    r.dw1 = static_cast<T*>(a.dw1);
    r.dw2 = static_cast<T*>(a.dw2);
    r.db1 = static_cast<T*>(a.db1);
    r.db2 = static_cast<T*>(a.db2);
    const int blocks = static_cast<int>(std::min<int64_t>((plan.elements + 255) / 256, 4 * info.sms));
    narrow_reduce_kernel<T><<<blocks, 256, 0, stream>>>(r);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

}  // namespace

bool narrow_mlp_supported(int64_t d, int64_t h, int64_t q, NarrowDType dtype, bool allow_tf32) {
  const DeviceInfo info = current_device_info();
  NarrowProblem p;
  p.d = d, p.h = h, p.q = q, p.dtype = dtype, p.allow_tf32 = allow_tf32;
  p.compute_capability = info.major, p.smem_per_block = info.smem_optin;
  return choose_narrow_path(NarrowMode::On, p).fused;
}

int narrow_mlp_device_smem_per_block() { return current_device_info().smem_optin; }

int narrow_mlp_device_compute_capability() { return current_device_info().major; }

bool narrow_mlp_can_run(const NarrowForwardArgs& a) {
  if (a.n < 0 || !narrow_mlp_supported(a.d, a.h, a.q, a.dtype, a.allow_tf32)) return false;
  if (a.x == nullptr || a.w1 == nullptr || a.w2 == nullptr || a.o == nullptr) return false;
  return aligned16(a.x) && aligned16(a.w1) && aligned16(a.w2) && aligned16(a.o) &&
         aligned16(a.z) && aligned16(a.hidden);  // nullptr is aligned
}

bool narrow_mlp_can_run(const NarrowBackwardArgs& a) {
  if (a.n < 0 || !narrow_mlp_supported(a.d, a.h, a.q, a.dtype, a.allow_tf32)) return false;
  const bool need_gz = a.dx || a.dw1 || a.db1;
  // What each requested output reads must be there.
  if (a.grad_o == nullptr || a.w1 == nullptr || a.w2 == nullptr) return false;
  // z feeds G_Z, and H = phi(z) for dW2 when H was not saved (hidden == nullptr).
  const bool needs_z = need_gz || (a.dw2 && a.hidden == nullptr);
  if ((needs_z && a.z == nullptr) || (a.dw1 && a.x == nullptr)) return false;
  return aligned16(a.grad_o) && aligned16(a.w1) && aligned16(a.w2) && aligned16(a.x) &&
         aligned16(a.z) && aligned16(a.hidden) && aligned16(a.dx);
}

cudaError_t narrow_mlp_forward(const NarrowForwardArgs& a, cudaStream_t stream) {
  if (!narrow_mlp_can_run(a)) return cudaErrorInvalidValue;
  if (a.n == 0) return cudaSuccess;
  switch (a.dtype) {
    case NarrowDType::Float16: return launch_forward<__half>(a, stream);
    case NarrowDType::BFloat16: return launch_forward<__nv_bfloat16>(a, stream);
    case NarrowDType::Float32: return launch_forward<float>(a, stream);
  }
  return cudaErrorInvalidValue;
}

size_t narrow_mlp_backward_workspace_size(const NarrowBackwardArgs& a) {
  if (!narrow_mlp_can_run(a)) return 0;
  const DeviceInfo info = current_device_info();
  BackwardPlan plan;
  switch (a.dtype) {
    case NarrowDType::Float16: plan = plan_backward<__half>(a, info); break;
    case NarrowDType::BFloat16: plan = plan_backward<__nv_bfloat16>(a, info); break;
    case NarrowDType::Float32: plan = plan_backward<float>(a, info); break;
  }
  return plan.status == cudaSuccess ? plan.workspace : 0;
}

cudaError_t narrow_mlp_backward(
    const NarrowBackwardArgs& a, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!narrow_mlp_can_run(a)) return cudaErrorInvalidValue;
  if (!(a.dx || a.dw1 || a.dw2 || a.db1 || a.db2)) return cudaSuccess;
  switch (a.dtype) {
    case NarrowDType::Float16: return launch_backward<__half>(a, workspace, workspace_bytes, stream);
    case NarrowDType::BFloat16:
      return launch_backward<__nv_bfloat16>(a, workspace, workspace_bytes, stream);
    case NarrowDType::Float32: return launch_backward<float>(a, workspace, workspace_bytes, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mlp_ext
