// A CPU stand-in for the CUDA execution model, to run csrc/cuda/*.cu kernels on a
// machine without a GPU (scripts/check_cuda.py compiles them as C++ with this
// header force-included, after rewriting `kernel<<<grid, block, smem, stream>>>(args)`
// into `emu::launch(grid, block, smem, stream, kernel)(args)`).
//
// Blocks run one after another; the threads of a block run as real threads that
// meet at __syncthreads (a std::barrier), so __shared__ (static here) is shared by
// exactly one block's threads at a time. Built with AddressSanitizer and
// UndefinedBehaviorSanitizer, an access past an allocation or a misaligned
// vector access is reported, as compute-sanitizer memcheck would.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <tuple>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace emu {
inline thread_local std::barrier<>* block_barrier = nullptr;
inline cudaError_t last_error = cudaSuccess;

// Worker threads kept for the whole run: a block's threads are the first
// blockDim.x * blockDim.y * blockDim.z workers.
class Pool {
 public:
  static Pool& instance() {
    static Pool pool;
    return pool;
  }

  // Runs job(t) on workers t = 0 .. active-1 and returns when all are done.
  template <typename Job>
  void run(unsigned active, const Job& job) {
    while (workers_.size() < active) {
      grow();
    }
    job_ = [&job](unsigned t) { job(t); };
    active_ = active;
    start_->arrive_and_wait();
    done_->arrive_and_wait();
  }

  ~Pool() {
    stop_ = true;
    if (!workers_.empty()) {
      start_->arrive_and_wait();
    }
    for (auto& worker : workers_) {
      worker.join();
    }
  }

 private:
  void grow() {  // only between runs: every worker is waiting at start_
    stop_ = true;
    if (!workers_.empty()) {
      start_->arrive_and_wait();
    }
    for (auto& worker : workers_) {
      worker.join();
    }
    const size_t count = workers_.empty() ? 256 : workers_.size() * 2;
    workers_.clear();
    stop_ = false;
    start_ = std::make_unique<std::barrier<>>(count + 1);
    done_ = std::make_unique<std::barrier<>>(count + 1);
    for (unsigned t = 0; t < count; ++t) {
      workers_.emplace_back([this, t] {
        for (;;) {
          start_->arrive_and_wait();
          if (stop_) {
            return;
          }
          if (t < active_) {
            job_(t);
          }
          done_->arrive_and_wait();
        }
      });
    }
  }

  std::vector<std::thread> workers_;
  std::unique_ptr<std::barrier<>> start_, done_;
  std::function<void(unsigned)> job_;
  unsigned active_ = 0;
  bool stop_ = false;
};

template <typename... P>
struct Launch {
  dim3 grid, block;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    const unsigned long long threads = 1ull * block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const std::tuple<P...> params(std::forward<A>(args)...);
    for (unsigned bz = 0; bz < grid.z; ++bz) {
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::barrier<> barrier(static_cast<std::ptrdiff_t>(threads));
          Pool::instance().run(static_cast<unsigned>(threads), [&](unsigned t) {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            block_barrier = &barrier;
            std::apply(kernel, params);
            barrier.arrive_and_drop();  // a returned thread no longer holds the others
          });
        }
      }
    }
  }
};

template <typename... P>
Launch<P...> launch(dim3 grid, dim3 block, size_t /*shared_bytes*/, cudaStream_t, void (*kernel)(P...)) {
  return {grid, block, kernel};
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Device intrinsics the kernels use (compile with -ffp-contract=off so that the
// rest of the arithmetic is not fused either).
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }

// The runtime calls the launchers make.
extern "C" inline cudaError_t cudaGetLastError(void) {
  const cudaError_t error = emu::last_error;
  emu::last_error = cudaSuccess;
  return error;
}
extern "C" inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
