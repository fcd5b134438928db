// csrc/lora_ops.cpp itself — the CUDA backend's host orchestration (checks, allocation, launch
// sequence, strides, split plans, the GEMM path choices) — compiled for the CPU and run on CPU tensors
// by tests/test_cuda_ops_emulation.py, where there is no GPU.
//
// The kernels are the real device code under the host emulation of emu_runtime.h (lowrank.cu's
// launchers mirrored there); the CUTLASS GEMMs are fp32-accumulating matmuls behind the same
// eligibility rules (gemm.h's gemm_aligned / concat_k_aligned), so the same paths are taken as on the
// GPU; cuBLAS is torch's CPU addmm_. The emulated GPU's compute capability and whether the sm90a
// kernels were compiled are set from Python. torch's CUDA headers are replaced by tests/cuda_emu/shim/,
// and is_cuda() reads is_cpu(): lora_ops.cpp is otherwise compiled as it is.
#include <torch/extension.h>

#include "emu_runtime.h"

#define is_cuda is_cpu
#include "lora_ops.cpp"
#undef is_cuda

namespace {
cudaDeviceProp g_prop = [] {
  cudaDeviceProp p{};
  p.major = 9;
  p.minor = 0;
  p.multiProcessorCount = lora_kernels::kEmuSms;
  return p;
}();
bool g_sm90_compiled = true;
int g_gemm_calls = 0;
}  // namespace

cudaDeviceProp* at::cuda::getCurrentDeviceProperties() { return &g_prop; }

namespace lora_kernels {
namespace {
at::Tensor view(const void* p, int64_t rows, int64_t cols, int64_t ld, GemmDtype d) {
  const auto st = d == GemmDtype::kF16 ? at::kHalf : at::kBFloat16;
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(st));
}
at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }
// The CUTLASS GEMMs' contract: fp32 accumulation, D = round(acc + C) (accumulating) or round(acc).
bool accumulate(const GemmProblem& p) {
  if (!gemm_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return false;
  at::Tensor out = view(p.out, p.M, p.N, p.ldo, p.dtype);
  at::Tensor a = view(p.a, p.M, p.K, p.lda, p.dtype);
  at::Tensor b = p.b_kmajor ? view(p.b, p.N, p.K, p.ldb, p.dtype).t() : view(p.b, p.K, p.N, p.ldb, p.dtype);
  out.copy_(f32(out).addmm(f32(a), f32(b)));
  ++g_gemm_calls;
  return true;
}
}  // namespace

bool sm90_kernels_compiled() { return g_sm90_compiled; }
bool gemm_accumulate_sm90(const GemmProblem& p, int, cudaStream_t) { return accumulate(p); }
bool gemm_accumulate_sm80(const GemmProblem& p, int, cudaStream_t) { return accumulate(p); }
bool gemm_concat_k_sm90(const ConcatKProblem& p, int, cudaStream_t) {
  if (!concat_k_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K + p.R + 128 > INT32_MAX) return false;
  at::Tensor a = view(p.a, p.M, p.K, p.lda, p.dtype), t = view(p.t, p.M, p.R, p.ldt, p.dtype);
  at::Tensor b = p.b_kmajor ? view(p.b, p.N, p.K, p.ldb, p.dtype).t() : view(p.b, p.K, p.N, p.ldb, p.dtype);
  at::Tensor l = p.b_kmajor ? view(p.l, p.N, p.R, p.ldl, p.dtype).t() : view(p.l, p.R, p.N, p.ldl, p.dtype);
  view(p.out, p.M, p.N, p.ldo, p.dtype).copy_(f32(at::cat({a, t}, 1)).mm(f32(at::cat({b, l}, 0))));
  ++g_gemm_calls;
  return true;
}
// lowrank.cu's host copy of the mask: here the emulated device kernel (the same bits).
void host_pack_mask(uint64_t seed, uint32_t threshold, int64_t M, int64_t K, uint8_t* bits) {
  launch_make_mask(seed, threshold, M, K, bits, nullptr);
}
}  // namespace lora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_fwd", &lora_kernels::lora_fwd);
  m.def("lora_bwd", &lora_kernels::lora_bwd);
  m.def("host_pack_mask", &lora_kernels::host_pack_mask_tensor);
  m.def("set_device", [](int major, int minor, bool sm90_compiled) {
    g_prop.major = major;
    g_prop.minor = minor;
    g_sm90_compiled = sm90_compiled;
  });
  m.def("set_gemm_backend", [](int b) { lora_kernels::set_gemm_backend(static_cast<lora_kernels::GemmBackend>(b)); });
  // emu_runtime.h's LORA_EMU_SCHEDULE, set from Python: 0 parallel, 1 forward, 2 reverse, 3 shuffle.
  m.def("set_schedule", [](int mode) { g_schedule = mode; });
  m.def("set_split_min_c", [](int64_t c) { lora_kernels::g_split_min_c = c; });  // small shapes split too
  m.def("last_gemm_path", [] { return static_cast<int>(lora_kernels::last_gemm_path()); });
  m.def("stats", [] {
    return std::vector<int64_t>{fails + g_wmma_fails.load(), lora_kernels::g_skinny_launches,
                                lora_kernels::g_split_launches, g_gemm_calls};
  });
}
