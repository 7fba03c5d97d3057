// The CPU operator's matrix products (cpu_matmul, declared in gemm.h): each
// product goes to the fastest of several libraries for its shape.
//
// The products skip ATen's dispatch: products with a short side whose re-read
// operand fits the caches run on our own kernels (gemm_impl.h), larger ones go
// straight to oneDNN (inside torch) for float32 products large enough to win by
// it, and to the BLAS that torch links (MKL) otherwise. At small sizes the
// operator's time is per-call overhead, so every ATen call saved counts; at large
// sizes oneDNN's float32 GEMM is faster than MKL's sgemm (what nn.Linear uses) on
// CPUs MKL does not tune for, such as AMD's. The measurements behind each
// threshold are in docs/performance-cpu.md.
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "kernels.h"


// The GEMM entry points torch's own CPU kernels call: the Fortran BLAS that
// libtorch_cpu exports (MKL or OpenBLAS, LP64), and ATen's oneDNN matmul. Weak,
// so that a torch built without them still loads this library; each use checks.
#if defined(__GNUC__) && defined(__ELF__)
#define MLP_EXT_WEAK __attribute__((weak))
#define MLP_EXT_HAVE_WEAK 1
#else
#define MLP_EXT_WEAK
#define MLP_EXT_HAVE_WEAK 0
#endif

#if MLP_EXT_HAVE_WEAK
extern "C" {
void sgemm_(
    const char* transa, const char* transb, const int* m, const int* n, const int* k,
    const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
    const float* beta, float* c, const int* ldc) MLP_EXT_WEAK;
void dgemm_(
    const char* transa, const char* transb, const int* m, const int* n, const int* k,
    const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
    const double* beta, double* c, const int* ldc) MLP_EXT_WEAK;
// MKL's thread count for the calling thread only (absent from non-MKL builds).
int MKL_Set_Num_Threads_Local(int) MLP_EXT_WEAK;
}
namespace at::native {
// ATen/native/mkldnn/Matmul.h (not installed): result = beta * result + alpha * mat1 @ mat2.
TORCH_API void mkldnn_matmul(
    const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
    float alpha) MLP_EXT_WEAK;
}  // namespace at::native
#endif

