// A CUTLASS 3.x Hopper mainloop over a "concatenated K": C = [A | T] · [B | L]ᵀ, where A (M×K),
// B (N×K), T (M×R), L (N×R) are four separate tensors. The K loop first walks the ⌈K/BK⌉ tiles of
// (A, B), then the ⌈R/BK⌉ tiles of (T, L), through the same shared-memory stages into the same
// accumulators. The fused LoRA forward uses it with T = [s·dropout(x)Aᵀ | 1 | 1] and
// L = [B_lora | s·lora_bias | bias]: the low-rank product and both biases ride in the GEMM's own
// K loop (one or two extra tiles next to K/64 = 64 at K = 4096), so the output is written once and
// nothing M×N is read. The epilogue then only converts and stores.
//
// It derives from the stock TMA warp-specialized collective (sm90_mma_tma_gmma_ss_warpspecialized)
// and replaces only the producer side: Arguments/Params carry two more TMA descriptors, load_init
// reports the total tile count, load picks the source tensor per tile. The consumer side (mma,
// mma_tail) is inherited unchanged: T's and L's tiles have A's and B's box shapes, smem layouts and
// transaction bytes, so the pipeline cannot tell them apart.
//
// The kernel (GemmUniversal, KernelTmaWarpSpecializedCooperative) computes the number of K tiles from
// the problem shape's K, so callers pass K_total = (⌈K/BK⌉ + ⌈R/BK⌉)·BK there and the real K and R
// in the mainloop arguments. TMA zero-fills reads past K and R, so ragged last tiles add zeros.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"

namespace lora_kernels {

template <class Base>
struct Sm90ConcatKMainloop : Base {
  using ClusterShape = typename Base::DispatchPolicy::ClusterShape;
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;

  // Multicast would need the per-block masks of the stock load(); one CTA per cluster keeps every
  // copy a plain TMA load.
  static_assert(cute::size(ClusterShape{}) == 1, "Sm90ConcatKMainloop supports 1x1x1 clusters only");
  static constexpr int kBlkK = cute::size<2>(TileShape{});

  struct Arguments {
    ElementA const* ptr_A;
    StrideA dA;
    ElementB const* ptr_B;
    StrideB dB;
    ElementA const* ptr_T;  // (M, R), A's layout
    StrideA dT;
    ElementB const* ptr_L;  // (N, R), B's layout
    StrideB dL;
    int k_a;  // K of (A, B)
    int k_t;  // R of (T, L)
    uint32_t mma_promotion_interval = 4;
  };

  // Derives from the stock Params, so the inherited mma() (which takes Base::Params) accepts it.
  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_t;
    typename Base::Params::TMA_B tma_load_l;
    int k_a;
    int k_t;
    int k_tiles_a;
  };

