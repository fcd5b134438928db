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
#endif

namespace lora_kernels {

bool concat_k_aligned(const ConcatKProblem& p) {
  auto ptr_ok = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; };
  const bool ld_ok = p.lda >= p.K && p.ldt >= p.R && p.ldo >= p.N &&
                     (p.b_kmajor ? p.ldb >= p.K && p.ldl >= p.R : p.ldb >= p.N && p.ldl >= p.N);
  return ld_ok && p.lda % 8 == 0 && p.ldb % 8 == 0 && p.ldt % 8 == 0 && p.ldl % 8 == 0 && p.ldo % 8 == 0 &&
         p.K % 8 == 0 && p.R % 8 == 0 && p.N % 8 == 0 && p.K > 0 && p.R > 0 && ptr_ok(p.a) && ptr_ok(p.b) &&
         ptr_ok(p.t) && ptr_ok(p.l) && ptr_ok(p.out);
}

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

template <typename Element, typename LayoutB>
struct Sm90ConcatKGemm {
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_1, _1, _1>;

  // void C: the epilogue neither allocates nor loads a source; D = acc (alpha = 1).
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, Element, LayoutD,
      kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

  using StockMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using CollectiveMainloop = Sm90ConcatKMainloop<StockMainloop>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static bool run(const ConcatKProblem& p, int device, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K),
              R = static_cast<int>(p.R);
    constexpr int kBlkK = 64;
    const int k_total = ((K + kBlkK - 1) / kBlkK + (R + kBlkK - 1) / kBlkK) * kBlkK;
    StrideA sA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    StrideB sB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    StrideA sT = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, R, 1));
    StrideB sL = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, R, 1));
    StrideD sD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    get<0>(sA) = p.lda;
    get<0>(sT) = p.ldt;
    if constexpr (std::is_same_v<LayoutB, cutlass::layout::ColumnMajor>) {
      get<0>(sB) = p.ldb;  // b (N, K), K contiguous
      get<0>(sL) = p.ldl;
    } else {
      get<1>(sB) = p.ldb;  // b (K, N) row-major: N contiguous
      get<1>(sL) = p.ldl;
    }
    get<0>(sD) = p.ldo;

    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);

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
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
    size_t ws_size = Gemm::get_workspace_size(args);
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_size)},
                              at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    cutlass::Status st = gemm.initialize(args, ws_size ? ws.data_ptr() : nullptr, stream);
    TORCH_CHECK(st == cutlass::Status::kSuccess, "lora_kernels: CUTLASS sm90 fused GEMM initialize failed: ",
                cutlass::cutlassGetStatusString(st));
    st = gemm.run(stream);
    TORCH_CHECK(st == cutlass::Status::kSuccess, "lora_kernels: CUTLASS sm90 fused GEMM launch failed: ",
                cutlass::cutlassGetStatusString(st));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
};

}  // namespace

bool sm90_kernels_compiled() { return true; }

bool gemm_concat_k_sm90(const ConcatKProblem& p, int device, cudaStream_t stream) {
  if (!concat_k_aligned(p) || p.M > INT32_MAX || p.N > INT32_MAX || p.K + p.R + 128 > INT32_MAX) return false;
  using Col = cutlass::layout::ColumnMajor;
  using Row = cutlass::layout::RowMajor;
  if (p.dtype == GemmDtype::kBF16) {
    return p.b_kmajor ? Sm90ConcatKGemm<cutlass::bfloat16_t, Col>::run(p, device, stream)
                      : Sm90ConcatKGemm<cutlass::bfloat16_t, Row>::run(p, device, stream);
  }
  return p.b_kmajor ? Sm90ConcatKGemm<cutlass::half_t, Col>::run(p, device, stream)
                    : Sm90ConcatKGemm<cutlass::half_t, Row>::run(p, device, stream);
}

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
bool gemm_concat_k_sm90(const ConcatKProblem&, int, cudaStream_t) { return false; }

#endif

}  // namespace lora_kernels
