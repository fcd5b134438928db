// Host side of the CUDA backend: forward and backward of the fused LoRA linear on 2-D tensors,
// composed from the low-rank kernels (lowrank.cu) and the CUTLASS base GEMMs (gemm_sm80/90.cu).
//
//   forward : T = dropout(x)·Aᵀ (fp32, M×r) [+ packed mask]  -> launch 1 (skinny, mask in-kernel)
//     Hopper (sm_90a built, aligned 16-bit problem; the default):
//             t = [s·T | 1 | 1], l = [B | s·lora_bias | bias]  -> launch 2 (pack, M×R and N×R, tiny)
//             y = [x | t]·[W | l]ᵀ                             -> launch 3 (CUTLASS concatenated K)
//       y is written once and never read: the low-rank part is one or two extra K tiles.
//     elsewhere, or LORA_KERNELS_CUDA_CONCAT_K=0:
//             y = bias + s·(T·Bᵀ + lora_bias)                 -> launch 2 (expand)
//             y += x·Wᵀ                                       -> launch 3 (CUTLASS, epilogue adds y)
//   backward: dT = s·dY·B; [dB | dlora_bias] = s·dYᵀ·[T | 1]; dAᵀ = D(x)ᵀ·dT with
//             D(x) = x⊙mask/(1-p); dX = (dT·A)⊙mask/(1-p) then dX += dY·W (CUTLASS);
//             at p = 0 on Hopper: pack, then dX = [dY | dT]·[W ; A] (concatenated K, dX written once).
#include "lora_ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "gemm.h"
#include "lowrank.h"

namespace lora_kernels {
namespace {

std::atomic<int> g_gemm_backend{static_cast<int>(GemmBackend::kAuto)};
std::atomic<int> g_last_gemm_path{static_cast<int>(GemmBackend::kAuto)};

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK(false, "lora_kernels cuda backend: unsupported dtype ", t.scalar_type(),
                  " (float16, bfloat16 and float32 are supported)");
  }
}

void check_device(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), "lora_kernels cuda backend: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == dev, "lora_kernels cuda backend: ", name, " is on ", t.device(), ", x on ", dev);
}

// A floating-point operand: on x's GPU, in one of the dtypes the kernels take.
void check_cuda(const at::Tensor& t, const char* name, const at::Device& dev) {
  check_device(t, name, dev);
  dtype_of(t);
}

// A GEMM operand stored in the other major order (unit stride along dim 0: GPT-2's Conv1D weight,
// stored (K, N) and passed as its (N, K) view) is the row-major transpose of itself: the GEMMs take
// that with b_kmajor flipped, rather than leaving the problem to cuBLAS.
bool other_major(const at::Tensor& b) { return b.stride(1) != 1 && b.stride(0) == 1; }

// out (M×N) += a (M×K) · (b_kmajor ? bᵀ : b): CUTLASS when it can take the problem, else cuBLAS.
void base_gemm_accumulate(const at::Tensor& a, const at::Tensor& b_in, bool b_kmajor_in, at::Tensor& out) {
  const bool flip = other_major(b_in);
  const at::Tensor b = flip ? b_in.t() : b_in;
  const bool b_kmajor = b_kmajor_in != flip;
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1);
  if (M == 0 || N == 0 || K == 0) return;  // nothing to add (an empty sum)
  const auto st = a.scalar_type();
  const auto mode = static_cast<GemmBackend>(g_gemm_backend.load());
  bool done = false;
  if ((st == at::kHalf || st == at::kBFloat16) && mode != GemmBackend::kCublas && a.stride(1) == 1 &&
      b.stride(1) == 1 && out.stride(1) == 1) {
    GemmProblem prob{st == at::kHalf ? GemmDtype::kF16 : GemmDtype::kBF16,
                     b_kmajor,
                     M,
                     N,
                     K,
                     a.data_ptr(),
                     a.stride(0),
                     b.data_ptr(),
                     b.stride(0),
                     out.data_ptr(),
                     out.stride(0)};
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    const int dev = a.get_device();
    cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev);
    const bool hopper = prop->major == 9 && prop->minor == 0 && sm90_kernels_compiled();
    if (hopper && (mode == GemmBackend::kAuto || mode == GemmBackend::kSm90)) {
      done = gemm_accumulate_sm90(prob, dev, stream);
      if (done) g_last_gemm_path.store(static_cast<int>(GemmBackend::kSm90));
    }
    if (!done && prop->major >= 8 && (mode == GemmBackend::kAuto || mode == GemmBackend::kSm80)) {
      done = gemm_accumulate_sm80(prob, dev, stream);
      if (done) g_last_gemm_path.store(static_cast<int>(GemmBackend::kSm80));
    }
  }
  if (!done) {
    // cuBLAS: float32 inputs, unaligned shapes or strides, GPUs without a compiled CUTLASS path.
    out.addmm_(a, b_kmajor ? b.t() : b);
    g_last_gemm_path.store(static_cast<int>(GemmBackend::kCublas));
  }
}

