// Entry points of the CUDA backend exposed to Python by bindings.cpp (2-D tensors; see
// lora_kernels/cuda_ops/lora_linear.py for the op schemas and the autograd wiring).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace lora_kernels {

// Which base-GEMM implementation lora_fwd / lora_bwd use (tests and benchmarks pin one).
// kSm90Fused is reported by last_gemm_path only: the forward's fused concatenated-K GEMM (the
// "sm90" pin selects it, as it selects the sm90 kernel of the other GEMMs).
enum class GemmBackend : int { kAuto = 0, kCublas = 1, kSm80 = 2, kSm90 = 3, kSm90Fused = 4 };
void set_gemm_backend(GemmBackend b);
GemmBackend gemm_backend();
// The implementation the most recent non-empty base GEMM actually ran on (kAuto = none yet):
// the CUTLASS paths fall back to cuBLAS silently, so tests need this to prove a path ran.
GemmBackend last_gemm_path();

// x (M, K), weight (N, K), bias (N,)?, lora_A (r, K), lora_B (N, r), lora_bias (N,)?
// -> {y (M, N) in x's dtype, T = dropout(x)·Aᵀ (M, r) fp32, bits (M, ceil(K/8)) uint8 or (0,)}
std::vector<at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                 double scaling, double p, int64_t seed, bool save_mask);

// dy (M, N) -> {dx (M, K) or (0,) if !need_dx, dA (r, K) or (0,) if !need_da, dB (N, r) and
// dlora_bias (N,), both (0,) if !need_db} (adapter dtype). A gradient not asked for costs nothing:
// without need_da no pass over x for dA, without need_db (lora_B frozen) no pass over dY for dB.
// bits: the forward's packed mask, or an empty tensor to regenerate it from seed.
std::vector<at::Tensor> lora_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& T,
                                 const at::Tensor& bits, double scaling, double p, int64_t seed, bool need_dx,
                                 bool need_da, bool need_db);

// CPU: the packed keep-mask (M, ceil(K/8)) uint8 and the boolean keep-mask (M, K), computed with
// the same Philox code as the kernels (philox.cuh).
at::Tensor host_pack_mask_tensor(uint64_t seed, int64_t M, int64_t K, double p);
at::Tensor host_keep_mask_tensor(uint64_t seed, int64_t M, int64_t K, double p);

}  // namespace lora_kernels
