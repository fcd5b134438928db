// Hopper GEMMs: CUTLASS 3.x collective builder, TMA + wgmma, warp-specialized cooperative
// persistent kernels, one tile shape (128×256×64, 1×1 cluster).
//   - Sm90Gemm: out += a·op(b) (epilogue D = acc + C, C = D = out): the dX GEMM, and the forward of
//     the unfused path (LORA_KERNELS_CUDA_CONCAT_K=0).
//   - Sm90ConcatKGemm: out = a·op(b) + t·op(l) (sm90_concat_k.hpp): the fused forward (the low-rank
//     product and the biases are extra K tiles) and the dX GEMM at p = 0; the epilogue stores
//     without reading C.
// Eight instantiations (fp16/bf16 × {accumulate, concat} × the two B layouts): each costs about a
// minute of nvcc time on a 2-core CI machine.
#include "gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#if defined(LORA_KERNELS_SM90A)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "sm90_concat_k.hpp"
#include "cutlass_run.h"
#endif

namespace lora_kernels {

#if defined(LORA_KERNELS_SM90A)
namespace {

using namespace cute;

template <class Mainloop>
using StockMainloop = Mainloop;

// Strides of a matrix of `rows` × `cols` with leading dimension ld: the packed stride fixes the static
// unit stride, then the leading dimension is set from the tensor. A, C, D: row-major. B seen as
// (N, K): K contiguous (ColumnMajor, W[n, k]) or N contiguous (RowMajor, b[k, n]).
template <class Stride>
Stride row_major_stride(int rows, int cols, int64_t ld) {
  Stride st = cutlass::make_cute_packed_stride(Stride{}, cute::make_shape(rows, cols, 1));
  get<0>(st) = ld;
  return st;
}
template <class Stride, class LayoutB>
Stride b_stride(int n, int k, int64_t ld) {
  Stride st = cutlass::make_cute_packed_stride(Stride{}, cute::make_shape(n, k, 1));
  if constexpr (std::is_same_v<LayoutB, cutlass::layout::ColumnMajor>) {
    get<0>(st) = ld;
  } else {
    get<1>(st) = ld;
  }
  return st;
}

cutlass::KernelHardwareInfo hw_info(int device) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return hw;
}

// The configuration both Hopper kernels share: 128×256×64 tiles with a 1×1 cluster (the shape the
// ANCHORS measurement found best for Triton's TMA kernel on these problem sizes; no cluster, so any
// M, N is legal without multicast edge cases), a TMA warp-specialized cooperative persistent kernel,
// A and D row-major. ElementC = void: an epilogue without a source (D = acc). WrapMainloop turns the
// stock collective into the one the kernel runs.
template <typename Element, typename LayoutB, typename ElementC, template <class> class WrapMainloop>
struct Sm90Kernel {
  using Layout = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _1, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, Layout, kAlign, Element, Layout,
      kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using CollectiveMainloop = WrapMainloop<typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, Layout, kAlign, Element, LayoutB, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// out += a·op(b): epilogue D = acc + C with C = D = out.
template <typename Element, typename LayoutB>
struct Sm90Gemm {
  using Gemm = typename Sm90Kernel<Element, LayoutB, Element, StockMainloop>::Gemm;

  static bool run(const GemmProblem& p, int device, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
    const StrideA sA = row_major_stride<StrideA>(M, K, p.lda);
    const StrideB sB = b_stride<StrideB, LayoutB>(N, K, p.ldb);
    const StrideC sC = row_major_stride<StrideC>(M, N, p.ldo);
    const StrideD sD = row_major_stride<StrideD>(M, N, p.ldo);
    const cutlass::KernelHardwareInfo hw = hw_info(device);

    using E = typename Gemm::ElementA;
    using O = typename Gemm::ElementD;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {static_cast<const E*>(p.a), sA, static_cast<const E*>(p.b), sB},
                                  {{1.0f, 1.0f}, static_cast<const O*>(p.out), sC, static_cast<O*>(p.out), sD},
                                  hw};
    return run_cutlass_gemm<Gemm>(args, device, stream, "sm90");
  }
};

// out = [a | t]·[op(b) ; op(l)] (sm90_concat_k.hpp), written without reading C.
template <typename Element, typename LayoutB>
struct Sm90ConcatKGemm {
  using Config = Sm90Kernel<Element, LayoutB, void, Sm90ConcatKMainloop>;
  using CollectiveMainloop = typename Config::CollectiveMainloop;
  using Gemm = typename Config::Gemm;

  static bool run(const ConcatKProblem& p, int device, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K),
              R = static_cast<int>(p.R);
    constexpr int kBlkK = 64;
    const int k_total = ((K + kBlkK - 1) / kBlkK + (R + kBlkK - 1) / kBlkK) * kBlkK;
    const StrideA sA = row_major_stride<StrideA>(M, K, p.lda);
    const StrideB sB = b_stride<StrideB, LayoutB>(N, K, p.ldb);
    const StrideA sT = row_major_stride<StrideA>(M, R, p.ldt);
    const StrideB sL = b_stride<StrideB, LayoutB>(N, R, p.ldl);
    const StrideD sD = row_major_stride<StrideD>(M, N, p.ldo);
    const cutlass::KernelHardwareInfo hw = hw_info(device);

    using E = typename Gemm::ElementA;
    using O = typename Gemm::ElementD;
    typename CollectiveMainloop::Arguments mainloop{static_cast<const E*>(p.a), sA, static_cast<const E*>(p.b), sB,
                                                    static_cast<const E*>(p.t), sT, static_cast<const E*>(p.l), sL,
                                                    K, R};
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, k_total, 1},
                                  mainloop,
                                  {{1.0f, 0.0f}, nullptr, StrideC{}, static_cast<O*>(p.out), sD},
                                  hw};
    return run_cutlass_gemm<Gemm>(args, device, stream, "sm90 fused");
  }
};

}  // namespace

bool sm90_kernels_compiled() { return true; }

namespace {
// G<element, B layout>::run(p, ...) for p's dtype and B layout (fp16/bf16 × K-major/N-major b).
template <template <typename, typename> class G, class Problem>
bool dispatch_sm90(const Problem& p, int device, cudaStream_t stream) {
  using Col = cutlass::layout::ColumnMajor;  // b (N, K) row-major == (K, N) column-major
  using Row = cutlass::layout::RowMajor;     // b (K, N) row-major
  if (p.dtype == GemmDtype::kBF16) {
    return p.b_kmajor ? G<cutlass::bfloat16_t, Col>::run(p, device, stream)
                      : G<cutlass::bfloat16_t, Row>::run(p, device, stream);
  }
  return p.b_kmajor ? G<cutlass::half_t, Col>::run(p, device, stream) : G<cutlass::half_t, Row>::run(p, device, stream);
}
}  // namespace

bool gemm_concat_k_sm90(const ConcatKProblem& p, int device, cudaStream_t stream) {
  if (!concat_k_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K + p.R + 128 > INT32_MAX) return false;
  return dispatch_sm90<Sm90ConcatKGemm>(p, device, stream);
}

bool gemm_accumulate_sm90(const GemmProblem& p, int device, cudaStream_t stream) {
  if (!gemm_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return false;
  return dispatch_sm90<Sm90Gemm>(p, device, stream);
}

#else  // no sm_90a target in this build

bool sm90_kernels_compiled() { return false; }
bool gemm_accumulate_sm90(const GemmProblem&, int, cudaStream_t) { return false; }
bool gemm_concat_k_sm90(const ConcatKProblem&, int, cudaStream_t) { return false; }

#endif

}  // namespace lora_kernels