// LORA_KERNELS_CUDA_CONCAT_K=0 turns the concatenated-K GEMM off: the forward and the p = 0 dX then
// take the expand kernel + accumulating GEMM (read per call: a benchmark can A/B both in one
// process). Any other value, or none, leaves it on where it can run.
bool concat_k_enabled() {
  const char* v = std::getenv("LORA_KERNELS_CUDA_CONCAT_K");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// The up-projection operands of expand/pack: T (rows, r) fp32 contiguous; B(n, j) = b[n, j] for the
// forward (lora_B, b_nj = true) or b[j, n] for dX (lora_A, b_nj = false); the optional biases.
UpOperands up_operands(const at::Tensor& t, const at::Tensor& b, bool b_nj, const std::optional<at::Tensor>& v1,
                       const std::optional<at::Tensor>& v2) {
  UpOperands op{};
  op.t = t.data_ptr<float>();
  op.ldt = t.size(1);
  op.b = b.data_ptr();
  op.sbn = b.stride(b_nj ? 0 : 1);
  op.sbj = b.stride(b_nj ? 1 : 0);
  op.bt = dtype_of(b);
  op.v1 = v1 ? v1->data_ptr() : nullptr;
  op.sv1 = v1 ? v1->stride(0) : 0;  // strided views are legal (e.g. b[::2])
  op.v1t = v1 ? dtype_of(*v1) : kF32;
  op.v2 = v2 ? v2->data_ptr() : nullptr;
  op.sv2 = v2 ? v2->stride(0) : 0;
  op.v2t = v2 ? dtype_of(*v2) : kF32;
  return op;
}

// Whether the concatenated-K GEMM may run for x's dtype and device under the pinned GEMM mode.
bool concat_k_eligible(const at::Tensor& x) {
  const auto st = x.scalar_type();
  const auto mode = static_cast<GemmBackend>(g_gemm_backend.load());
  if (mode != GemmBackend::kAuto && mode != GemmBackend::kSm90) return false;
  if (st != at::kHalf && st != at::kBFloat16) return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0 && sm90_kernels_compiled();
}

// out (M×N) = a (M×K)·op(b) + t·op(l) on the Hopper concatenated-K GEMM, with t (M×R) and l packed
// from pk (whose M, N, J, R, ot and l_by_rank the caller sets; its outputs are allocated here).
// b_kmajor: b is (N, K) (forward) or (K, N) (dX). Returns false where that kernel cannot take the
// problem, having launched nothing; or, if can_implement refuses after the pack (a broken contract:
// the result stays right, the pack's work is lost), with a one-time warning. The caller then runs
// the expand path. A b of the other major order (other_major) goes in transposed with b_kmajor
// flipped, and l is packed in the matching order (l_by_rank flipped).
bool run_concat_k(const at::Tensor& a, const at::Tensor& b_in, bool b_kmajor_in, PackArgs pk, at::Tensor& out,
                  const char* what) {
  const bool flip = other_major(b_in);
  const at::Tensor b = flip ? b_in.t() : b_in;
  const bool b_kmajor = b_kmajor_in != flip;
  if (flip) pk.l_by_rank = !pk.l_by_rank;
  if (!concat_k_enabled() || !concat_k_eligible(a) || a.stride(1) != 1 || b.stride(1) != 1) return false;
  const int64_t M = pk.M, N = out.size(1), K = a.size(1), R = pk.R;
  at::Tensor t = at::empty({M, R}, a.options());
  at::Tensor l = pk.l_by_rank ? at::empty({R, pk.N}, a.options()) : at::empty({pk.N, R}, a.options());
  ConcatKProblem prob{a.scalar_type() == at::kHalf ? GemmDtype::kF16 : GemmDtype::kBF16,
                      b_kmajor, M, N, K, R,
                      a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0),
                      t.data_ptr(), R, l.data_ptr(), l.stride(0),
                      out.data_ptr(), out.stride(0)};
  if (!concat_k_aligned(prob) || M > INT32_MAX || N > INT32_MAX) return false;
  const int dev = a.get_device();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(dev);
  pk.t_out = t.data_ptr();
  pk.l_out = l.data_ptr();
  launch_pack_concat(pk, stream);
  if (!gemm_concat_k_sm90(prob, dev, stream)) {
    TORCH_WARN_ONCE("lora_kernels: the sm90 concatenated-K GEMM refused an aligned ", what, " problem (M=", M,
                    " N=", N, " K=", K, " R=", R, "); falling back to the expand path. Please report it.");
    return false;
  }
  g_last_gemm_path.store(static_cast<int>(GemmBackend::kSm90Fused));
  return true;
}

