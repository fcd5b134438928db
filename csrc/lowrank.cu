// Low-rank ("shrink" / "expand") and dropout-mask kernels: launchers here, device code in
// lowrank_kernels.cuh (shared with the CPU emulation test); see lowrank.h for the contracts.
#include "lowrank.h"
#include "philox.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace lora_kernels {
namespace {

#include "lowrank_kernels.cuh"

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor-core kernel for 16-bit X, else the FMA kernel (skinny_kernel_for, which the emulation shares).
bool skinny_uses_mma(const SkinnyArgs& a) { return a.xt == kBF16 || a.xt == kF16; }

// LORA_KERNELS_CUDA_VEC_LOADS=0: the tensor-core skinny kernels load X an element at a time even where
// 16-byte vectors apply (read per launch, so that a benchmark can A/B both in one process).
bool vec_loads_enabled() {
  const char* v = std::getenv("LORA_KERNELS_CUDA_VEC_LOADS");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

void launch_skinny_tiles(dim3 grid, cudaStream_t stream, const SkinnyArgs& a, int64_t c_chunk, int64_t zstride) {
  skinny_kernel_for(a, vec_loads_enabled())<<<grid, kThreads, 0, stream>>>(a, c_chunk, zstride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_skinny(const SkinnyArgs& a, cudaStream_t stream) {
  const int64_t JT = a.J + (a.ones_col ? 1 : 0);
  if (a.R == 0 || JT == 0) return;
  const bool mma = skinny_uses_mma(a);
  const int64_t gx = ceil_div(a.R, skinny_tile_rows(JT, mma)), gy = ceil_div(JT, skinny_tile_cols(JT));
  TORCH_CHECK(gx < (int64_t{1} << 31) && gy <= 65535, "lora_kernels: low-rank problem too large: R=", a.R,
              " J=", JT);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const SkinnySplit sp = plan_skinny_split(a.R, JT, a.C, num_sms, mma);
  TORCH_CHECK(sp.splits >= 1 && sp.splits <= 65535, "lora_kernels: bad reduction split: ", sp.splits);
  if (sp.splits == 1) {
    launch_skinny_tiles(dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), stream, a, a.C, 0);
    return;
  }
  // The caching allocator orders reuse of the workspace on the current stream only: launching on
  // another stream could let a later allocation overwrite it while the kernels still read it.
  TORCH_CHECK(stream == at::cuda::getCurrentCUDAStream().stream(),
              "lora_kernels: launch_skinny must run on the current CUDA stream");
  // Partial sums (splits, R, JT) fp32 on the current device, which is out's (callers hold a guard).
  // At most ~4 · num_sms tiles of 32 × 64 floats (a few MB): the split only runs on small grids.
  const at::Tensor ws = at::empty({sp.splits, a.R, JT}, at::TensorOptions().dtype(at::kFloat).device(
                                                          at::kCUDA, at::cuda::current_device()));
  SkinnyArgs part = a;
  part.out = ws.data_ptr<float>();
  part.ldo = JT;
  part.alpha = 1.f;  // applied once, by the reduce
  launch_skinny_tiles(dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(sp.splits)),
                      stream, part, sp.chunk, a.R * JT);
  const int64_t blocks = ceil_div(a.R * JT, kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "lora_kernels: low-rank problem too large: R=", a.R, " J=", JT);
  skinny_reduce_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(ws.data_ptr<float>(), sp.splits,
                                                                               a.R, JT, a.alpha, a.out, a.ldo);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_expand(const ExpandArgs& a, cudaStream_t stream) {
  if (a.R == 0 || a.N == 0) return;
  // Tensor cores for a 16-bit output (T and B rounded to its dtype), else the FMA kernel.
  const bool mma = a.ot == kBF16 || a.ot == kF16;
  const int64_t gx = ceil_div(a.R, mma ? kExpandMmaRows : kExpandTile), gy = ceil_div(a.N, kExpandTile);
  TORCH_CHECK(gx < (int64_t{1} << 31) && gy <= 65535, "lora_kernels: expand problem too large: R=", a.R,
              " N=", a.N);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (a.ot == kBF16) {
    expand_mma_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(a);
  } else if (a.ot == kF16) {
    expand_mma_kernel<__half><<<grid, kThreads, 0, stream>>>(a);
  } else {
    expand_kernel<<<grid, kThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_pack_concat(const PackArgs& a, cudaStream_t stream) {
  TORCH_CHECK(a.R % 8 == 0 && a.R >= a.J + (a.op.v1 ? 1 : 0) + (a.op.v2 ? 1 : 0) && (a.ot == kF16 || a.ot == kBF16),
              "lora_kernels: bad pack_concat arguments: J=", a.J, " R=", a.R);
  const int64_t n = (a.M + a.N) * a.R;
  if (n == 0) return;
  const int64_t blocks = ceil_div(n, kThreads);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "lora_kernels: pack problem too large: M=", a.M, " N=", a.N);
  pack_concat_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
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