namespace mlp_ext {

using at::Tensor;

namespace {

// A 2-D tensor as BLAS sees it: column-major data with leading dimension ld,
// read transposed or not. `owner` keeps a contiguous copy alive when needed.
struct BlasMatrix {
  Tensor owner;
  const void* data;
  int ld;
  bool transposed;
};

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// op(t)^T for BLAS (column-major), where op(t) = t^T if trans: a row-major
// (m x k) matrix is the column-major (k x m) one.
BlasMatrix blas_operand(const Tensor& t, bool trans) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  // Row-major: rows apart by s0 >= cols; column-major: columns apart by s1 >= rows.
  if ((s1 == 1 || cols <= 1) && (rows <= 1 || s0 >= std::max<int64_t>(cols, 1)) &&
      fits_int(s0)) {
    return {Tensor(), t.const_data_ptr(), static_cast<int>(std::max<int64_t>({rows <= 1 ? cols : s0, cols, 1})), trans};
  }
  if ((s0 == 1 || rows <= 1) && (cols <= 1 || s1 >= std::max<int64_t>(rows, 1)) &&
      fits_int(s1)) {
    return {Tensor(), t.const_data_ptr(), static_cast<int>(std::max<int64_t>({cols <= 1 ? rows : s1, rows, 1})), !trans};
  }
  Tensor copy = t.contiguous();
  return {copy, copy.const_data_ptr(), static_cast<int>(std::max<int64_t>(cols, 1)), trans};
}

// Products of fewer multiply-adds run on the calling thread: there a threaded
// GEMM loses more to waking and joining its threads than it gains (measured:
// docs/performance-cpu.md).
constexpr int64_t kSerialBelow = int64_t(1) << 19;

template <typename T>
bool blas_gemm(
    Tensor& out, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double beta,
    int64_t m, int64_t n, int64_t k) {
#if MLP_EXT_HAVE_WEAK
  constexpr bool is_double = std::is_same_v<T, double>;
  if ((is_double ? dgemm_ == nullptr : sgemm_ == nullptr) || !fits_int(m) || !fits_int(n) ||
      !fits_int(k)) {
    return false;
  }
  // Row-major out (m x n) = op(a) op(b) is column-major out^T = op(b)^T op(a)^T.
  const BlasMatrix lhs = blas_operand(b, trans_b), rhs = blas_operand(a, trans_a);
  const char tl = lhs.transposed ? 'T' : 'N', tr = rhs.transposed ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int ldc = static_cast<int>(std::max<int64_t>(n, 1));
  const T alpha = 1, beta_t = static_cast<T>(beta);
  const T* lhs_data = static_cast<const T*>(lhs.data);
  const T* rhs_data = static_cast<const T*>(rhs.data);
  // Small products run on the calling thread (kSerialBelow). The setting is
  // thread-local and restored (0: MKL's global count again). Inside a parallel
  // region (split_gemm) every call is serial.
  const bool serial = MKL_Set_Num_Threads_Local != nullptr &&
      (m * n * k < kSerialBelow || at::in_parallel_region());
  const int previous = serial ? MKL_Set_Num_Threads_Local(1) : 0;
  if constexpr (is_double) {
    dgemm_(&tl, &tr, &M, &N, &K, &alpha, lhs_data, &lhs.ld, rhs_data, &rhs.ld, &beta_t,
           out.data_ptr<T>(), &ldc);
  } else {
    sgemm_(&tl, &tr, &M, &N, &K, &alpha, lhs_data, &lhs.ld, rhs_data, &rhs.ld, &beta_t,
           out.data_ptr<T>(), &ldc);
  }
  if (serial) {
    MKL_Set_Num_Threads_Local(previous);
  }
  return true;
#else
  return false;
#endif
}

// Which library computes a product.
enum class CpuGemm {
  Blas,    // the BLAS torch links (MKL): threaded from kSerialBelow on
  OneDnn,  // ATen's oneDNN matmul (float32)
  Split,   // one serial BLAS call per thread, each on a block of out
  Short,   // our kernels for products with a short side (gemm_impl.h)
};

bool short_usable(const Tensor& out) {
  return isa_kernels().short_gemm != nullptr &&
      (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble);
}

bool onednn_usable(const Tensor& out) {
#if MLP_EXT_HAVE_WEAK
  // ATen's float32 oneDNN matmul insists on AVX-512 (BW, VL, DQ) on x86; ATen's
  // AVX512 capability implies them.
  static const bool usable = at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() &&
      at::get_cpu_capability() == "AVX512";
  return usable && out.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

bool split_usable(const Tensor& out, int64_t m, int64_t n, int64_t k) {
#if MLP_EXT_HAVE_WEAK
  // Each thread's call must run serially, which only MKL lets us ask for.
  const bool blas = out.scalar_type() == at::kFloat ? sgemm_ != nullptr : dgemm_ != nullptr;
  return blas && MKL_Set_Num_Threads_Local != nullptr && fits_int(m) && fits_int(n) &&
      fits_int(k) && at::get_num_threads() > 1 && !at::in_parallel_region();
#else
  return false;
#endif
}

// Which library computes a product. Each rule was measured one path against
// another on every product of the benchmark's sweep (docs/performance-cpu.md,
// "How the products are chosen"):
// - our kernels (Short) wherever the operand they re-read stays in the caches,
//   since they skip the BLAS's packing and thread start-up;
// - serial calls on row blocks (Split) where out has many rows and a short side,
//   where both libraries' threaded GEMMs lose;
// - oneDNN (float32) from ~4M multiply-adds on, where its higher throughput
//   outweighs its fixed cost per call; MKL below that.
CpuGemm choose_gemm(
    const Tensor& out, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k) {
  static const int forced = [] {
    // MLP_EXT_CPU_GEMM=blas|onednn|split|short forces one path where it is usable
    // (for measurements and tests).
    const char* env = std::getenv("MLP_EXT_CPU_GEMM");
    const std::string v = env ? env : "";
    return v == "blas" ? 0 : v == "onednn" ? 1 : v == "split" ? 2 : v == "short" ? 3 : -1;
  }();
  if (forced == 1 && onednn_usable(out)) {
    return CpuGemm::OneDnn;
  }
  if (forced == 2 && split_usable(out, m, n, k)) {
    return CpuGemm::Split;
  }
  if (forced == 3 && short_usable(out)) {
    return CpuGemm::Short;
  }
  if (forced != -1) {
    return CpuGemm::Blas;
  }
  const int64_t work = m * n * k;  // multiply-adds
  constexpr int64_t kShortMaxBytes = int64_t(2) << 20;
  const int64_t reread = (trans_b ? m * k : k * n) * out.element_size();
  // Short dot products sum their vectors' lanes too often: float32 NT products
  // with k < 256 on one thread lose to MKL from 64 x 64 up.
  const bool short_dots = out.scalar_type() == at::kFloat && trans_b && !trans_a && k < 256 &&
      std::min(m, n) >= 32 && work < kSerialBelow;
  if (reread <= kShortMaxBytes && !short_dots && short_usable(out)) {
    return CpuGemm::Short;
  }
  constexpr int64_t kSplitMinWork = int64_t(1) << 19, kSplitMinRows = 64, kSplitMaxSide = 64;
  if (work >= kSplitMinWork && m >= kSplitMinRows && std::min(n, k) <= kSplitMaxSide &&
      split_usable(out, m, n, k)) {
    return CpuGemm::Split;
  }
  constexpr int64_t kOneDnnMinWork = int64_t(1) << 22;
  return work >= kOneDnnMinWork && onednn_usable(out) ? CpuGemm::OneDnn : CpuGemm::Blas;
}

// out[r0:r1] = beta * addend[r0:r1] (addend of out's shape, or a row
// broadcast over the rows; contiguous). The product then adds to it with the
// GEMM's beta = 1: given a beta other than 0 or 1, a BLAS scales C first, in a
// pass over out of its own.
void copy_addend(Tensor& out, const Tensor& addend, double beta, int64_t r0, int64_t r1) {
  const int64_t width = out.size(1), row_bytes = width * out.element_size();
  char* const dst = static_cast<char*>(out.data_ptr());
  const char* const src = static_cast<const char*>(addend.const_data_ptr());
  const auto copy = [&](char* to, const char* from, int64_t rows) {
    if (beta == 1) {
      std::memcpy(to, from, rows * row_bytes);
    } else {
      isa_kernels().scaled_copy(out.scalar_type(), from, to, beta, rows * width);
    }
  };
  // Threaded like ATen's copy, since a fresh out is faulted in here page by
  // page (inside split_gemm's parallel region this runs on the calling thread).
  constexpr int64_t kGrainBytes = int64_t(1) << 17;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(r0, r1, grain, [&](int64_t lo, int64_t hi) {
    if (addend.dim() == 2) {
      copy(dst + lo * row_bytes, src + lo * row_bytes, hi - lo);
      return;
    }
    for (int64_t i = lo; i < hi; ++i) {
      copy(dst + i * row_bytes, src, 1);
    }
  });
}

// out = beta * addend + op(a) op(b) as blocks of out's rows, one per thread,
// each a serial BLAS call that follows the copy of its rows of the addend
// (still in cache for the product).
template <typename T>
void split_gemm(
    Tensor& out, const Tensor& addend, const Tensor& a, bool trans_a, const Tensor& b,
    bool trans_b, double beta, int64_t m, int64_t n, int64_t k) {
  constexpr int64_t kRows = 16;  // block edges at multiples of 16 rows
  at::parallel_for(0, (m + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    const int64_t lo = begin * kRows, hi = std::min(m, end * kRows);
    if (addend.defined()) {
      copy_addend(out, addend, beta, lo, hi);
    }
    Tensor rows = out.narrow(0, lo, hi - lo);
    const bool done = blas_gemm<T>(
        rows, a.narrow(trans_a ? 1 : 0, lo, hi - lo), trans_a, b, trans_b,
        addend.defined() ? 1.0 : 0.0, hi - lo, n, k);
    TORCH_INTERNAL_ASSERT(done, "split_gemm: the BLAS call was refused");
  });
}

// out = beta * add + op(a) op(b), the addend (contiguous, of out's shape or
// one row) read by the kernel as it writes each tile.
void short_gemm(
    Tensor& out, const Tensor& add, double beta, const Tensor& a, bool trans_a, const Tensor& b,
    bool trans_b) {
  // blas_operand's column-major view of op(t)^T is the row-major view of t (or
  // of t^T) that the kernels read: the same data, leading dimension and flag.
  const BlasMatrix rhs = blas_operand(b, trans_b);
  BlasMatrix lhs = blas_operand(a, trans_a);
  if (lhs.transposed && rhs.transposed) {  // no kernel reads both transposed
    const Tensor op_a = (trans_a ? a.t() : a).contiguous();
    lhs = {op_a, op_a.const_data_ptr(), static_cast<int>(std::max<int64_t>(op_a.size(1), 1)),
           false};
  }
  const int64_t m = out.size(0), n = out.size(1), k = trans_a ? a.size(0) : a.size(1);
  isa_kernels().short_gemm(
      out.scalar_type(), lhs.transposed, rhs.transposed, m, n, k, lhs.data, lhs.ld, rhs.data,
      rhs.ld, out.data_ptr(), n, add.defined() ? add.const_data_ptr() : nullptr,
      add.dim() == 2 ? n : 0, beta, m * n * k >= kSerialBelow);
}

void onednn_gemm(
    Tensor& out, const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, double beta) {
#if MLP_EXT_HAVE_WEAK
  // oneDNN reads row-major and transposed operands in place (copies others).
  at::native::mkldnn_matmul(
      trans_a ? a.t() : a, trans_b ? b.t() : b, out, static_cast<float>(beta), 1.0f);
#endif
}

// A float32 copy of t (contiguous), widened by our kernel (no dispatch).
Tensor widened(const Tensor& t) {
  const Tensor c = t.contiguous();
  Tensor wide = at::detail::empty_cpu(c.sizes(), c.options().dtype(at::kFloat));
  isa_kernels().widen(c.scalar_type(), c.const_data_ptr(), wide.data_ptr<float>(), c.numel());
  return wide;
}

// Products of the half types below this many multiply-adds are widened to
// float32 (see reduced_matmul); measured in docs/performance-cpu.md.
constexpr int64_t kWidenBelow = int64_t(1) << 22;

// The half types: each product accumulates in float32 and rounds once to out's
// dtype, as nn.Linear's do, on one of two paths:
// - ATen's addmm / mm: for bfloat16 oneDNN's GEMM on CPUs with AVX512-BF16 or
//   AMX (~2.5x the float32 GEMM at 1024^3 on Zen 4), from kWidenBelow on;
// - widened: the operands widened to float32 by our kernels, the float32 paths
//   above (our short-side kernels, MKL, oneDNN), out rounded back. For bfloat16
//   below kWidenBelow, where oneDNN's bfloat16 call costs more than the widening
//   saves; for float16 always, as ATen's CPU float16 GEMM has no fast path on
//   CPUs without AVX512-FP16 (under 1 GFLOP/s at 1024^3 on Zen 4).
// MLP_EXT_CPU_HALF_GEMM=aten|widen forces one (for measurements and tests).
void reduced_matmul(
    Tensor& out, const Tensor* addend, const Tensor& a, bool trans_a, const Tensor& b,
    bool trans_b, double beta) {
  static const int forced = [] {
    const char* env = std::getenv("MLP_EXT_CPU_HALF_GEMM");
    const std::string v = env ? env : "";
    return v == "aten" ? 0 : v == "widen" ? 1 : -1;
  }();
  const int64_t m = out.size(0), n = out.size(1), k = trans_a ? a.size(0) : a.size(1);
  const bool aten = out.scalar_type() == at::kBFloat16 &&
      (forced == 0 || (forced == -1 && m * n * k >= kWidenBelow));
  const bool add = addend != nullptr && beta != 0;
  if (aten) {
    const Tensor lhs = trans_a ? a.t() : a, rhs = trans_b ? b.t() : b;
    add ? at::addmm_out(out, *addend, lhs, rhs, beta) : at::mm_out(out, lhs, rhs);
    return;
  }
  Tensor wide = at::detail::empty_cpu(out.sizes(), out.options().dtype(at::kFloat));
  const Tensor wide_addend = add ? widened(*addend) : Tensor();
  // widened() lays each operand out row-major: a transposed view reads it as
  // op(t) as before (trans flags unchanged).
  cpu_matmul(wide, add ? &wide_addend : nullptr, widened(a), trans_a, widened(b), trans_b, beta);
  isa_kernels().narrow(out.scalar_type(), wide.const_data_ptr<float>(), out.data_ptr(), wide.numel());
}

}  // namespace

// out (m x n, contiguous) = beta * addend + op(a) op(b); see DeviceKernels::matmul.
void cpu_matmul(
    Tensor& out, const Tensor* addend, const Tensor& a, bool trans_a, const Tensor& b,
    bool trans_b, double beta) {
  const int64_t m = out.size(0), n = out.size(1), k = trans_a ? a.size(0) : a.size(1);
  if (m == 0 || n == 0) {
    return;
  }
  if (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf) {
    reduced_matmul(out, addend, a, trans_a, b, trans_b, beta);
    return;
  }
  // beta * addend goes into out first; the product adds to it (the GEMM's beta
  // is then 1, and 0 without an addend).
  const Tensor add = addend != nullptr && beta != 0 ? addend->contiguous() : Tensor();
  const double gemm_beta = add.defined() ? 1.0 : 0.0;
  const bool is_float = out.scalar_type() == at::kFloat;
  const CpuGemm gemm = k == 0 ? CpuGemm::Blas : choose_gemm(out, trans_a, trans_b, m, n, k);
  if (gemm == CpuGemm::Split) {
    is_float ? split_gemm<float>(out, add, a, trans_a, b, trans_b, beta, m, n, k)
             : split_gemm<double>(out, add, a, trans_a, b, trans_b, beta, m, n, k);
    return;
  }
  if (gemm == CpuGemm::Short) {
    short_gemm(out, add, beta, a, trans_a, b, trans_b);
    return;
  }
  if (add.defined()) {
    copy_addend(out, add, beta, 0, m);
  }
  if (k == 0) {
    if (!add.defined()) {
      out.zero_();
    }
    return;
  }
  if (gemm == CpuGemm::OneDnn) {
    onednn_gemm(out, a, trans_a, b, trans_b, gemm_beta);
    return;
  }
  if (is_float ? blas_gemm<float>(out, a, trans_a, b, trans_b, gemm_beta, m, n, k)
               : blas_gemm<double>(out, a, trans_a, b, trans_b, gemm_beta, m, n, k)) {
    return;
  }
  const Tensor lhs = trans_a ? a.t() : a, rhs = trans_b ? b.t() : b;
  add.defined() ? at::addmm_out(out, out, lhs, rhs) : at::mm_out(out, lhs, rhs);
}

}  // namespace mlp_ext