// The fused forward (see the top of this file): y = [x | t]·[W | l]ᵀ with t = [s·T | 1 | 1] and
// l = [B | s·lora_bias | bias]. False: take the expand path (run_concat_k).
bool fused_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias, const at::Tensor& T,
                   double scaling, at::Tensor& y) {
  const int64_t r = lora_B.size(1);
  PackArgs pk{};
  pk.op = up_operands(T, lora_B, /*b_nj=*/true, lora_bias, bias);
  pk.M = x.size(0);
  pk.N = weight.size(0);
  pk.J = r;
  pk.R = (r + (lora_bias ? 1 : 0) + (bias ? 1 : 0) + 7) / 8 * 8;
  pk.alpha = static_cast<float>(scaling);
  pk.ot = dtype_of(x);
  pk.l_by_rank = false;
  return run_concat_k(x, weight, /*b_kmajor=*/true, pk, y, "forward");
}

// dX at p = 0 in one GEMM: dX = [dY | dT]·[W ; A] (no dropout mask to apply to the low-rank part
// alone, so it can share the accumulators); dx (M, K) is written, not accumulated. False: take the
// expand path.
bool fused_dx_no_dropout(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& lora_A,
                         const at::Tensor& dT, at::Tensor& dx) {
  const int64_t r = lora_A.size(0);
  PackArgs pk{};
  pk.op = up_operands(dT, lora_A, /*b_nj=*/false, std::nullopt, std::nullopt);  // l(k, j) = A[j, k]
  pk.M = dy.size(0);
  pk.N = weight.size(1);
  pk.J = r;
  pk.R = (r + 7) / 8 * 8;
  pk.alpha = 1.f;
  pk.ot = dtype_of(dy);
  pk.l_by_rank = true;  // l_out (R, K): A padded with zero rows
  return run_concat_k(dy, weight, /*b_kmajor=*/false, pk, dx, "dX");
}

}  // namespace

void set_gemm_backend(GemmBackend b) { g_gemm_backend.store(static_cast<int>(b)); }
GemmBackend gemm_backend() { return static_cast<GemmBackend>(g_gemm_backend.load()); }
GemmBackend last_gemm_path() { return static_cast<GemmBackend>(g_last_gemm_path.load()); }

