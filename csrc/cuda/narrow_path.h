// Which problems the fully fused narrow-MLP kernels (narrow_mlp.cu) take: their
// shared-memory layout and the choice between them and the GEMM path.
//
// Plain C++17 (no CUDA, no torch): narrow_mlp.cu sizes its kernels with it, the CUDA
// op asks choose_narrow_path before every call, and the CPU build compiles it too, so
// that the CPU test suite checks which problems the choice accepts and why it
// refuses the others (op mlp_ext::_narrow_path_choice).
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>

namespace mlp_ext {

// The element type of every tensor argument of the fused kernels.
enum class NarrowDType : int { Float16, BFloat16, Float32 };

// MLP_EXT_NARROW: never the fused kernels, wherever they cover the problem, or
// where they also are expected to be faster.
enum class NarrowMode : int { Off, On, Auto };

// "off", "on", "auto"; nullopt for anything else. (The unset variable is "off":
// the kernels have not yet run on a GPU.)
inline std::optional<NarrowMode> parse_narrow_mode(std::string_view name) {
  if (name == "off") return NarrowMode::Off;
  if (name == "on") return NarrowMode::On;
  if (name == "auto") return NarrowMode::Auto;
  return std::nullopt;
}

namespace narrow {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kMinWidth = 16;
constexpr int kMaxWidth = 128;
constexpr int kMaxStrips = 8;  // BM <= 128 rows per tile
constexpr int kChunk = 64;     // columns per work item
// Floats per staging row: +8 shifts each row by 8 banks, so the 64-bit accumulator
// stores of a half-warp (rows g..g+3, 8 words each) hit 32 distinct banks.
constexpr int kStageLd = kChunk + 8;
constexpr int kStageFloats = 16 * kStageLd;  // one warp's staging area
constexpr int kMinComputeCapability = 8;     // bf16 / TF32 wmma and cp.async
constexpr int kAlignment = 16;               // bytes: every array is read as 16-byte vectors

static_assert(kThreads >= 2 * kMaxWidth, "one thread per bias column (h + q <= 256)");

inline int element_size(NarrowDType dtype) { return dtype == NarrowDType::Float32 ? 4 : 2; }

inline bool width_covered(int64_t w) {
  return w >= kMinWidth && w <= kMaxWidth && w % kMinWidth == 0;
}

// Byte offsets of the kernels' dynamic shared memory regions.
struct SmemLayout {
  int strips = 0;         // 16-row strips per tile
  int w1 = 0, w2 = 0;     // W1 (h x ld(d)), W2 (q x ld(h))
  int b1 = 0, b2 = 0;     // forward: biases as float (zeros when absent)
  int in[2] = {0, 0};     // double-buffered input tiles
  int in_go = 0, in_h = 0, in_x = 0;  // backward: G_O, H, X within an input buffer
  int mid = 0;            // forward: H tile; backward: G_Z tile (BM x ld(h))
  int stage = 0;          // kWarps staging areas of kStageFloats floats
  int bytes = 0;          // total dynamic shared memory
};

constexpr int round128(long long bytes) { return static_cast<int>((bytes + 127) / 128 * 128); }

// Rows of T in shared memory are padded by one 16-byte vector, so that the rows of
// an 8x16-byte fragment load start 4 banks apart.
inline SmemLayout make_layout(bool backward, int d, int h, int q, int esize, int strips) {
  const int pad = 16 / esize;
  auto matrix = [&](int rows, int cols) { return round128(1LL * rows * (cols + pad) * esize); };
  const int bm = 16 * strips;
  SmemLayout L;
  L.strips = strips;
  int off = 0;
  L.w1 = off, off += matrix(h, d);
  L.w2 = off, off += matrix(q, h);
  if (!backward) {
    L.b1 = off, off += round128(4LL * h);
    L.b2 = off, off += round128(4LL * q);
  }
  int in_bytes;
  if (backward) {
    L.in_go = 0;
    L.in_h = matrix(bm, q);
    L.in_x = L.in_h + matrix(bm, h);
    in_bytes = L.in_x + matrix(bm, d);
  } else {
    in_bytes = matrix(bm, d);  // the X tile
  }
  L.in[0] = off, off += in_bytes;
  L.in[1] = off, off += in_bytes;
  L.mid = off, off += matrix(bm, h);
  L.stage = off, off += round128(4LL * kWarps * kStageFloats);
  L.bytes = off;
  return L;
}

// The most 16-row strips per tile (<= kMaxStrips) whose layout fits in `smem_per_block`
// bytes; 0 if none does. Widths must be covered.
inline int choose_strips(bool backward, int64_t d, int64_t h, int64_t q, NarrowDType dtype,
                         int smem_per_block) {
  for (int strips = kMaxStrips; strips >= 1; --strips) {
    const SmemLayout L = make_layout(backward, static_cast<int>(d), static_cast<int>(h),
                                     static_cast<int>(q), element_size(dtype), strips);
    if (L.bytes <= smem_per_block) return strips;
  }
  return 0;
}

}  // namespace narrow

// Whether the fused path is expected to beat the GEMM path (MLP_EXT_NARROW=auto), for
// a covered problem. Provisional until benchmarks/narrow.py has run on a GPU: half
// precision is memory- and launch-bound at these widths, so the fused path should win
// at every batch size; float32 runs as TF32 with fewer rows per tile, a win expected
// only up to width 64.
inline bool narrow_preferred(int64_t n, int64_t d, int64_t h, int64_t q, NarrowDType dtype) {
  (void)n;
  if (dtype == NarrowDType::Float32) return std::max({d, h, q}) <= 64;
  return true;
}

// One call's problem, as the path choice sees it.
struct NarrowProblem {
  int64_t n = 0, d = 0, h = 0, q = 0;    // rows; in, hidden, out features
  std::optional<NarrowDType> dtype;      // nullopt: a dtype the kernels lack (float64)
  bool allow_tf32 = false;               // float32 products may round to TF32
  bool aligned = true;                   // every array the kernels touch is 16-byte aligned
  int compute_capability = 0;            // major version of the device's
  int smem_per_block = 0;                // bytes of opt-in dynamic shared memory per block
  bool dropout = false;                  // hidden-layer dropout (dropout > 0, or a mask given)
};

struct NarrowChoice {
  bool fused;
  const char* reason;  // why (a static string)
};

// The path of one call: the fused kernels or the GEMM path, and why. Widths, dtype,
// TF32, device and shared memory decide whether the kernels cover the problem; the
// mode whether a covered problem takes them.
inline NarrowChoice choose_narrow_path(NarrowMode mode, const NarrowProblem& p) {
  if (mode == NarrowMode::Off) return {false, "MLP_EXT_NARROW is off"};
  // The fused kernels keep H on chip and have no mask to draw or apply.
  if (p.dropout) return {false, "hidden-layer dropout (the fused kernels have none)"};
  if (!p.dtype) return {false, "dtype not covered (float16, bfloat16 or float32 only)"};
  if (*p.dtype == NarrowDType::Float32 && !p.allow_tf32) {
    return {false, "float32 without TF32 (allowed by torch.backends.cuda.matmul.allow_tf32)"};
  }
  if (!narrow::width_covered(p.d)) return {false, "in_features not a multiple of 16 in [16, 128]"};
  if (!narrow::width_covered(p.h)) {
    return {false, "hidden_features not a multiple of 16 in [16, 128]"};
  }
  if (!narrow::width_covered(p.q)) return {false, "out_features not a multiple of 16 in [16, 128]"};
  if (p.compute_capability < narrow::kMinComputeCapability) {
    return {false, "device of compute capability below 8.0"};
  }
  if (narrow::choose_strips(false, p.d, p.h, p.q, *p.dtype, p.smem_per_block) == 0 ||
      narrow::choose_strips(true, p.d, p.h, p.q, *p.dtype, p.smem_per_block) == 0) {
    return {false, "widths need more shared memory per block than the device has"};
  }
  if (!p.aligned) return {false, "an array not 16-byte aligned"};
  if (mode == NarrowMode::On) return {true, "MLP_EXT_NARROW is on and the kernels cover it"};
  if (narrow_preferred(p.n, p.d, p.h, p.q, *p.dtype)) {
    return {true, "auto: covered and expected faster"};
  }
  return {false, "auto: the GEMM path is expected faster"};
}

}  // namespace mlp_ext
