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
// Inline (not in the .cu files): tests/cuda_emu/ops_emu.cpp takes the same paths as the real build.
inline bool gemm_aligned(const GemmProblem& p) {
  // 16-byte vectors of 2-byte elements: leading dimensions multiple of 8, pointers 16-byte aligned.
  auto ptr_ok = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  // Leading dimensions must also cover a row (broadcast views with stride 0 go to cuBLAS).
  const bool ld_ok = p.lda >= p.K && p.ldo >= p.N && p.ldb >= (p.b_kmajor ? p.K : p.N);
  return ld_ok && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.ldo % 8 == 0 && p.K % 8 == 0 && p.N % 8 == 0 &&
         ptr_ok(p.a) && ptr_ok(p.b) && ptr_ok(p.out);
}

// Hopper path: TMA loads + wgmma, warp-specialized persistent kernel (sm_90a only).
bool gemm_accumulate_sm90(const GemmProblem& p, int device, cudaStream_t stream);
// Ampere path: cp.async multistage pipeline + mma.sync (runs on sm_80 and newer).
bool gemm_accumulate_sm80(const GemmProblem& p, int device, cudaStream_t stream);

// Whether the sm90 kernels were compiled into this binary (an sm_90a target was built).
bool sm90_kernels_compiled();

// The concatenated-K GEMM (Hopper): out (M×N) = [a | t] · [op(b) ; op(l)] = a·op(b) + t·op(l),
// written, not accumulated. One persistent TMA + wgmma kernel whose K loop walks the ⌈K/64⌉ tiles of
// (a, b) and then the ⌈R/64⌉ tiles of (t, l) into the same fp32 accumulators: a concatenated K
// without a concatenated copy (csrc/sm90_concat_k.hpp).
//   forward (b_kmajor): y = [x | t]·[W | l]ᵀ with t = [s·T | 1 | 1] (M, R), l = [B | s·lora_bias |
//     bias] (N, R) (pack_concat in lowrank.h): the whole LoRA output, no M×N intermediate.
//   dX at p = 0 (!b_kmajor): dX = [dY | dT]·[W ; A] with W (N_lora, K) and A (r, K) row-major.
// All matrices row-major with unit inner stride; R a multiple of 8 (16-byte TMA strides).
struct ConcatKProblem {
  GemmDtype dtype;
  bool b_kmajor;  // true: b (N, K) and l (N, R); false: b (K, N) and l (R, N)
  int64_t M, N, K, R;
  const void* a;  // (M, K)
  int64_t lda;
  const void* b;
  int64_t ldb;
  const void* t;  // (M, R)
  int64_t ldt;
  const void* l;
  int64_t ldl;
  void* out;  // (M, N)
  int64_t ldo;
};
// The alignment gemm_concat_k_sm90 needs: 16-byte pointers, leading dimensions and K, R, N multiples
// of 8 elements, K, R > 0.
inline bool concat_k_aligned(const ConcatKProblem& p) {
  auto ptr_ok = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  const bool ld_ok = p.lda >= p.K && p.ldt >= p.R && p.ldo >= p.N &&
                     (p.b_kmajor ? p.ldb >= p.K && p.ldl >= p.R : p.ldb >= p.N && p.ldl >= p.N);
  return ld_ok && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.ldt % 8 == 0 && p.ldl % 8 == 0 && p.ldo % 8 == 0 &&
         p.K % 8 == 0 && p.R % 8 == 0 && p.N % 8 == 0 && p.K > 0 && p.R > 0 && ptr_ok(p.a) && ptr_ok(p.b) &&
         ptr_ok(p.t) && ptr_ok(p.l) && ptr_ok(p.out);
}
// False (nothing launched) when the problem is not TMA-aligned or sm_90a was not compiled in.
bool gemm_concat_k_sm90(const ConcatKProblem& p, int device, cudaStream_t stream);

}  // namespace lora_kernels
