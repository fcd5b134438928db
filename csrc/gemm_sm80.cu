// Ampere base GEMM (also the fallback on any sm_80+ GPU that is not sm_90a): CUTLASS 2.x
// GemmUniversal, cp.async multistage mainloop + mma.sync 16×8×16, epilogue D = acc + C with
// C = D = out, so the low-rank part already written into out is added in the epilogue.
#include "gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cutlass/cutlass.h"
#include "cutlass_run.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace lora_kernels {

namespace {

template <typename Element, typename LayoutB>
struct Sm80Gemm {
  // CUTLASS's profiler default for 16-bit tensor-op GEMMs on A100: 128×128×32 tiles, 4 stages.
  using Gemm = cutlass::gemm::device::GemmUniversal<
      Element, cutlass::layout::RowMajor, Element, LayoutB, Element, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
      cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<Element, 8, float, float>,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>, 4, 8, 8>;

  static bool run(const GemmProblem& p, int device, cudaStream_t stream) {
    const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K}, 1, {1.0f, 1.0f}, p.a,
                                  p.b, p.out, p.out, 0, 0, 0, 0, p.lda, p.ldb, p.ldo, p.ldo);
    return run_cutlass_gemm<Gemm>(args, device, stream, "sm80");
  }
};

}  // namespace

bool gemm_accumulate_sm80(const GemmProblem& p, int device, cudaStream_t stream) {
  if (!gemm_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return false;
  using Col = cutlass::layout::ColumnMajor;  // b (N, K) row-major == (K, N) column-major
  using Row = cutlass::layout::RowMajor;     // b (K, N) row-major
  if (p.dtype == GemmDtype::kBF16) {
    return p.b_kmajor ? Sm80Gemm<cutlass::bfloat16_t, Col>::run(p, device, stream)
                      : Sm80Gemm<cutlass::bfloat16_t, Row>::run(p, device, stream);
  }
  return p.b_kmajor ? Sm80Gemm<cutlass::half_t, Col>::run(p, device, stream)
                    : Sm80Gemm<cutlass::half_t, Row>::run(p, device, stream);
}

}  // namespace lora_kernels