  static int tiles_of(int k) { return (k + kBlkK - 1) / kBlkK; }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K_total, L] = cute::append<4>(problem_shape, 1);
    (void)K_total;
    typename Base::Arguments base_args{args.ptr_A, args.dA, args.ptr_B, args.dB, args.mma_promotion_interval};
    Params params{};
    static_cast<typename Base::Params&>(params) =
        Base::to_underlying_arguments(cute::make_shape(M, N, args.k_a, L), base_args, workspace);
    auto ptr_T = reinterpret_cast<InternalElementA const*>(args.ptr_T);
    auto ptr_L = reinterpret_cast<InternalElementB const*>(args.ptr_L);
    cute::Tensor tensor_t = cute::make_tensor(ptr_T, cute::make_layout(cute::make_shape(M, args.k_t, L), args.dT));
    cute::Tensor tensor_l = cute::make_tensor(ptr_L, cute::make_layout(cute::make_shape(N, args.k_t, L), args.dL));
    params.tma_load_t = cute::make_tma_copy_A_sm90(
        GmemTiledCopyA{}, tensor_t, SmemLayoutA{}(cute::_, cute::_, cute::Int<0>{}), TileShape{}, ClusterShape{});
    params.tma_load_l = cute::make_tma_copy_B_sm90(
        GmemTiledCopyB{}, tensor_l, SmemLayoutB{}(cute::_, cute::_, cute::Int<0>{}), TileShape{}, ClusterShape{});
    params.k_a = args.k_a;
    params.k_t = args.k_t;
    params.k_tiles_a = tiles_of(args.k_a);
    return params;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K_total, L] = cute::append<4>(problem_shape, 1);
    typename Base::Arguments base_args{args.ptr_A, args.dA, args.ptr_B, args.dB, args.mma_promotion_interval};
    if (args.k_a <= 0 || args.k_t <= 0) return false;
    // The kernel derives its tile count from K_total: it must be exactly the two walks.
    if (K_total != (tiles_of(args.k_a) + tiles_of(args.k_t)) * kBlkK) return false;
    constexpr int kMinElems = 128 / cutlass::sizeof_bits<ElementA>::value;  // 16-byte TMA strides
    if (args.k_t % kMinElems != 0 || args.k_a % kMinElems != 0) return false;
    return Base::can_implement(cute::make_shape(M, N, args.k_a, L), base_args);
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& params) {
    cute::prefetch_tma_descriptor(params.tma_load_a.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_b.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_t.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_load_l.get_tma_descriptor());
  }

  // get<0>/get<1>: coordinate tensors over the whole walk, (BLK, BLK_K, m|n, k_total, l); the kernel
  // only reads their shapes (tile counts). get<2..5>: the four sources, tiled the same way.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    using X = cute::Underscore;
    auto [M, N, K_total, L] = problem_shape_MNKL;
    auto tile = [](auto const& t, auto step) {
      return cute::local_tile(t, TileShape{}, cute::make_coord(cute::_, cute::_, cute::_), step);
    };
    auto mk = cute::Step<cute::_1, X, cute::_1>{};
    auto nk = cute::Step<X, cute::_1, cute::_1>{};
    auto g_walk_m = tile(params.tma_load_a.get_tma_tensor(cute::make_shape(M, K_total, L)), mk);
    auto g_walk_n = tile(params.tma_load_b.get_tma_tensor(cute::make_shape(N, K_total, L)), nk);
    auto gA = tile(params.tma_load_a.get_tma_tensor(cute::make_shape(M, params.k_a, L)), mk);
    auto gB = tile(params.tma_load_b.get_tma_tensor(cute::make_shape(N, params.k_a, L)), nk);
    auto gT = tile(params.tma_load_t.get_tma_tensor(cute::make_shape(M, params.k_t, L)), mk);
    auto gL = tile(params.tma_load_l.get_tma_tensor(cute::make_shape(N, params.k_t, L)), nk);
    return cute::make_tuple(g_walk_m, g_walk_n, gA, gB, gT, gL);
  }

  // Producer: one elected thread issues, per K tile of the walk, the A/B copies (tiles < k_tiles_a)
  // or the T/L copies (the rest) into the next free stage.
  template <class LoadInputs, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           LoadInputs const& load_inputs, BlockCoord const& blk_coord, KTileIterator k_tile_iter,
                           int k_tile_count, int thread_idx, uint32_t block_rank_in_cluster,
                           TensorStorage& shared_tensors) {
    (void)thread_idx;
    (void)block_rank_in_cluster;
    if (!cute::elect_one_sync()) return;
    cute::Tensor sA = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    cute::Tensor sB = cute::make_tensor(cute::make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord;
    (void)k_coord;
    cute::Tensor gA = cute::get<2>(load_inputs)(cute::_, cute::_, m_coord, cute::_, l_coord);  // (BLK_M,BLK_K,k)
    cute::Tensor gB = cute::get<3>(load_inputs)(cute::_, cute::_, n_coord, cute::_, l_coord);  // (BLK_N,BLK_K,k)
    cute::Tensor gT = cute::get<4>(load_inputs)(cute::_, cute::_, m_coord, cute::_, l_coord);
    cute::Tensor gL = cute::get<5>(load_inputs)(cute::_, cute::_, n_coord, cute::_, l_coord);
    auto cta_a = params.tma_load_a.get_slice(0);
    auto cta_b = params.tma_load_b.get_slice(0);
    auto cta_t = params.tma_load_t.get_slice(0);
    auto cta_l = params.tma_load_l.get_slice(0);
    cute::Tensor tAgA = cta_a.partition_S(gA);  // (TMA,TMA_M,TMA_K,k)
    cute::Tensor tAsA = cta_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE)
    cute::Tensor tBgB = cta_b.partition_S(gB);
    cute::Tensor tBsB = cta_b.partition_D(sB);
    cute::Tensor tTgT = cta_t.partition_S(gT);
    cute::Tensor tTsA = cta_t.partition_D(sA);
    cute::Tensor tLgL = cta_l.partition_S(gL);
    cute::Tensor tLsB = cta_l.partition_D(sB);
    const int k_tiles_a = params.k_tiles_a;
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.producer_acquire(smem_pipe_write);
      using BarrierType = typename MainloopPipeline::ProducerBarrierType;
      BarrierType* tma_barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k = *k_tile_iter;
      if (k < k_tiles_a) {
        cute::copy(params.tma_load_a.with(*tma_barrier, 0), tAgA(cute::_, cute::_, cute::_, k),
                   tAsA(cute::_, cute::_, cute::_, stage));
        cute::copy(params.tma_load_b.with(*tma_barrier, 0), tBgB(cute::_, cute::_, cute::_, k),
                   tBsB(cute::_, cute::_, cute::_, stage));
      } else {
        cute::copy(params.tma_load_t.with(*tma_barrier, 0), tTgT(cute::_, cute::_, cute::_, k - k_tiles_a),
                   tTsA(cute::_, cute::_, cute::_, stage));
        cute::copy(params.tma_load_l.with(*tma_barrier, 0), tLgL(cute::_, cute::_, cute::_, k - k_tiles_a),
                   tLsB(cute::_, cute::_, cute::_, stage));
      }
      ++k_tile_iter;
      ++smem_pipe_write;
    }
  }
};

}  // namespace lora_kernels
