// Tensor-core base GEMMs of the LoRA linear, built on CUTLASS: out += a · op(b).
//
// Both products the op needs are "accumulate into an output that already holds the low-rank
// part" (beta = 1, C = D = out), so the frozen GEMM's epilogue adds it while it is in registers:
//   forward: y  (M×N) += x  (M×K) · Wᵀ, W (N×K) row-major   -> b_kmajor = true
//   dX:      dx (M×K) += dY (M×N) · W,  W (N×K) row-major   -> b_kmajor = false
// All matrices are row-major with unit inner stride and the given leading dimension.
// The functions return false (and launch nothing) when the kernel cannot take the problem
// (alignment, dtype, arch not compiled in); the caller then falls back to cuBLAS.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include <cstdint>

namespace lora_kernels {

enum class GemmDtype { kF16, kBF16 };

struct GemmProblem {
  GemmDtype dtype;
  bool b_kmajor;  // true: b is (N, K) row-major (out += a·bᵀ); false: b is (K, N) row-major (out += a·b)
  int64_t M, N, K;
  const void* a;
  int64_t lda;
  const void* b;
  int64_t ldb;
  void* out;
  int64_t ldo;
};

// True when the problem satisfies the 16-byte alignment the TMA / cp.async kernels need.
bool gemm_aligned(const GemmProblem& p);

// Hopper path: TMA loads + wgmma, warp-specialized persistent kernel (sm_90a only).
bool gemm_accumulate_sm90(const GemmProblem& p, int device, cudaStream_t stream);
// Ampere path: cp.async multistage pipeline + mma.sync (runs on sm_80 and newer).
bool gemm_accumulate_sm80(const GemmProblem& p, int device, cudaStream_t stream);

// Whether the sm90 kernels were compiled into this binary (an sm_90a target was built).
bool sm90_kernels_compiled();

}  // namespace lora_kernels
