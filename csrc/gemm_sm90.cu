// Hopper base GEMM: CUTLASS 3.x collective builder, TMA + wgmma, warp-specialized cooperative
// persistent kernel, epilogue D = acc + C with C = D = out (the low-rank part already written).
//
// Four instantiations only (fp16/bf16 × the two B layouts), one tile shape: every extra
// instantiation costs about a minute of nvcc time on a 2-core CI machine.
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
#endif

namespace lora_kernels {

#if defined(LORA_KERNELS_SM90A)
namespace {

using namespace cute;

template <typename Element, typename LayoutB>
struct Sm90Gemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutC = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);
  // 128×256×64 with a 1×1 cluster: the shape the ANCHORS measurement found best for Triton's TMA
  // kernel on these problem sizes; no cluster so that any M, N is legal without multicast edge cases.
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _1, _1>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutC, kAlign, Element,
      LayoutC, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static bool run(const GemmProblem& p, int device, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
    // Packed strides fix the static unit stride; the leading dimension is then set from the tensor.
    StrideA sA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    StrideB sB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    StrideC sC = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(M, N, 1));
    StrideD sD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    get<0>(sA) = p.lda;  // A (M, K): row stride
    if constexpr (std::is_same_v<LayoutB, cutlass::layout::ColumnMajor>) {
      get<0>(sB) = p.ldb;  // B seen as (N, K) with K contiguous: W[n, k]
    } else {
      get<1>(sB) = p.ldb;  // B seen as (N, K) with N contiguous: W[k_gemm, n_gemm] row-major
    }
    get<0>(sC) = p.ldo;
    get<0>(sD) = p.ldo;

    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);

    using E = typename Gemm::ElementA;
    using O = typename Gemm::ElementD;
    typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm,
                                  {M, N, K, 1},
                                  {static_cast<const E*>(p.a), sA, static_cast<const E*>(p.b), sB},
                                  {{1.0f, 1.0f}, static_cast<const O*>(p.out), sC, static_cast<O*>(p.out), sD},
                                  hw};
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
    size_t ws_size = Gemm::get_workspace_size(args);
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_size)},
                              at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    cutlass::Status st = gemm.initialize(args, ws_size ? ws.data_ptr() : nullptr, stream);
    TORCH_CHECK(st == cutlass::Status::kSuccess, "lora_kernels: CUTLASS sm90 GEMM initialize failed: ",
                cutlass::cutlassGetStatusString(st));
    st = gemm.run(stream);
    TORCH_CHECK(st == cutlass::Status::kSuccess, "lora_kernels: CUTLASS sm90 GEMM launch failed: ",
                cutlass::cutlassGetStatusString(st));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

}  // namespace

bool sm90_kernels_compiled() { return true; }

bool gemm_accumulate_sm90(const GemmProblem& p, int device, cudaStream_t stream) {
  if (!gemm_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K > INT32_MAX) return false;
  using Col = cutlass::layout::ColumnMajor;
  using Row = cutlass::layout::RowMajor;
  if (p.dtype == GemmDtype::kBF16) {
    return p.b_kmajor ? Sm90Gemm<cutlass::bfloat16_t, Col>::run(p, device, stream)
                      : Sm90Gemm<cutlass::bfloat16_t, Row>::run(p, device, stream);
  }
  return p.b_kmajor ? Sm90Gemm<cutlass::half_t, Col>::run(p, device, stream)
                    : Sm90Gemm<cutlass::half_t, Row>::run(p, device, stream);
}

#else  // no sm_90a target in this build

bool sm90_kernels_compiled() { return false; }
bool gemm_accumulate_sm90(const GemmProblem&, int, cudaStream_t) { return false; }

#endif

}  // namespace lora_kernels