std::vector<at::Tensor> lora_fwd(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                 const at::Tensor& lora_B, const std::optional<at::Tensor>& lora_bias,
                                 double scaling, double p, int64_t seed, bool save_mask) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "lora_fwd: expected 2-D x, weight, lora_A, lora_B");
  const auto dev = x.device();
  check_cuda(x, "x", dev);
  check_cuda(weight, "weight", dev);
  check_cuda(lora_A, "lora_A", dev);
  check_cuda(lora_B, "lora_B", dev);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(weight.size(1) == K && lora_A.size(1) == K && lora_B.size(0) == N && lora_B.size(1) == r,
              "lora_fwd: shape mismatch");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "lora_fwd: weight dtype must equal x dtype");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_fwd: p must be in [0, 1)");
  if (bias) check_cuda(*bias, "bias", dev);
  if (lora_bias) check_cuda(*lora_bias, "lora_bias", dev);
  // The expand kernel reads bias[n * stride(0)] for n < N: anything but an (N,) vector would be
  // read out of bounds (the op is callable directly through torch.ops, not only via api.py).
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "lora_fwd: bias must be (N,)");
  TORCH_CHECK(!lora_bias || (lora_bias->dim() == 1 && lora_bias->size(0) == N),
              "lora_fwd: lora_bias must be (N,)");
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const bool dropout = p > 0.0;
  const int64_t G = (K + 7) / 8;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor T = at::empty({M, r}, f32);
  at::Tensor bits = (dropout && save_mask) ? at::empty({M, G}, x.options().dtype(at::kByte))
                                           : at::empty({0}, x.options().dtype(at::kByte));
  at::Tensor y = at::empty({M, N}, x.options());

  SkinnyArgs s{};
  s.x = x.data_ptr();
  s.sxi = x.stride(0);
  s.sxc = x.stride(1);
  s.xt = dtype_of(x);
  s.a = lora_A.data_ptr();
  s.saj = lora_A.stride(0);
  s.sac = lora_A.stride(1);
  s.at = dtype_of(lora_A);
  s.R = M;
  s.J = r;
  s.C = K;
  s.ones_col = false;
  s.alpha = 1.f;
  s.mask = dropout ? SkinnyMask::kGenerate : SkinnyMask::kNone;
  s.seed = static_cast<uint64_t>(seed);
  s.threshold = dropout_threshold(p);
  s.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  s.bits_out = bits.numel() ? bits.data_ptr<uint8_t>() : nullptr;
  s.ld_bits_out = G;
  s.out = T.data_ptr<float>();
  s.ldo = r;
  launch_skinny(s, stream);
  if (M == 0 || N == 0) return {y, T, bits};
  if (K > 0 && fused_forward(x, weight, bias, lora_B, lora_bias, T, scaling, y)) return {y, T, bits};

  ExpandArgs e{};
  e.op = up_operands(T, lora_B, /*b_nj=*/true, lora_bias, bias);
  e.R = M;
  e.N = N;
  e.J = r;
  e.alpha = static_cast<float>(scaling);
  e.bits = nullptr;
  e.out = y.data_ptr();
  e.ldo = N;
  e.ot = dtype_of(y);
  launch_expand(e, stream);

  base_gemm_accumulate(x, weight, /*b_kmajor=*/true, y);
  return {y, T, bits};
}

