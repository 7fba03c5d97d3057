// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011), written out as curand's curand_Philox4x32_10 computes it, for the
// dropout masks of mlp_kernels.cu: the CUDA toolkit the CI compiles with ships
// runtime headers only (no curand_kernel.h), and torch's own copy
// (ATen/cuda/detail/...) would make the .cu files depend on torch headers.
//
// torch's CUDA random kernels draw from curand_init(seed, subsequence, offset)
// with seed and offset from the generator's philox_cuda_state(increment);
// for an offset that is a multiple of 4 (the generator keeps it so) the first
// curand_uniform4 of such a state is
//
//   philox4x32_10({lo(offset / 4), hi(offset / 4), lo(subsequence), hi(subsequence)},
//                 {lo(seed), hi(seed)})
//
// mapped to (0, 1] by uniform(): exactly what philox_uniform4 returns.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MLP_EXT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLP_EXT_HOST_DEVICE inline
#endif

namespace mlp_ext::gpu::philox {

struct Words {
  uint32_t v[4];
};

MLP_EXT_HOST_DEVICE uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

// Ten rounds, the key bumped between them (curand's constants).
MLP_EXT_HOST_DEVICE Words philox4x32_10(Words c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kM0, c.v[0], &hi0);
    const uint32_t lo1 = mulhilo(kM1, c.v[2], &hi1);
    c = Words{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// curand's _curand_uniform: a 32-bit word to a float in (0, 1].
MLP_EXT_HOST_DEVICE float uniform(uint32_t x) {
  constexpr float kInv2Pow32 = 2.3283064e-10f;  // CURAND_2POW32_INV
  return x * kInv2Pow32 + kInv2Pow32 / 2.0f;
}

// The first curand_uniform4 of curand_init(seed, subsequence, offset), offset % 4 == 0.
MLP_EXT_HOST_DEVICE Words philox_words(uint64_t seed, uint64_t subsequence, uint64_t offset) {
  const uint64_t counter = offset / 4;
  return philox4x32_10(
      Words{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
             static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)}},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace mlp_ext::gpu::philox

#undef MLP_EXT_HOST_DEVICE
