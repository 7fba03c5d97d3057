// Standalone GPU self-test of the fused narrow-MLP kernels (csrc/cuda/narrow_mlp.cu),
// without torch: random problems in float16 / bfloat16 / float32 (TF32), every
// activation, biases on and off, batch sizes that are not multiples of the tile,
// grids capped so that blocks loop over several tiles. Checks, per problem:
//   * forward o, z, H and backward dX, dW1, dW2, db1, db2 against a float64 host
//     reference computed from the same rounded inputs (relative Frobenius error,
//     over all rows and over the last rows alone, where tail-masking bugs would show);
//   * guard bytes around every output untouched, every output element written
//     (outputs start as NaN);
//   * forward without z/H saved gives the same o; backward twice gives bitwise equal
//     results (determinism); backward with only some outputs requested, or without a
//     saved H (recomputed from z), gives bitwise the same values.
// Small enough to run under compute-sanitizer (memcheck, racecheck, synccheck) with
// --quick. Build and run: tools/narrow_gpu_check.sh.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/narrow_mlp.cuh"

using mlp_ext::Activation;
using mlp_ext::NarrowDType;

namespace {

#define CHECK_CUDA(expr)                                                                  \
  do {                                                                                    \
    const cudaError_t err_ = (expr);                                                      \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                  \
                   cudaGetErrorString(err_));                                             \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

const char* dtype_name(NarrowDType t) {
  return t == NarrowDType::Float16 ? "float16" : t == NarrowDType::BFloat16 ? "bfloat16" : "tf32";
}
size_t element_size(NarrowDType t) { return t == NarrowDType::Float32 ? 4 : 2; }

// Host values <-> device element bits.
double decode(NarrowDType t, const unsigned char* p) {
  if (t == NarrowDType::Float32) {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
  unsigned short bits;
  std::memcpy(&bits, p, 2);
  if (t == NarrowDType::Float16) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __bfloat162float(__nv_bfloat16(raw));
}
void encode(NarrowDType t, double v, unsigned char* p) {
  if (t == NarrowDType::Float32) {
    const float f = static_cast<float>(v);
    std::memcpy(p, &f, 4);
  } else if (t == NarrowDType::Float16) {
    const __half_raw raw = __half_raw(__float2half_rn(static_cast<float>(v)));
    std::memcpy(p, &raw.x, 2);
  } else {
    const __nv_bfloat16_raw raw = __nv_bfloat16_raw(__float2bfloat16_rn(static_cast<float>(v)));
    std::memcpy(p, &raw.x, 2);
  }
}

// A device array with 256 guard bytes on each side, all bytes 0xFF at first (NaN in
// every dtype), so unwritten elements and stray writes both show.
constexpr size_t kGuard = 256;
struct DeviceArray {
  unsigned char* base = nullptr;
  size_t bytes = 0;
  NarrowDType dtype{};
  DeviceArray() = default;
  DeviceArray(size_t count, NarrowDType t) : bytes(count * element_size(t)), dtype(t) {
    CHECK_CUDA(cudaMalloc(&base, bytes + 2 * kGuard));
    poison();
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept { *this = std::move(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    std::swap(base, o.base), std::swap(bytes, o.bytes), std::swap(dtype, o.dtype);
    return *this;
  }
  ~DeviceArray() {
    if (base) cudaFree(base);
  }
  void* ptr() const { return base + kGuard; }
  void poison() { CHECK_CUDA(cudaMemset(base, 0xFF, bytes + 2 * kGuard)); }
  void upload(const std::vector<double>& v) {
    std::vector<unsigned char> host(bytes);
    for (size_t i = 0; i < v.size(); ++i) encode(dtype, v[i], &host[i * element_size(dtype)]);
    CHECK_CUDA(cudaMemcpy(ptr(), host.data(), bytes, cudaMemcpyHostToDevice));
  }
  std::vector<unsigned char> raw() const {  // guards included
    std::vector<unsigned char> host(bytes + 2 * kGuard);
    CHECK_CUDA(cudaMemcpy(host.data(), base, host.size(), cudaMemcpyDeviceToHost));
    return host;
  }
  bool guards_intact() const {
    const auto host = raw();
    for (size_t i = 0; i < kGuard; ++i) {
      if (host[i] != 0xFF || host[kGuard + bytes + i] != 0xFF) return false;
    }
    return true;
  }
  std::vector<double> download() const {
    const auto host = raw();
    std::vector<double> v(bytes / element_size(dtype));
    for (size_t i = 0; i < v.size(); ++i) v[i] = decode(dtype, &host[kGuard + i * element_size(dtype)]);
    return v;
  }
};

// Values rounded to the dtype, as the device sees them.
std::vector<double> rounded(NarrowDType t, std::vector<double> v) {
  unsigned char buf[4];
  for (double& x : v) {
    encode(t, x, buf);
    x = decode(t, buf);
  }
  return v;
}

struct Problem {
  int64_t n, d, h, q;
  NarrowDType dtype;
  Activation act;
  bool bias;
  double weight_decay;
  bool with_grad_s;
  int max_blocks;  // 0: no cap
};

struct Reference {
  std::vector<double> z, hid, o, dx, dw1, dw2, db1, db2;
};

template <typename F>
void with_phi(Activation a, F&& f) {
  mlp_ext::visit_activation(a, std::forward<F>(f));
}

Reference reference(const Problem& P, const std::vector<double>& x, const std::vector<double>& w1,
                    const std::vector<double>& w2, const std::vector<double>& b1,
                    const std::vector<double>& b2, const std::vector<double>& go, double gs) {
  const int64_t n = P.n, d = P.d, h = P.h, q = P.q;
  Reference R;
  R.z.assign(n * h, 0), R.hid.assign(n * h, 0), R.o.assign(n * q, 0), R.dx.assign(n * d, 0);
  R.dw1.assign(h * d, 0), R.dw2.assign(q * h, 0), R.db1.assign(h, 0), R.db2.assign(q, 0);
  std::vector<double> gz(h);
  const double decay = P.with_grad_s ? gs * P.weight_decay : 0.0;
  with_phi(P.act, [&](auto phi) {
    using A = decltype(phi);
    for (int64_t r = 0; r < n; ++r) {
      const double* xr = &x[r * d];
      for (int64_t j = 0; j < h; ++j) {
        double s = P.bias ? b1[j] : 0.0;
        for (int64_t k = 0; k < d; ++k) s += xr[k] * w1[j * d + k];
        R.z[r * h + j] = s;
        R.hid[r * h + j] = A::forward(s);
      }
      for (int64_t i = 0; i < q; ++i) {
        double s = P.bias ? b2[i] : 0.0;
        for (int64_t j = 0; j < h; ++j) s += R.hid[r * h + j] * w2[i * h + j];
        R.o[r * q + i] = s;
      }
      // Backward of this row.
      const double* g = &go[r * q];
      for (int64_t j = 0; j < h; ++j) {
        double s = 0;
        for (int64_t i = 0; i < q; ++i) s += g[i] * w2[i * h + j];
        gz[j] = s * A::derivative(R.z[r * h + j]);
        R.db1[j] += gz[j];
      }
      for (int64_t k = 0; k < d; ++k) {
        double s = 0;
        for (int64_t j = 0; j < h; ++j) s += gz[j] * w1[j * d + k];
        R.dx[r * d + k] = s;
      }
      for (int64_t i = 0; i < q; ++i) {
        R.db2[i] += g[i];
        for (int64_t j = 0; j < h; ++j) R.dw2[i * h + j] += g[i] * R.hid[r * h + j];
      }
      for (int64_t j = 0; j < h; ++j) {
        for (int64_t k = 0; k < d; ++k) R.dw1[j * d + k] += gz[j] * xr[k];
      }
    }
  });
  for (int64_t i = 0; i < h * d; ++i) R.dw1[i] += decay * w1[i];
  for (int64_t i = 0; i < q * h; ++i) R.dw2[i] += decay * w2[i];
  return R;
}

// ||a - b|| / ||b|| over elements [begin, end) (NaN anywhere -> NaN).
double relative_error(const std::vector<double>& a, const std::vector<double>& b, size_t begin,
                      size_t end) {
  double num = 0, den = 0;
  for (size_t i = begin; i < end; ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (std::isnan(num)) return NAN;
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

double tolerance(NarrowDType t) {
  // A few units of the dtype's rounding (u = 2^-11 float16 and TF32 operands,
  // 2^-9 bfloat16) compounded over the rounded intermediates z, H, G_Z.
  return t == NarrowDType::BFloat16 ? 3e-2 : 5e-3;
}

struct Outcome {
  bool ok = true;
  std::string why;
  void fail(const std::string& what) {
    ok = false;
    why += (why.empty() ? "" : "; ") + what;
  }
};

void compare(Outcome& out, const char* name, const DeviceArray& dev, const std::vector<double>& ref,
             int64_t rows, int64_t cols, double tol) {
  if (!dev.guards_intact()) out.fail(std::string(name) + ": guard bytes overwritten");
  if (ref.empty()) return;
  const auto got = dev.download();
  const double all = relative_error(got, ref, 0, ref.size());
  // The last rows alone (up to 37): the masked tail tile.
  const int64_t tail_rows = std::min<int64_t>(rows, 37);
  const double tail = relative_error(got, ref, (rows - tail_rows) * cols, rows * cols);
  if (!(all <= tol) || !(tail <= tol)) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s: relative error %.3g (last rows %.3g) > %.3g", name, all,
                  tail, tol);
    out.fail(buf);
  }
}

bool same_bits(const DeviceArray& a, const DeviceArray& b) { return a.raw() == b.raw(); }

Outcome run(const Problem& P, std::mt19937_64& rng) {
  const int64_t n = P.n, d = P.d, h = P.h, q = P.q;
  const NarrowDType t = P.dtype;
  std::normal_distribution<double> normal;
  auto uniform = [&](double bound) { return std::uniform_real_distribution<double>(-bound, bound)(rng); };
  std::vector<double> x(n * d), w1(h * d), w2(q * h), b1(h), b2(q), go(n * q);
  for (auto& v : x) v = normal(rng);
  for (auto& v : w1) v = uniform(1 / std::sqrt(double(d)));
  for (auto& v : w2) v = uniform(1 / std::sqrt(double(h)));
  for (auto& v : b1) v = uniform(1 / std::sqrt(double(d)));
  for (auto& v : b2) v = uniform(1 / std::sqrt(double(h)));
  for (auto& v : go) v = normal(rng);
  if (t == NarrowDType::Float32) {
    // The kernels round float32 operands to TF32 (11 significant bits), which moves
    // z by ~1e-4 and flips relu's mask far outside the 1e-5 band below. x and W1 with
    // bfloat16's 8 significant bits are exact in TF32, and so is every product of
    // theirs in float32: z is then exact up to float32 accumulation.
    x = rounded(NarrowDType::BFloat16, x), w1 = rounded(NarrowDType::BFloat16, w1);
  }
  x = rounded(t, x), w1 = rounded(t, w1), w2 = rounded(t, w2), b1 = rounded(t, b1);
  b2 = rounded(t, b2), go = rounded(t, go);
  if (P.act == Activation::Relu) {
    // relu'(z) jumps at 0, where rounding z can flip it against the float64
    // reference and move a row's gradient by O(1): rows with a pre-activation within
    // 1e-5 of 0 (a few in 10^3) get a zero upstream gradient.
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t j = 0; j < h; ++j) {
        double s = P.bias ? b1[j] : 0.0;
        for (int64_t k = 0; k < d; ++k) s += x[r * d + k] * w1[j * d + k];
        if (std::abs(s) < 1e-5) {
          std::fill(go.begin() + r * q, go.begin() + (r + 1) * q, 0.0);
          break;
        }
      }
    }
  }
  const double gs = rounded(t, {0.75})[0];
  const Reference R = reference(P, x, w1, w2, b1, b2, go, gs);

  if (P.max_blocks > 0) {
    setenv("MLP_EXT_NARROW_MAX_BLOCKS", std::to_string(P.max_blocks).c_str(), 1);
  } else {
    unsetenv("MLP_EXT_NARROW_MAX_BLOCKS");
  }
  DeviceArray X(n * d, t), W1(h * d, t), W2(q * h, t), B1(h, t), B2(q, t), GO(n * q, t), GS(1, t);
  X.upload(x), W1.upload(w1), W2.upload(w2), B1.upload(b1), B2.upload(b2), GO.upload(go);
  GS.upload({gs});
  DeviceArray O(n * q, t), Z(n * h, t), H(n * h, t), O2(n * q, t);
  const double tol = tolerance(t);
  Outcome out;

  mlp_ext::NarrowForwardArgs f;
  f.n = n, f.d = d, f.h = h, f.q = q, f.dtype = t, f.activation = P.act, f.allow_tf32 = true;
  f.x = X.ptr(), f.w1 = W1.ptr(), f.w2 = W2.ptr();
  f.b1 = P.bias ? B1.ptr() : nullptr, f.b2 = P.bias ? B2.ptr() : nullptr;
  f.o = O.ptr(), f.z = Z.ptr(), f.hidden = H.ptr();
  if (!mlp_ext::narrow_mlp_can_run(f)) {
    out.fail("narrow_mlp_can_run(forward) is false");
    return out;
  }
  CHECK_CUDA(mlp_ext::narrow_mlp_forward(f, nullptr));
  f.o = O2.ptr(), f.z = nullptr, f.hidden = nullptr;  // inference: nothing saved
  CHECK_CUDA(mlp_ext::narrow_mlp_forward(f, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  compare(out, "o", O, R.o, n, q, tol);
  compare(out, "z", Z, R.z, n, h, tol);
  compare(out, "H", H, R.hid, n, h, tol);
  if (!same_bits(O, O2)) out.fail("o differs when z and H are not saved");

  // Backward: every output, twice (determinism), then subsets (same bits).
  struct Grads {
    DeviceArray dx, dw1, dw2, db1, db2;
  };
  auto make_grads = [&] {
    return Grads{DeviceArray(n * d, t), DeviceArray(h * d, t), DeviceArray(q * h, t),
                 DeviceArray(h, t), DeviceArray(q, t)};
  };
  auto backward = [&](Grads& g, unsigned mask, bool saved_h = true) {
    mlp_ext::NarrowBackwardArgs b;
    b.n = n, b.d = d, b.h = h, b.q = q, b.dtype = t, b.activation = P.act, b.allow_tf32 = true;
    b.grad_o = GO.ptr(), b.grad_s = P.with_grad_s ? GS.ptr() : nullptr;
    b.weight_decay = P.weight_decay;
    b.x = X.ptr(), b.w1 = W1.ptr(), b.w2 = W2.ptr(), b.z = Z.ptr();
    b.hidden = saved_h ? H.ptr() : nullptr;  // nullptr: H recomputed from z
    b.dx = mask & 1 ? g.dx.ptr() : nullptr;
    b.dw1 = mask & 2 ? g.dw1.ptr() : nullptr;
    b.dw2 = mask & 4 ? g.dw2.ptr() : nullptr;
    b.db1 = mask & 8 ? g.db1.ptr() : nullptr;
    b.db2 = mask & 16 ? g.db2.ptr() : nullptr;
    if (!mlp_ext::narrow_mlp_can_run(b)) {
      out.fail("narrow_mlp_can_run(backward) is false");
      return;
    }
    const size_t bytes = mlp_ext::narrow_mlp_backward_workspace_size(b);
    void* ws = nullptr;
    if (bytes) CHECK_CUDA(cudaMalloc(&ws, bytes));
    if (bytes) CHECK_CUDA(cudaMemset(ws, 0xFF, bytes));  // scratch: must not be read first
    CHECK_CUDA(mlp_ext::narrow_mlp_backward(b, ws, bytes, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    if (ws) CHECK_CUDA(cudaFree(ws));
  };
  Grads full = make_grads(), again = make_grads();
  backward(full, 31);
  compare(out, "dx", full.dx, R.dx, n, d, tol);
  compare(out, "dw1", full.dw1, R.dw1, h, d, tol);
  compare(out, "dw2", full.dw2, R.dw2, q, h, tol);
  // db sums n values of either sign: compare against the scale of the summands.
  compare(out, "db1", full.db1, R.db1, 1, h, tol);
  compare(out, "db2", full.db2, R.db2, 1, q, tol);
  backward(again, 31);
  const char* names[] = {"dx", "dw1", "dw2", "db1", "db2"};
  DeviceArray* a[] = {&full.dx, &full.dw1, &full.dw2, &full.db1, &full.db2};
  DeviceArray* b[] = {&again.dx, &again.dw1, &again.dw2, &again.db1, &again.db2};
  for (int i = 0; i < 5; ++i) {
    if (!same_bits(*a[i], *b[i])) out.fail(std::string(names[i]) + " differs between two runs");
  }
  // Subsets of the outputs, and H not saved (recomputed from z): the same bits.
  struct Variant {
    unsigned mask;
    bool saved_h;
  };
  for (Variant var : {Variant{1, true}, Variant{2, true}, Variant{4, true}, Variant{8 | 16, true},
                      Variant{2 | 8, true}, Variant{4 | 16, true}, Variant{31, false},
                      Variant{4, false}}) {
    const unsigned mask = var.mask;
    Grads part = make_grads();
    backward(part, mask, var.saved_h);
    DeviceArray* p[] = {&part.dx, &part.dw1, &part.dw2, &part.db1, &part.db2};
    for (int i = 0; i < 5; ++i) {
      const bool requested = mask >> i & 1;
      if (requested && !same_bits(*a[i], *p[i])) {
        out.fail(std::string(names[i]) + " differs for output mask " + std::to_string(mask) +
                 (var.saved_h ? "" : " without a saved H"));
      }
      if (!requested && p[i]->raw() != std::vector<unsigned char>(p[i]->bytes + 2 * kGuard, 0xFF)) {
        out.fail(std::string(names[i]) + " written although not requested");
      }
    }
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  int device = 0;
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDevice(&device));
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);

  // (n, d, h, q): tails of every size, every width class, multi-tile blocks.
  struct Shape {
    int64_t n, d, h, q;
    int max_blocks;
  };
  std::vector<Shape> shapes = {
      {1, 16, 16, 16, 0},     {17, 32, 64, 16, 0},   {129, 128, 16, 128, 0},
      {333, 48, 80, 112, 2},  {1000, 64, 64, 64, 3}, {515, 16, 128, 32, 1},
  };
  if (!quick) {
    shapes.insert(shapes.end(), {{4099, 128, 128, 128, 0}, {100003, 64, 64, 64, 0},
                                 {20000, 32, 32, 32, 7},   {3001, 96, 112, 80, 0},
                                 {0, 64, 64, 64, 0}});
  }
  const NarrowDType dtypes[] = {NarrowDType::Float16, NarrowDType::BFloat16, NarrowDType::Float32};
  std::mt19937_64 rng(20261117);
  int failures = 0, count = 0, act = 0;
  for (const Shape& s : shapes) {
    for (NarrowDType t : dtypes) {
      for (bool bias : {true, false}) {
        Problem P{s.n, s.d, s.h, s.q, t, static_cast<Activation>(act++ % 7), bias,
                  bias ? 0.3 : 0.0, bias, s.max_blocks};
        if (s.n == 0) P.weight_decay = 0.3, P.with_grad_s = true;
        const Outcome r = run(P, rng);
        ++count;
        failures += !r.ok;
        std::printf("%-4s %-8s n=%-6lld d=%-3lld h=%-3lld q=%-3lld %-9s bias=%d wd=%.1f gs=%d "
                    "blocks<=%d  %s\n",
                    r.ok ? "ok" : "FAIL", dtype_name(t), (long long)s.n, (long long)s.d,
                    (long long)s.h, (long long)s.q, mlp_ext::activation_name(P.act).data(), bias, P.weight_decay,
                    P.with_grad_s, s.max_blocks, r.why.c_str());
      }
    }
  }
  std::printf("%d of %d problems passed\n", count - failures, count);
  return failures == 0 ? 0 : 1;
}
