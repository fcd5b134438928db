// The dropout mask of lora_kernels (see lora_kernels/reference.py), shared by the CUDA kernels
// and the host-side mask functions: one definition, so GPU masks and the CPU-tested masks are
// the same code.
//
//   mask(seed, m, k, p): Philox4x32-10 with counter (k / 8, m mod 2^32, m >> 32, 0) and key
//   (seed mod 2^32, seed >> 32); column 8g + j takes the 16-bit half j / 4 (0 = low) of lane j % 4
//   and is kept iff that value >= threshold = round(p · 65536).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#define LK_UNROLL _Pragma("unroll")
#else  // included by host-only C++ (bindings.cpp): same code, plain inline functions
#define LK_HD inline
#define LK_UNROLL
#endif

namespace lora_kernels {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

LK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t prod = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(prod);
  hi = static_cast<uint32_t>(prod >> 32);
#endif
}

// Philox4x32 with 10 rounds, in place on the counter (same as Triton's tl.randint4x / cuRAND).
LK_HD void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
LK_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi_a, lo_a, hi_b, lo_b;
    mulhilo32(kPhiloxRoundB, c[2], hi_b, lo_b);
    mulhilo32(kPhiloxRoundA, c[0], hi_a, lo_a);
    const uint32_t n0 = hi_b ^ c[1] ^ k0;
    const uint32_t n2 = hi_a ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo_b;
    c[2] = n2;
    c[3] = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// Keep bits of the 8 columns 8g .. 8g+7 of row m: bit j set iff column 8g + j is kept.
// Columns beyond K are the caller's to clear (the packed bitmask stores them as 0).
LK_HD uint32_t dropout_keep_byte(uint64_t seed, uint64_t m, uint64_t g, uint32_t threshold) {
  uint32_t c[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(m), static_cast<uint32_t>(m >> 32), 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  uint32_t byte = 0;
LK_UNROLL
  for (int j = 0; j < 8; ++j) {
    const uint32_t u16 = (c[j & 3] >> (16 * (j >> 2))) & 0xFFFFu;
    byte |= static_cast<uint32_t>(u16 >= threshold) << j;
  }
  return byte;
}

// Mask of the valid columns of group g of a K-column row (0xFF except for the last group).
LK_HD uint32_t valid_bits(int64_t K, int64_t g) {
  const int64_t rem = K - 8 * g;
  return rem >= 8 ? 0xFFu : (rem <= 0 ? 0u : ((1u << rem) - 1u));
}

}  // namespace lora_kernels
