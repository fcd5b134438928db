// Low-rank ("shrink" / "expand") and dropout-mask kernels: launchers here, device code in
// lowrank_kernels.cuh (shared with the CPU emulation test); see lowrank.h for the contracts.
#include "lowrank.h"
#include "philox.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

namespace lora_kernels {
namespace {

#include "lowrank_kernels.cuh"

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void launch_skinny(const SkinnyArgs& a, cudaStream_t stream) {
  const int64_t JT = a.J + (a.ones_col ? 1 : 0);
  if (a.R == 0 || JT == 0) return;
  const int64_t gx = ceil_div(a.R, kTileI), gy = ceil_div(JT, kTileJ);
  TORCH_CHECK(gx < (int64_t{1} << 31) && gy <= 65535, "lora_kernels: low-rank problem too large: R=", a.R,
              " J=", JT);
  skinny_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_expand(const ExpandArgs& a, cudaStream_t stream) {
  if (a.R == 0 || a.N == 0) return;
  const int64_t gx = ceil_div(a.R, kTileI), gy = ceil_div(a.N, kTileJ);
  TORCH_CHECK(gx < (int64_t{1} << 31) && gy <= 65535, "lora_kernels: expand problem too large: R=", a.R,
              " N=", a.N);
  expand_kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_make_mask(uint64_t seed, uint32_t threshold, int64_t M, int64_t K, uint8_t* bits,
                      cudaStream_t stream) {
  const int64_t G = ceil_div(K, 8);
  if (M == 0 || G == 0) return;
  const int64_t blocks = ceil_div(M * G, kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "lora_kernels: mask too large: M=", M, " K=", K);
  make_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(seed, threshold, M, K, G, bits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

uint32_t dropout_threshold(double p) {
  // nearbyint rounds half to even in the default rounding mode, like Python's round().
  return static_cast<uint32_t>(std::nearbyint(p * 65536.0));
}

void host_pack_mask(uint64_t seed, uint32_t threshold, int64_t M, int64_t K, uint8_t* bits) {
  const int64_t G = ceil_div(K, 8);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      bits[m * G + g] = static_cast<uint8_t>(
          dropout_keep_byte(seed, static_cast<uint64_t>(m), static_cast<uint64_t>(g), threshold) &
          valid_bits(K, g));
}

}  // namespace lora_kernels