std::vector<at::Tensor> lora_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& T,
                                 const at::Tensor& bits, double scaling, double p, int64_t seed, bool need_dx,
                                 bool need_da, bool need_db) {
  // The op is public (torch.ops.lora_kernels.cuda_lora_bwd): check everything the kernels rely on,
  // as lora_fwd does, so a direct caller gets an error rather than an out-of-bounds read.
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "lora_bwd: expected 2-D x, weight, lora_A and lora_B");
  const auto dev = x.device();
  check_cuda(dy, "dy", dev);
  check_cuda(x, "x", dev);
  check_cuda(weight, "weight", dev);
  check_cuda(lora_A, "lora_A", dev);
  check_cuda(lora_B, "lora_B", dev);
  check_cuda(T, "T", dev);
  // The packed mask is uint8 (empty when it is regenerated, or at p = 0), not a float operand.
  check_device(bits, "bits", dev);
  TORCH_CHECK(bits.scalar_type() == at::kByte, "lora_bwd: bits must be uint8, got ", bits.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(weight.size(1) == K && lora_A.size(1) == K && lora_B.size(0) == N && lora_B.size(1) == r,
              "lora_bwd: shape mismatch: x (M, K), weight (N, K), lora_A (r, K), lora_B (N, r)");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "lora_bwd: p must be in [0, 1)");
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == M && dy.size(1) == N, "lora_bwd: dy must be (M, N)");
  // dX += dY·W runs one GEMM dtype for dY, W and dX (CUTLASS reinterprets the raw pointers).
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
              "lora_bwd: dy and weight must have x's dtype");
  TORCH_CHECK(T.scalar_type() == at::kFloat && T.dim() == 2 && T.size(0) == M && T.size(1) == r &&
                  T.is_contiguous(),
              "lora_bwd: T must be a contiguous float32 (M, r) tensor");
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool dropout = p > 0.0;
  const int64_t G = (K + 7) / 8;
  const uint32_t threshold = dropout_threshold(p);
  const float keep_scale = static_cast<float>(1.0 / (1.0 - p));
  auto f32 = x.options().dtype(at::kFloat);

  // dT = s · dY · B  (M × r): for dX and dA only.
  const bool need_dt = need_dx || need_da;
  at::Tensor dT = at::empty({need_dt ? M : 0, r}, f32);
  if (need_dt) {
    SkinnyArgs s{};
    s.x = dy.data_ptr();
    s.sxi = dy.stride(0);
    s.sxc = dy.stride(1);
    s.xt = dtype_of(dy);
    s.a = lora_B.data_ptr();  // A(j, c = n) = B[n, j]
    s.saj = lora_B.stride(1);
    s.sac = lora_B.stride(0);
    s.at = dtype_of(lora_B);
    s.R = M;
    s.J = r;
    s.C = N;
    s.alpha = static_cast<float>(scaling);
    s.mask = SkinnyMask::kNone;
    s.keep_scale = 1.f;
    s.out = dT.data_ptr<float>();
    s.ldo = r;
    launch_skinny(s, stream);
  }
  // [dB | dlora_bias] = s · dYᵀ · [T | 1]  (N × (r + 1)): one pass over dY for both.
  at::Tensor dBx = at::empty({need_db ? N : 0, r + 1}, f32);
  if (need_db) {
    SkinnyArgs s{};
    s.x = dy.data_ptr();  // X(i = n, c = m) = dY[m, n]
    s.sxi = dy.stride(1);
    s.sxc = dy.stride(0);
    s.xt = dtype_of(dy);
    s.a = T.data_ptr();  // A(j, c = m) = T[m, j]
    s.saj = 1;
    s.sac = r;
    s.at = kF32;
    s.R = N;
    s.J = r;
    s.C = M;
    s.ones_col = true;
    s.alpha = static_cast<float>(scaling);
    s.mask = SkinnyMask::kNone;
    s.keep_scale = 1.f;
    s.out = dBx.data_ptr<float>();
    s.ldo = r + 1;
    launch_skinny(s, stream);
  }
  // The packed mask: saved in "bitmask" mode, regenerated from the seed otherwise (M·K/8 bytes).
  // An empty tensor asks for regeneration; anything else must be exactly the forward's (M, ceil(K/8))
  // mask. A wrong-sized one is a caller's bug: regenerating over it would hide it.
  at::Tensor mask = bits;
  if (dropout && need_dt && mask.numel() == 0 && M * G > 0) {
    mask = at::empty({M, G}, x.options().dtype(at::kByte));
    launch_make_mask(static_cast<uint64_t>(seed), threshold, M, K, mask.data_ptr<uint8_t>(), stream);
  }
  if (dropout && need_dt) {
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == M * G &&
                    (mask.numel() == 0 || (mask.dim() == 2 && mask.size(0) == M && mask.size(1) == G)),
                "lora_bwd: bits must be empty (regenerate) or a contiguous uint8 (M, ceil(K/8)) = (", M, ", ", G,
                ") tensor, got shape ", mask.sizes());
  }
  // dAᵀ = D(x)ᵀ · dT  (K × r), D(x) = x ⊙ mask / (1 - p)
  at::Tensor dAt = at::empty({need_da ? K : 0, r}, f32);
  if (need_da) {
    SkinnyArgs s{};
    s.x = x.data_ptr();  // X(i = k, c = m) = x[m, k]
    s.sxi = x.stride(1);
    s.sxc = x.stride(0);
    s.xt = dtype_of(x);
    s.a = dT.data_ptr();  // A(j, c = m) = dT[m, j]
    s.saj = 1;
    s.sac = r;
    s.at = kF32;
    s.R = K;
    s.J = r;
    s.C = M;
    s.alpha = 1.f;
    s.mask = dropout ? SkinnyMask::kBitsTransposed : SkinnyMask::kNone;
    s.keep_scale = keep_scale;
    s.bits_in = dropout ? mask.data_ptr<uint8_t>() : nullptr;
    s.ld_bits_in = G;
    s.out = dAt.data_ptr<float>();
    s.ldo = r;
    launch_skinny(s, stream);
  }
  at::Tensor dx = at::empty({0}, x.options());
  if (need_dx) {
    dx = at::empty({M, K}, x.options());
  }
  if (need_dx && M > 0 && K > 0 && !(N > 0 && !dropout && fused_dx_no_dropout(dy, weight, lora_A, dT, dx))) {
    // dX = (dT · A) ⊙ mask / (1 - p), then dX += dY · W in the GEMM's epilogue.
    ExpandArgs e{};
    e.op = up_operands(dT, lora_A, /*b_nj=*/false, std::nullopt, std::nullopt);  // B(k, j) = A[j, k]
    e.R = M;
    e.N = K;
    e.J = r;
    e.alpha = 1.f;
    e.bits = dropout ? mask.data_ptr<uint8_t>() : nullptr;
    e.ld_bits = G;
    e.keep_scale = keep_scale;
    e.out = dx.data_ptr();
    e.ldo = K;
    e.ot = dtype_of(dx);
    launch_expand(e, stream);
    base_gemm_accumulate(dy, weight, /*b_kmajor=*/false, dx);
  }
  const auto adt = lora_A.scalar_type();
  at::Tensor dA = need_da ? dAt.t().to(adt).contiguous() : at::empty({0}, lora_A.options());
  // Fresh storages: for N == 1 with fp32 adapters .to()/.contiguous() would return views of dBx, and
  // a custom op may not return outputs that alias each other (torch.library checks it on every call).
  at::Tensor dB = need_db ? at::empty({N, r}, lora_B.options()) : at::empty({0}, lora_B.options());
  at::Tensor dlb = at::empty({need_db ? N : 0}, lora_B.options());
  if (need_db) {
    dB.copy_(dBx.narrow(1, 0, r));
    dlb.copy_(dBx.select(1, r));
  }
  return {dx, dA, dB, dlb};
}

at::Tensor host_pack_mask_tensor(uint64_t seed, int64_t M, int64_t K, double p) {
  TORCH_CHECK(M >= 0 && K >= 0, "host_pack_mask: M and K must be >= 0");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "host_pack_mask: p must be in [0, 1)");
  at::Tensor bits = at::empty({M, (K + 7) / 8}, at::TensorOptions().dtype(at::kByte));
  if (bits.numel()) host_pack_mask(seed, dropout_threshold(p), M, K, bits.data_ptr<uint8_t>());
  return bits;
}

at::Tensor host_keep_mask_tensor(uint64_t seed, int64_t M, int64_t K, double p) {
  at::Tensor bits = host_pack_mask_tensor(seed, M, K, p);
  // Unpack bit j of byte g -> column 8g + j, the inverse of reference.pack_mask.
  at::Tensor shifts = at::arange(8, at::TensorOptions().dtype(at::kInt));
  at::Tensor out = bits.to(at::kInt).unsqueeze(2).bitwise_right_shift(shifts).bitwise_and(1);
  return out.reshape({M, ((K + 7) / 8) * 8}).narrow(1, 0, K).to(at::kBool).contiguous();
}

}  // namespace lora_kernels
