// Low-rank and mask kernels of the LoRA linear (CUDA cores, fp32 accumulation).
//
// Two generic kernels cover every low-rank product of forward and backward (skinny with tensor cores
// when X is 16-bit: A is then rounded to X's dtype, as the Triton kernels do); operands are read
// through (row, column) element strides, so transposed views and strided x need no copies:
//   skinny:  out[i, j] = alpha · Σ_c X(i, c) · mask(i, c) · A(j, c)          (fp32 out, j < J [+1])
//   expand:  out[i, n] = (alpha · (Σ_j T[i, j] · B(n, j) + v1[n]) + v2[n]) · mask(i, n)
// plus the packed-bitmask generator. All reductions run in a fixed order (no atomics), so results
// are deterministic run to run: inside one thread block, or, when launch_skinny splits C over
// blockIdx.z to fill the GPU (plan_skinny_split), per-split fp32 partials added in split order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lora_kernels {

// Runtime element types of the operands (the kernels convert to fp32 on load).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

enum class SkinnyMask : int {
  kNone = 0,
  kGenerate = 1,        // X(i, c) is x[m = i, k = c]: Philox mask generated in the kernel
  kBitsTransposed = 2,  // X(i, c) is x[m = c, k = i]: bit (m, k) read from a packed bitmask
};

struct SkinnyArgs {
  const void* x;  // X(i, c) = x[i * sxi + c * sxc]
  int64_t sxi, sxc;
  DType xt;
  const void* a;  // A(j, c) = a[j * saj + c * sac]
  int64_t saj, sac;
  DType at;
  int64_t R, J, C;  // out is (R, J + ones_col)
  bool ones_col;    // A(J, c) = 1: the extra column J of out holds alpha · Σ_c X(i, c)
  float alpha;
  SkinnyMask mask;
  uint64_t seed;
  uint32_t threshold;
  float keep_scale;          // 1 / (1 - p): kept elements are scaled by it
  uint8_t* bits_out;         // kGenerate: packed mask (R, ceil(C / 8)) written if not null
  int64_t ld_bits_out;
  const uint8_t* bits_in;    // kBitsTransposed: packed mask (C, ceil(R / 8))
  int64_t ld_bits_in;
  float* out;
  int64_t ldo;
};

// The up-projection operands the expand and pack kernels read: T (rows, J) fp32, B(n, j) and two
// bias vectors (N,), each through its own strides and dtype. Bias vectors are read through their
// element stride: a bias may be a strided view (a column of a matrix, every other element), and the
// backend contract does not make it contiguous.
struct UpOperands {
  const float* t;  // T (rows, J), row stride ldt
  int64_t ldt;
  const void* b;  // B(n, j) = b[n * sbn + j * sbj]
  int64_t sbn, sbj;
  DType bt;
  const void* v1;  // v1[n * sv1]: added before alpha (lora_bias) or null
  int64_t sv1;
  DType v1t;
  const void* v2;  // v2[n * sv2]: added after alpha (bias) or null
  int64_t sv2;
  DType v2t;
};

struct ExpandArgs {
  UpOperands op;  // T is (R, J)
  int64_t R, N, J;
  float alpha;
  const uint8_t* bits;  // packed mask (R, ceil(N / 8)) or null: out = kept ? v · keep_scale : 0
  int64_t ld_bits;
  float keep_scale;
  void* out;  // (R, N), row stride ldo
  int64_t ldo;
  DType ot;
};

// Operands of the concatenated-K GEMM (gemm_concat_k_sm90 in gemm.h), in its 16-bit dtype ot, with R
// columns of rank (R: a multiple of 8, ≥ J + has(v1) + has(v2)):
//   t_out (M, R) = [alpha·T | 1 if v1 | 1 if v2 | 0 …]
//   l     (N, R) = [B       | alpha·v1 | v2      | 0 …], stored as l_out (N, R), or (R, N) if l_by_rank
// so that t·lᵀ = alpha·(T·Bᵀ + v1) + v2. Forward: the expand kernel's result as extra K tiles of the
// base GEMM instead of an M×N pass. dX at p = 0: t = dT, l = Aᵀ (l_by_rank: A itself, padded to R rows).
// alpha is folded into T in fp32 before rounding to ot.
struct PackArgs {
  UpOperands op;  // T is (M, J)
  int64_t M, N, J, R;
  float alpha;
  DType ot;
  bool l_by_rank;
  void* t_out;
  void* l_out;
};

// out must be on the current device and stream the current stream: a split launch allocates its
// partial-sum workspace there with the caching allocator.
void launch_skinny(const SkinnyArgs& a, cudaStream_t stream);
void launch_expand(const ExpandArgs& a, cudaStream_t stream);
void launch_pack_concat(const PackArgs& a, cudaStream_t stream);
// bits (M, ceil(K / 8)) row-major: the packed keep-mask of reference.pack_mask.
void launch_make_mask(uint64_t seed, uint32_t threshold, int64_t M, int64_t K, uint8_t* bits,
                      cudaStream_t stream);

// Host (CPU) versions built from the same Philox code: used to prove bit-identity in CPU tests.
uint32_t dropout_threshold(double p);
void host_pack_mask(uint64_t seed, uint32_t threshold, int64_t M, int64_t K, uint8_t* bits);

}  // namespace lora_kernels
