// Device code of the low-rank and dropout-mask kernels (see lowrank.h for the contracts), included
// by lowrank.cu inside its anonymous namespace. It is a header so that tests/cuda_emu/ can compile the
// very same kernels for the CPU (threads for a block, a barrier for __syncthreads) and check them
// against float64 in CI, where there is no GPU. Keep it free of host-only or launch code, except
// the plain inline planning functions shared by the real launcher and the emulation's.
//
// Tiling: 256 threads per block as 16 row groups × 16 column groups; each thread owns a register
// micro-tile of RM consecutive rows × RN consecutive columns, so that one shared-memory read feeds
// several FMAs. Both operands are staged in shared memory transposed ([c][i], as fp32, rows padded
// to a multiple of 4 floats: a thread's RM (or RN) values are one or two 16-byte loads). The
// low-rank products are < 1 % of the base GEMM's FLOPs at r = 16, so CUDA cores are enough if
// shared-memory reads do not dominate: the earlier 2 × 4 micro-tile with scalar reads issued 6 reads
// per 8 FMAs, and a fixed 64-column tile wasted 3/4 of them at r = 16 (about 6× the time of reading x).
//   skinny (out = X·Aᵀ, J = r or r + 1 columns): the column tile TJ follows J (16, 32 or 64), and the
//     row tile TI = 16·RM: 128 × 16 (RM 8, RN 1), 128 × 32 (8, 2), 64 × 64 (4, 4).
//   expand (out = T·Bᵀ, N columns, reduction over J): 64 × 64 tiles, 4 × 4 per thread, the reduction
//     loop bounded by J (no FMAs on padding).
// With 16-bit X (x or dY: every launch of a bf16/fp16 model), skinny_mma_kernel replaces the FMA
// skinny kernel: the same loads staged as 16-bit, WMMA 16×16×16 tensor-core products (fp32
// accumulation), 128-row tiles; likewise expand_mma_kernel for a 16-bit output. The FMA kernels
// remain for fp32.
#pragma once

constexpr int kThreads = 256;
constexpr int kTileC = 32;  // reduction slice per step (skinny: of C; expand: of J)
constexpr int kGroupsPerSlice = kTileC / 8;
constexpr int kExpandTile = 64;  // expand: rows and columns per block (FMA kernel), columns (MMA)
constexpr int kExpandMmaRows = 128;
constexpr int kExpandStride = kExpandTile + 4;

// The skinny tile for a given column count JT (see the comment at the top); the tensor-core
// variant (16-bit X) always uses 128 rows.
constexpr int kSkinnyMmaRows = 128;
inline int skinny_tile_cols(int64_t JT) { return JT <= 16 ? 16 : JT <= 32 ? 32 : 64; }
inline int skinny_tile_rows(int64_t JT, bool mma = false) { return mma || JT <= 32 ? 128 : 64; }

template <int TJ>
struct SkinnyTile {
  static_assert(TJ == 16 || TJ == 32 || TJ == 64, "skinny column tile: 16, 32 or 64");
  static constexpr int RN = TJ / 16;
  static constexpr int RM = TJ == 64 ? 4 : 8;
  static constexpr int TI = 16 * RM;
  static constexpr int SX = TI + 4;  // xs[c][·] stride (floats): 16-byte rows, ≡ 4 (mod 32)
  static constexpr int SA = TJ + 4;
};

// Split of the reduction dimension C over blockIdx.z. The backward reductions over M (dB: R = N,
// dAᵀ: R = K) have few (R, J) tiles, e.g. 32 blocks at N = 4096, r = 16, each walking all of M, and
// so does the forward's T at r ≤ 32 (64 blocks of 128 rows at M = 8192). Splitting C gives every SM
// work; the splits write fp32 partial sums to a
// (splits, R, JT) workspace that skinny_reduce_kernel adds in a fixed order (no atomics, so the
// result is the same run to run).
constexpr int64_t kSplitMinC = 512;  // ≥ 16 slices per split: the partials' round trip stays small
constexpr int64_t kMaxSplits = 64;   // bounds the workspace and the reduce's reads per output

struct SkinnySplit {
  int64_t splits;  // gridDim.z; 1: no split, the kernel writes out directly
  int64_t chunk;   // reduction columns per split: a multiple of kTileC when splits > 1
};

// Host-side plan, shared by lowrank.cu and tests/cuda_emu. Split only when the (x, y) grid covers
// less than 2 blocks per SM. A launch that generates the dropout mask splits too: every group of 8
// columns lies in exactly one split (chunks are whole slices), so each split writes the bits of its
// own columns and every bit is still written once. min_c (the fewest columns worth a split) is
// lowered by the emulation only, to exercise splits on small shapes.
inline SkinnySplit plan_skinny_split(int64_t R, int64_t JT, int64_t C, int num_sms, bool mma,
                                     int64_t min_c = kSplitMinC) {
  const SkinnySplit none{1, C};
  if (R <= 0 || JT <= 0 || C <= kTileC || num_sms <= 0) return none;
  const int64_t ti = skinny_tile_rows(JT, mma), tj = skinny_tile_cols(JT);
  const int64_t tiles = ((R + ti - 1) / ti) * ((JT + tj - 1) / tj);
  const int64_t target = 2 * static_cast<int64_t>(num_sms);
  if (tiles >= target) return none;
  int64_t s = (target + tiles - 1) / tiles;
  const int64_t by_c = (C + min_c - 1) / min_c;
  if (s > by_c) s = by_c;
  if (s > kMaxSplits) s = kMaxSplits;
  if (s <= 1) return none;
  // Whole slices per split, so no slice straddles two splits; recount as rounding up may leave fewer.
  const int64_t chunk = ((C + s - 1) / s + kTileC - 1) / kTileC * kTileC;
  s = (C + chunk - 1) / chunk;
  if (s <= 1) return none;
  return {s, chunk};
}

// How skinny_mma_kernel reads its X slices. kScalar: an element per load (any strides; see SliceRegs).
// kVecC / kVecI: 16-byte loads of 8 consecutive elements along c (x for the forward's T, dY for dT) or
// along i (dY for dB's and x for dAᵀ's reductions over M, which read them transposed), staged with
// 16-byte shared stores (see SliceVec). Per thread and slice: 2 loads instead of 16 (at 128 rows), and a
// warp's requests are whole 32-byte sectors. They need unit stride along the vector, the other stride a
// multiple of 8 elements and a 16-byte-aligned base, so that every vector (it starts at a multiple of
// 8) is aligned. Not kVecI with kGenerate: a Philox byte covers 8 columns c of one row i, and a vector
// along i would need 8 of them.
enum class XLoad : int { kScalar = 0, kVecC = 1, kVecI = 2 };
inline XLoad skinny_x_load(const SkinnyArgs& p) {
  if ((p.xt != kBF16 && p.xt != kF16) || reinterpret_cast<uintptr_t>(p.x) % 16 != 0) return XLoad::kScalar;
  if (p.sxc == 1 && p.sxi % 8 == 0) return XLoad::kVecC;
  if (p.sxi == 1 && p.sxc % 8 == 0 && p.mask != SkinnyMask::kGenerate) return XLoad::kVecI;
  return XLoad::kScalar;
}

// Uniform branch on the operand's runtime dtype: cheaper in code size than templating every
// kernel on 3 × 3 dtype combinations, and the loads are memory-bound anyway.
__device__ __forceinline__ float load_f32(const void* p, int64_t idx, DType t) {
  switch (t) {
    case kF16:
      return __half2float(static_cast<const __half*>(p)[idx]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[idx]);
    default:
      return static_cast<const float*>(p)[idx];
  }
}

__device__ __forceinline__ void store_f32(void* p, int64_t idx, DType t, float v) {
  switch (t) {
    case kF16:
      static_cast<__half*>(p)[idx] = __float2half_rn(v);
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(p)[idx] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(p)[idx] = v;
  }
}

// (row, column) of element e of a slice tile with `rows` rows and kTileC columns. c_fast (the
// operand's unit stride is along c): a warp takes 8 consecutive c of 4 rows, so global reads come in
// runs along c and the stores hit 32 distinct banks in both staging layouts below; else 32
// consecutive rows of one c.
struct SliceCoord {
  int i, c;
};
__device__ __forceinline__ SliceCoord slice_coord(int e, int rows, bool c_fast) {
  if (!c_fast) return {e % rows, e / rows};
  const int chunk = e / 32, lane = e % 32;
  return {(chunk / (kTileC / 8)) * 4 + lane / 8, (chunk % (kTileC / 8)) * 8 + lane % 8};
}

// Stages slice [c0, c0 + kTileC) of both skinny operands, for rows i0 + [0, Rows) of X and
// columns j0 + [0, Cols) of A: put_x(ii, cc, v) and put_a(jj, cc, v) store each value (0 outside
// the problem). X values are masked but not scaled: the kernels apply 1/(1 - p) to the result.
// Mask generation: one Philox call per (row, group of 8 columns), the bits written when write_bits.
template <int Rows, int Cols, class PutX, class PutA>
__device__ __forceinline__ void stage_skinny_slice(const SkinnyArgs& p, int64_t i0, int64_t j0, int64_t c0,
                                                   bool write_bits, PutX put_x, PutA put_a) {
  const int tid = threadIdx.x;
  if (p.mask == SkinnyMask::kGenerate) {
    for (int e = tid; e < Rows * kGroupsPerSlice; e += kThreads) {
      const int ii = e / kGroupsPerSlice, gg = e % kGroupsPerSlice;
      const int64_t i = i0 + ii, cb = c0 + 8 * gg;
      uint32_t keep = 0;
      if (i < p.R && cb < p.C) {
        const int64_t g = cb / 8;
        keep = dropout_keep_byte(p.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(g), p.threshold) &
               valid_bits(p.C, g);
        if (write_bits) p.bits_out[i * p.ld_bits_out + g] = static_cast<uint8_t>(keep);
      }
#pragma unroll
      for (int e8 = 0; e8 < 8; ++e8)
        put_x(ii, 8 * gg + e8, (keep >> e8) & 1u ? load_f32(p.x, i * p.sxi + (cb + e8) * p.sxc, p.xt) : 0.f);
    }
  } else {
    const bool c_fast = p.sxc == 1 || p.sxi != 1;
    for (int e = tid; e < Rows * kTileC; e += kThreads) {
      const SliceCoord sc = slice_coord(e, Rows, c_fast);
      const int64_t i = i0 + sc.i, c = c0 + sc.c;
      float v = 0.f;
      if (i < p.R && c < p.C) {
        v = load_f32(p.x, i * p.sxi + c * p.sxc, p.xt);
        if (p.mask == SkinnyMask::kBitsTransposed && !((p.bits_in[c * p.ld_bits_in + (i >> 3)] >> (i & 7)) & 1u)) {
          v = 0.f;
        }
      }
      put_x(sc.i, sc.c, v);
    }
  }
  const bool a_c_fast = p.sac == 1 || p.saj != 1;
  for (int e = tid; e < Cols * kTileC; e += kThreads) {
    const SliceCoord sc = slice_coord(e, Cols, a_c_fast);
    const int64_t j = j0 + sc.i, c = c0 + sc.c;
    float v = 0.f;
    if (c < p.C) {
      if (j < p.J) {
        v = load_f32(p.a, j * p.saj + c * p.sac, p.at);
      } else if (j == p.J && p.ones_col) {
        v = 1.f;  // the extra column of ones: its output is alpha · Σ_c X(i, c)
      }
    }
    put_a(sc.i, sc.c, v);
  }
}

// What both skinny kernels share around their slice loop: the block's place, the split's columns.
struct SkinnyBlock {
  int64_t i0, j0, JT, c_begin, c_end;
  bool write_bits;  // several column blocks recompute the mask; the first writes the bits (each
                    // split over C writes those of its own whole slices)
  float* out;
  float scale;  // alpha, times 1/(1 - p) when X is masked (the staged values are not scaled)
};
__device__ __forceinline__ SkinnyBlock skinny_block(const SkinnyArgs& p, int rows, int cols, int64_t c_chunk,
                                                   int64_t out_zstride) {
  SkinnyBlock b;
  b.i0 = static_cast<int64_t>(blockIdx.x) * rows;
  b.j0 = static_cast<int64_t>(blockIdx.y) * cols;
  b.JT = p.J + (p.ones_col ? 1 : 0);
  b.c_begin = static_cast<int64_t>(blockIdx.z) * c_chunk;
  b.c_end = b.c_begin + c_chunk < p.C ? b.c_begin + c_chunk : p.C;
  b.write_bits = p.mask == SkinnyMask::kGenerate && p.bits_out != nullptr && blockIdx.y == 0;
  b.out = p.out + static_cast<int64_t>(blockIdx.z) * out_zstride;
  b.scale = p.alpha * (p.mask == SkinnyMask::kNone ? 1.f : p.keep_scale);
  return b;
}

// Block z reduces the columns [z · c_chunk, min(C, (z + 1) · c_chunk)) and writes to
// p.out + z · out_zstride. Unsplit launches pass c_chunk = C (one z); split ones a multiple of
// kTileC, so every slice lies in one split and the c < p.C guards stay the only ones needed.
// Block (x, y) covers out rows [x·TI, x·TI + TI) and columns [y·TJ, y·TJ + TJ).
template <int TJ>
__global__ void __launch_bounds__(kThreads)
    skinny_kernel(const SkinnyArgs p, const int64_t c_chunk, const int64_t out_zstride) {
  using Tile = SkinnyTile<TJ>;
  constexpr int TI = Tile::TI, RM = Tile::RM, RN = Tile::RN, SX = Tile::SX, SA = Tile::SA;
  __shared__ __align__(16) float xs[kTileC][SX];  // xs[c][i]: the x slice, transposed
  __shared__ __align__(16) float as[kTileC][SA];  // as[c][j]
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;
  const SkinnyBlock blk = skinny_block(p, TI, TJ, c_chunk, out_zstride);

  float acc[RM][RN];
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int q = 0; q < RN; ++q) acc[a][q] = 0.f;

  for (int64_t c0 = blk.c_begin; c0 < blk.c_end; c0 += kTileC) {
    stage_skinny_slice<TI, TJ>(
        p, blk.i0, blk.j0, c0, blk.write_bits, [&](int ii, int cc, float v) { xs[cc][ii] = v; },
        [&](int jj, int cc, float v) { as[cc][jj] = v; });
    __syncthreads();
#pragma unroll 4
    for (int cc = 0; cc < kTileC; ++cc) {
      float xv[RM], av[RN];
#pragma unroll
      for (int a = 0; a < RM; ++a) xv[a] = xs[cc][ti * RM + a];  // contiguous: LDS.128 × RM/4
#pragma unroll
      for (int q = 0; q < RN; ++q) av[q] = as[cc][tj * RN + q];
#pragma unroll
      for (int a = 0; a < RM; ++a)
#pragma unroll
        for (int q = 0; q < RN; ++q) acc[a][q] = fmaf(xv[a], av[q], acc[a][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < RM; ++a) {
    const int64_t i = blk.i0 + ti * RM + a;
    if (i >= p.R) continue;
#pragma unroll
    for (int q = 0; q < RN; ++q) {
      const int64_t j = blk.j0 + tj * RN + q;
      if (j < blk.JT) blk.out[i * p.ldo + j] = blk.scale * acc[a][q];
    }
  }
}

// WMMA tile products shared by the tensor-core kernels: acc[f] += A(rows [16w, 16w + 16), k-steps)
// · B(k-steps, columns [16f, 16f + 16)), B staged row-major as E with LDS elements per row (B is
// staged by its n: column-major for WMMA), A likewise (ALayout row_major: a_rows[m * kMmaLds + k]) or
// by its k (col_major: a_rows[k * lda + m], SliceVec's kVecI staging).
constexpr int kMmaLds = kTileC + 8;  // staged row length (elements): 80 bytes, fragment rows 32-byte aligned
template <int NF, typename ALayout = nvcuda::wmma::row_major, typename E, typename Acc>
__device__ __forceinline__ void mma_slice(Acc (&acc)[NF], const E* a_rows, const E* b_cols, int ksteps,
                                          unsigned lda = kMmaLds) {
  namespace wmma = nvcuda::wmma;
  constexpr bool a_by_k = std::is_same<ALayout, wmma::col_major>::value;
  for (int k = 0; k < ksteps * 16; k += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, ALayout> af;
    wmma::load_matrix_sync(af, a_rows + (a_by_k ? k * lda : k), lda);
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bf;  // B(k, n) = b_cols[n * LDS + k]
      wmma::load_matrix_sync(bf, b_cols + f * 16 * kMmaLds + k, kMmaLds);
      wmma::mma_sync(acc[f], af, bf, acc[f]);
    }
  }
}
// Shared memory of a tensor-core kernel: the two operand tiles staged as E, Rows and Cols rows of
// kMmaLds elements; after the last slice the same bytes hold the fp32 result, Rows × kLdc.
template <int Rows, int Cols, typename E>
struct MmaSmem {
  static constexpr int kLdc = Cols + 4;  // result row length (floats): 16-byte multiple
  static constexpr int kStage = (Rows + Cols) * kMmaLds * 2, kResult = Rows * kLdc * 4;
  static constexpr int kBytes = kStage > kResult ? kStage : kResult;
  static __device__ __forceinline__ E* rows(unsigned char* smem) { return reinterpret_cast<E*>(smem); }
  static __device__ __forceinline__ E* cols(unsigned char* smem) { return rows(smem) + Rows * kMmaLds; }
  static __device__ __forceinline__ float* result(unsigned char* smem) { return reinterpret_cast<float*>(smem); }
};

// After the last slice (the loop ended with a barrier, so the staging bytes are free): each warp
// stores its accumulators (rows [16w, 16w + 16)) to the fp32 result, then every thread visits
// result elements, f(row, col, value), for the kernel's epilogue.
template <int Rows, int Cols, typename E, int NF, typename Acc, class F>
__device__ __forceinline__ void for_each_result(const Acc (&acc)[NF], unsigned char* smem, F f) {
  using Smem = MmaSmem<Rows, Cols, E>;
  float* const cs = Smem::result(smem);
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < NF; ++k)
    nvcuda::wmma::store_matrix_sync(cs + warp * 16 * Smem::kLdc + k * 16, acc[k], Smem::kLdc, nvcuda::wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < Rows * Cols; e += kThreads) f(e / Cols, e % Cols, cs[(e / Cols) * Smem::kLdc + e % Cols]);
}

// Element k (0, 1, …) of a thread's share of a slice tile of Rows rows and kTileC columns, as slice_coord maps
// element tid + k·kThreads: (il + di·k, cl + dc·k). c_fast: 8 consecutive columns of 4 rows per warp, the
// thread's column fixed; else 32 consecutive rows of one column, its row fixed. A base and a step, so that a
// thread's loads need one 64-bit address each rather than the registers of a coordinate pair per element.
struct SliceWalk {
  int il, cl, di, dc;
};
template <int Rows>
__device__ __forceinline__ SliceWalk slice_walk(bool c_fast) {
  static_assert(kThreads % Rows == 0 && (kThreads / 32) % kGroupsPerSlice == 0, "the mapping's period");
  const int tid = threadIdx.x;
  if (c_fast) {
    return {4 * ((tid / 32) / kGroupsPerSlice) + (tid % 32) / 8, ((tid / 32) % kGroupsPerSlice) * 8 + tid % 8,
            (kThreads / 32 / kGroupsPerSlice) * 4, 0};
  }
  return {tid % Rows, tid / Rows, 0, kThreads / Rows};
}

// v through an empty asm statement (no instruction), so the compiler cannot tell that the result equals v:
// what SliceRegs derives from a thread's walk (per-element offsets, bounds, mask-bit positions, shared
// addresses) is then computed where it is used, each slice. Those values do not depend on the slice, and
// LLVM's LICM hoisted them out of skinny_mma_kernel's slice loop (per X element: a 64-bit offset k·step, a
// 64-bit row and its bitmask byte index, a shared address), where they all stayed live: 188-235 registers
// at TJ = 32 and 64 (ptxas -v, sm_90a: one block per SM), and 176 at TJ = 16 too after an unrelated edit
// (whether LICM fired varied). With the walks opaque, and two elements per register: 56-84, no spills.
// The kGenerate load's coordinates (per 8-column group) stay visible: opaque, they cost spills at some TJ.
__device__ __forceinline__ int opaque(int v) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+r"(v));
#endif
  return v;
}
__device__ __forceinline__ SliceWalk opaque(const SliceWalk& w) {
  return {opaque(w.il), opaque(w.cl), opaque(w.di), opaque(w.dc)};
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// The bits of a 16-bit element and back: SliceRegs keeps two elements per 32-bit register.
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ void from_bits16(uint32_t b, __half& v) {
  v = __ushort_as_half(static_cast<unsigned short>(b));
}
__device__ __forceinline__ void from_bits16(uint32_t b, __nv_bfloat16& v) {
  v = __ushort_as_bfloat16(static_cast<unsigned short>(b));
}
// Element k of a packed array: the low half of pk[k / 2] for even k (put in order: an even k sets the word).
__device__ __forceinline__ uint32_t half_of(const uint32_t* pk, int k) {
  return (pk[k / 2] >> (16 * (k % 2))) & 0xFFFFu;
}
__device__ __forceinline__ void put_half(uint32_t* pk, int k, uint32_t b) {
  pk[k / 2] = k % 2 ? pk[k / 2] | b << 16 : b;
}

// 8 16-bit elements, element e in the low (even e) or high half of w[e / 2]: one 16-byte load or store.
struct alignas(16) Vec16 {
  uint32_t w[4];
};
__device__ __forceinline__ Vec16 load_vec16(const void* ptr) {
#ifdef LORA_KERNELS_EMU
  return emu_load16<Vec16>(ptr);  // checks the alignment a GPU would fault on
#else
  return *static_cast<const Vec16*>(ptr);
#endif
}
__device__ __forceinline__ void store_vec16(void* ptr, const Vec16& v) {
#ifdef LORA_KERNELS_EMU
  emu_store16(ptr, v);
#else
  *static_cast<Vec16*>(ptr) = v;
#endif
}
// The n first elements at ptr (unit stride), zeros after them: one vector load when all 8 are in.
template <typename E>
__device__ __forceinline__ Vec16 load_vec16_first(const E* ptr, int64_t n) {
  if (n >= 8) return load_vec16(ptr);
  Vec16 v{};
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if (e < n) put_half(v.w, e, bits16(ptr[e]));
  return v;
}
// v with element e zeroed where bit e of byte is 0.
__device__ __forceinline__ Vec16 keep_vec16(Vec16 v, uint32_t byte) {
#pragma unroll
  for (int q = 0; q < 4; ++q) v.w[q] &= ((byte >> (2 * q)) & 1u ? 0xFFFFu : 0u) | ((byte >> (2 * q + 1)) & 1u ? 0xFFFF0000u : 0u);
  return v;
}

// A's share of a slice (Cols rows j, kTileC columns c) as E's bits, packed (see SliceRegs), its dtype T known:
// one loop per dtype rather than a dtype switch per element, which kept every branch's loads and addresses
// live at once. Rounded to E here rather than at the store: the same rounding of the same fp32 value.
template <int N, typename T, typename E>
__device__ __forceinline__ void load_a_share(const SkinnyArgs& p, const SliceWalk& w, int64_t j, int64_t c,
                                             uint32_t (&a)[N / 2]) {
  const T* const first = static_cast<const T*>(p.a) + j * p.saj + c * p.sac;
  const int64_t step = w.di * p.saj + w.dc * p.sac;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const bool in = j + w.di * k < p.J && c + w.dc * k < p.C;
    const bool one = p.ones_col && j + w.di * k == p.J && c + w.dc * k < p.C;  // the extra column of ones
    put_half(a, k, bits16(static_cast<E>(in ? to_f32(first[k * step]) : one ? 1.f : 0.f)));
  }
}

// One thread's share of A's slice (Cols rows j, kTileC columns c) in registers, as E's bits, two per 32-bit
// register: loaded with the X share (SliceRegs, SliceVec), stored to as[j * kMmaLds + c] with it.
template <int Cols, typename E>
struct SliceA {
  static_assert(Cols * kTileC % kThreads == 0, "whole shares");
  static constexpr int kA = Cols * kTileC / kThreads;  // A elements per thread
  static_assert(kA % 2 == 0, "pairs");
  uint32_t a[kA / 2];

  __device__ __forceinline__ void load(const SkinnyArgs& p, int64_t j0, int64_t c0) {
    const SliceWalk wa = opaque(slice_walk<Cols>(p.sac == 1 || p.saj != 1));
    const int64_t j = j0 + wa.il, c = c0 + wa.cl;
    if (p.at == kF32) {
      load_a_share<kA, float, E>(p, wa, j, c, a);
    } else if (p.at == kBF16) {
      load_a_share<kA, __nv_bfloat16, E>(p, wa, j, c, a);
    } else {
      load_a_share<kA, __half, E>(p, wa, j, c, a);
    }
  }
  __device__ __forceinline__ void store(const SkinnyArgs& p, E* as) const {
    const SliceWalk wa = opaque(slice_walk<Cols>(p.sac == 1 || p.saj != 1));
    E* const afirst = as + wa.il * kMmaLds + wa.cl;
#pragma unroll
    for (int k = 0; k < kA; ++k) from_bits16(half_of(a, k), afirst[k * (wa.di * kMmaLds + wa.dc)]);
  }
};

// One thread's share of a skinny slice, held in registers between the loads and the shared-memory stores
// (the tensor-core kernel: X is E, its own 16-bit dtype, so no conversion). stage_skinny_slice waited on
// each load before the next (a load's value went to shared memory at once): at 8192 × 4096, r = 16 on an
// H200 one launch took ~300 µs for 64 MB of x, 27 % of the SMs busy (bench/NOTES.md, session 28), about
// one load latency per element a thread stages. Here every load of a slice is issued before any value is
// used, and the kernel loads slice c0 + kTileC before the MMA of slice c0, so the loads wait behind it.
// The same values as stage_skinny_slice (same element-to-thread mapping, same masks and bounds). Elements
// are held as bits, two per 32-bit register (as E, each took a register of its own), A already rounded to E.
template <int Rows, int Cols, typename E>
struct SliceRegs {
  static_assert(Rows * kTileC % kThreads == 0 && Rows * kGroupsPerSlice % kThreads == 0, "whole shares");
  static constexpr int kX = Rows * kTileC / kThreads;                   // X elements per thread
  static constexpr int kGroups = Rows * kGroupsPerSlice / kThreads;     // kGenerate: 8-column groups
  static_assert(kX <= 32 && kX == 8 * kGroups, "keep holds a bit per X element");
  uint32_t x[kX / 2];  // element k: half_of(x, k)
  uint32_t keep;       // bit k: x element k is kept (a zero bit: out of bounds, or dropped by the mask)
  SliceA<Cols, E> a;

  __device__ __forceinline__ void load(const SkinnyArgs& p, int64_t i0, int64_t j0, int64_t c0, bool write_bits) {
    const E* const xp = static_cast<const E*>(p.x);
    keep = 0;
    if (p.mask == SkinnyMask::kGenerate) {
      // Group g of this thread: row tid / kGroupsPerSlice + g · (kThreads / kGroupsPerSlice), its column group fixed.
      const int tid = threadIdx.x;
      const int64_t cb = c0 + 8 * (tid % kGroupsPerSlice), grp = cb / 8;
      const int64_t ib = i0 + tid / kGroupsPerSlice;
      const E* const row0 = xp + ib * p.sxi + cb * p.sxc;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int64_t i = ib + g * (kThreads / kGroupsPerSlice);
        uint32_t byte = 0;
        if (i < p.R && cb < p.C) {
          byte = dropout_keep_byte(p.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(grp), p.threshold) &
                 valid_bits(p.C, grp);
          if (write_bits) p.bits_out[i * p.ld_bits_out + grp] = static_cast<uint8_t>(byte);
        }
        keep |= byte << (8 * g);
        const E* const row = row0 + g * (kThreads / kGroupsPerSlice) * p.sxi;
#pragma unroll
        for (int e8 = 0; e8 < 8; ++e8) put_half(x, 8 * g + e8, (byte >> e8) & 1u ? bits16(row[e8 * p.sxc]) : 0u);
      }
    } else {
      const SliceWalk w = opaque(slice_walk<Rows>(p.sxc == 1 || p.sxi != 1));
      const int64_t i = i0 + w.il, c = c0 + w.cl, step = w.di * p.sxi + w.dc * p.sxc;
      const E* const first = xp + i * p.sxi + c * p.sxc;
#pragma unroll
      for (int k = 0; k < kX; ++k) {
        const bool in = i + w.di * k < p.R && c + w.dc * k < p.C;
        put_half(x, k, in ? bits16(first[k * step]) : 0u);
        uint32_t bit = in ? 1u : 0u;
        if (in && p.mask == SkinnyMask::kBitsTransposed) {
          const int64_t ik = i + w.di * k;
          bit = (p.bits_in[(c + w.dc * k) * p.ld_bits_in + (ik >> 3)] >> (ik & 7)) & 1u;
        }
        keep |= bit << k;
      }
    }
    a.load(p, j0, c0);
  }

  // Into the kernel's shared tiles: xs[i * LDS + c] and as[j * LDS + c] (see skinny_mma_kernel).
  __device__ __forceinline__ void store(const SkinnyArgs& p, E* xs, E* as) const {
    if (p.mask == SkinnyMask::kGenerate) {
      const int tid = opaque(static_cast<int>(threadIdx.x));
      E* const row0 = xs + (tid / kGroupsPerSlice) * kMmaLds + 8 * (tid % kGroupsPerSlice);
#pragma unroll
      for (int g = 0; g < kGroups; ++g)
#pragma unroll
        for (int e8 = 0; e8 < 8; ++e8)
          from_bits16(half_of(x, 8 * g + e8), row0[g * (kThreads / kGroupsPerSlice) * kMmaLds + e8]);
    } else {
      const SliceWalk w = opaque(slice_walk<Rows>(p.sxc == 1 || p.sxi != 1));
      E* const first = xs + w.il * kMmaLds + w.cl;
      const int step = w.di * kMmaLds + w.dc;
#pragma unroll
      for (int k = 0; k < kX; ++k) from_bits16((keep >> k) & 1u ? half_of(x, k) : 0u, first[k * step]);
    }
    a.store(p, as);
  }
};

// SliceRegs for X loaded as 16-byte vectors (skinny_x_load: kVecC, kVecI): 2 vectors per thread at 128
// rows, each held as loaded, the keep bits applied as it is stored. Masks, bounds and values as
// SliceRegs (a partial vector at the edge is loaded an element at a time, zeros past it).
//   kVecC: vector g of a thread is row tid / 4 + 64·g, columns c0 + 8·(tid % 4) + [0, 8) (the kGenerate
//     mapping of SliceRegs: a Philox byte per vector), staged as SliceRegs stages it, xs[i * kMmaLds + c].
//   kVecI: rows i0 + 8·(tid % 16) + [0, 8) of column c0 + tid / 16 + 16·g, staged by column,
//     xs[c * kLdI + i] (A col_major for the WMMA): a quarter warp's stores fill 128 contiguous bytes.
template <int Rows, int Cols, typename E, XLoad L>
struct SliceVec {
  static_assert(L == XLoad::kVecC || L == XLoad::kVecI, "a vector layout");
  static_assert(Rows == kSkinnyMmaRows && Rows * kTileC % (8 * kThreads) == 0 &&
                kThreads % (Rows / 8) == 0 && kThreads % kGroupsPerSlice == 0, "whole vectors per thread");
  static constexpr int kV = Rows * kTileC / (8 * kThreads);  // vectors per thread
  static constexpr int kLdI = Rows + 8;  // kVecI's staged column length: 272 bytes, ≡ 16 (mod 128)
  static_assert(kV <= 4 && kTileC * kLdI <= Rows * kMmaLds, "keep holds 8 bits per vector; kVecI's staging fits");
  Vec16 x[kV];
  uint32_t keep;  // byte g: vector g's elements kept (a zero bit: out of bounds, or dropped by the mask)
  SliceA<Cols, E> a;

  __device__ __forceinline__ void load(const SkinnyArgs& p, int64_t i0, int64_t j0, int64_t c0, bool write_bits) {
    const E* const xp = static_cast<const E*>(p.x);
    const int tid = threadIdx.x;
    keep = 0;
    if constexpr (L == XLoad::kVecC) {
      const int64_t cb = c0 + 8 * (tid % kGroupsPerSlice), grp = cb / 8;
      const int64_t ib = i0 + tid / kGroupsPerSlice;
#pragma unroll
      for (int g = 0; g < kV; ++g) {
        const int64_t i = ib + g * (kThreads / kGroupsPerSlice);
        const bool in = i < p.R && cb < p.C;
        x[g] = in ? load_vec16_first(xp + i * p.sxi + cb, p.C - cb) : Vec16{};
        uint32_t byte = in ? valid_bits(p.C, grp) : 0u;
        if (in && p.mask == SkinnyMask::kGenerate) {
          byte &= dropout_keep_byte(p.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(grp), p.threshold);
          if (write_bits) p.bits_out[i * p.ld_bits_out + grp] = static_cast<uint8_t>(byte);
        } else if (in && p.mask == SkinnyMask::kBitsTransposed) {
          uint32_t b = 0;  // bit e: mask (c = cb + e, i), a byte per column
#pragma unroll
          for (int e = 0; e < 8; ++e)
            if (cb + e < p.C) b |= ((p.bits_in[(cb + e) * p.ld_bits_in + (i >> 3)] >> (i & 7)) & 1u) << e;
          byte &= b;
        }
        keep |= byte << (8 * g);
      }
    } else {
      const int64_t ib = i0 + 8 * (tid % (Rows / 8));
      const int64_t cf = c0 + tid / (Rows / 8);
#pragma unroll
      for (int g = 0; g < kV; ++g) {
        const int64_t c = cf + g * (kThreads / (Rows / 8));
        const bool in = ib < p.R && c < p.C;
        x[g] = in ? load_vec16_first(xp + c * p.sxc + ib, p.R - ib) : Vec16{};
        uint32_t byte = in ? valid_bits(p.R, ib / 8) : 0u;
        if (in && p.mask == SkinnyMask::kBitsTransposed) byte &= p.bits_in[c * p.ld_bits_in + (ib >> 3)];
        keep |= byte << (8 * g);
      }
    }
    a.load(p, j0, c0);
  }

  // xs: SliceRegs' layout (kVecC) or xs[c * kLdI + i] (kVecI); as as SliceRegs.
  __device__ __forceinline__ void store(const SkinnyArgs& p, E* xs, E* as) const {
    const int tid = threadIdx.x;
#pragma unroll
    for (int g = 0; g < kV; ++g) {
      E* const dst = L == XLoad::kVecC
                         ? xs + (tid / kGroupsPerSlice + g * (kThreads / kGroupsPerSlice)) * kMmaLds +
                               8 * (tid % kGroupsPerSlice)
                         : xs + (tid / (Rows / 8) + g * (kThreads / (Rows / 8))) * kLdI + 8 * (tid % (Rows / 8));
      store_vec16(dst, keep_vec16(x[g], keep >> (8 * g)));
    }
    a.store(p, as);
  }
};

// Tensor-core variant of skinny_kernel for 16-bit X (x or dY): the same contract and the same
// staging, but as E (X's dtype; A converted to it, as the Triton path does) and multiplied with WMMA
// 16×16×16 fragments, fp32 accumulation. At r = 64 the FMA kernel is bound by the CUDA cores
// (M·K·r FMAs ≈ 75 µs at M = 8192, K = 4096 on an H100), several times the time of reading x. Block
// tile 128 × TJ: warp w owns output rows [16w, 16w + 16) and all TJ columns (TJ/16 fragments).
// X values are exact in E (they are E already and staged unscaled).
// L (skinny_x_load) picks how X is loaded and staged: SliceRegs (any strides) or SliceVec.
template <int TJ, typename E, XLoad L>
__global__ void __launch_bounds__(kThreads)
    skinny_mma_kernel(const SkinnyArgs p, const int64_t c_chunk, const int64_t out_zstride) {
  static_assert(TJ == 16 || TJ == 32 || TJ == 64, "skinny column tile: 16, 32 or 64");
  constexpr int TI = kSkinnyMmaRows, NF = TJ / 16, LDS = kMmaLds;
  using Smem = MmaSmem<TI, TJ, E>;
  using Regs = std::conditional_t<L == XLoad::kScalar, SliceRegs<TI, TJ, E>, SliceVec<TI, TJ, E, L>>;
  __shared__ __align__(32) unsigned char smem[Smem::kBytes];
  E* const xs = Smem::rows(smem);  // xs[i * LDS + c], or xs[c * kLdI + i] for kVecI
  E* const as = Smem::cols(smem);  // as[j * LDS + c]
  const int warp = threadIdx.x / 32;
  const SkinnyBlock blk = skinny_block(p, TI, TJ, c_chunk, out_zstride);

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);

  // Registers carry a slice from its loads to its stores: slice c0 + kTileC loads while slice c0 multiplies.
  Regs regs;
  if (blk.c_begin < blk.c_end) regs.load(p, blk.i0, blk.j0, blk.c_begin, blk.write_bits);
  for (int64_t c0 = blk.c_begin; c0 < blk.c_end; c0 += kTileC) {
    regs.store(p, xs, as);
    __syncthreads();
    if (c0 + kTileC < blk.c_end) regs.load(p, blk.i0, blk.j0, c0 + kTileC, blk.write_bits);
    if constexpr (L == XLoad::kVecI) {
      mma_slice<NF, nvcuda::wmma::col_major>(acc, xs + warp * 16, as, kTileC / 16, Regs::kLdI);
    } else {
      mma_slice<NF>(acc, xs + warp * 16 * LDS, as, kTileC / 16);
    }
    __syncthreads();
  }
  for_each_result<TI, TJ, E>(acc, smem, [&](int ii, int jj, float v) {
    const int64_t i = blk.i0 + ii, j = blk.j0 + jj;
    if (i < p.R && j < blk.JT) blk.out[i * p.ldo + j] = blk.scale * v;
  });
}

// The skinny kernel of a launch with column tile TJ (skinny_tile_cols): for 16-bit X the tensor-core
// kernel with the loads skinny_x_load picks, else the FMA kernel. Host code: the launcher (lowrank.cu)
// and the emulation's (tests/cuda_emu) call the same pointer, so both run the same choice.
using SkinnyKernelFn = void (*)(SkinnyArgs, int64_t, int64_t);
template <int TJ, typename E>
inline SkinnyKernelFn skinny_mma_kernel_for(XLoad l) {
  return l == XLoad::kVecC   ? &skinny_mma_kernel<TJ, E, XLoad::kVecC>
         : l == XLoad::kVecI ? &skinny_mma_kernel<TJ, E, XLoad::kVecI>
                             : &skinny_mma_kernel<TJ, E, XLoad::kScalar>;
}
template <int TJ>
inline SkinnyKernelFn skinny_kernel_tj(const SkinnyArgs& a, XLoad l) {
  if (a.xt == kBF16) return skinny_mma_kernel_for<TJ, __nv_bfloat16>(l);
  if (a.xt == kF16) return skinny_mma_kernel_for<TJ, __half>(l);
  return &skinny_kernel<TJ>;
}
// vec_loads = false: the scalar loads even where vectors apply (LORA_KERNELS_CUDA_VEC_LOADS=0, an A/B).
inline SkinnyKernelFn skinny_kernel_for(const SkinnyArgs& a, bool vec_loads = true) {
  const XLoad l = vec_loads ? skinny_x_load(a) : XLoad::kScalar;
  switch (skinny_tile_cols(a.J + (a.ones_col ? 1 : 0))) {
    case 16:
      return skinny_kernel_tj<16>(a, l);
    case 32:
      return skinny_kernel_tj<32>(a, l);
    default:
      return skinny_kernel_tj<64>(a, l);
  }
}

// Second pass of a split launch: out[i, j] = alpha · Σ_z ws[z, i, j] with z = 0, 1, … in order, so
// the sum does not depend on which split finished first. ws is (splits, R, JT) contiguous; the
// splits ran with alpha = 1, so alpha is applied once, after the sum, as in an unsplit launch.
__global__ void __launch_bounds__(kThreads) skinny_reduce_kernel(const float* ws, int64_t splits, int64_t R,
                                                                 int64_t JT, float alpha, float* out,
                                                                 int64_t ldo) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n = R * JT;
  if (idx >= n) return;
  float v = 0.f;
  for (int64_t z = 0; z < splits; ++z) v += ws[z * n + idx];
  out[(idx / JT) * ldo + idx % JT] = alpha * v;
}

// Stages slice [j0, j0 + kTileC) of T (rows i0 + [0, Rows)) and of B (columns n0 + [0, kExpandTile))
// through put_t(ii, jj, v) and put_b(nn, jj, v), 0 outside the problem.
template <int Rows, class PutT, class PutB>
__device__ __forceinline__ void stage_expand_slice(const ExpandArgs& p, int64_t i0, int64_t n0, int64_t j0,
                                                   PutT put_t, PutB put_b) {
  for (int e = threadIdx.x; e < Rows * kTileC; e += kThreads) {
    const SliceCoord sc = slice_coord(e, Rows, true);  // T is row-major: j contiguous
    const int64_t i = i0 + sc.i, j = j0 + sc.c;
    put_t(sc.i, sc.c, (i < p.R && j < p.J) ? p.op.t[i * p.op.ldt + j] : 0.f);
  }
  const bool b_j_fast = p.op.sbj == 1 || p.op.sbn != 1;
  for (int e = threadIdx.x; e < kExpandTile * kTileC; e += kThreads) {
    const SliceCoord sc = slice_coord(e, kExpandTile, b_j_fast);
    const int64_t n = n0 + sc.i, j = j0 + sc.c;
    put_b(sc.i, sc.c, (n < p.N && j < p.J) ? load_f32(p.op.b, n * p.op.sbn + j * p.op.sbj, p.op.bt) : 0.f);
  }
}

// out[i, n] = (alpha · (v + v1[n]) + v2[n]) · mask(i, n): the expand kernels' epilogue.
__device__ __forceinline__ void expand_store(const ExpandArgs& p, int64_t i, int64_t n, float v) {
  if (p.op.v1 != nullptr) v += load_f32(p.op.v1, n * p.op.sv1, p.op.v1t);
  v *= p.alpha;
  if (p.op.v2 != nullptr) v += load_f32(p.op.v2, n * p.op.sv2, p.op.v2t);
  if (p.bits != nullptr) {
    const uint32_t bit = (p.bits[i * p.ld_bits + (n >> 3)] >> (n & 7)) & 1u;
    v = bit ? v * p.keep_scale : 0.f;
  }
  store_f32(p.out, i * p.ldo + n, p.ot, v);
}

// Block (x, y) covers out rows [x·64, x·64 + 64) and columns [y·64, y·64 + 64); thread (ti, tn)
// owns rows ti·4 + [0, 4) and columns tn·4 + [0, 4).
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandArgs p) {
  constexpr int TI = kExpandTile, S = kExpandStride;
  __shared__ __align__(16) float ts[kTileC][S];  // ts[j][i]
  __shared__ __align__(16) float bs[kTileC][S];  // bs[j][n]
  const int ti = threadIdx.x / 16, tn = threadIdx.x % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kExpandTile;

  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[a][q] = 0.f;

  for (int64_t j0 = 0; j0 < p.J; j0 += kTileC) {
    const int jn = p.J - j0 < kTileC ? static_cast<int>(p.J - j0) : kTileC;  // no FMAs on padding
    stage_expand_slice<TI>(
        p, i0, n0, j0, [&](int ii, int jj, float v) { ts[jj][ii] = v; }, [&](int nn, int jj, float v) { bs[jj][nn] = v; });
    __syncthreads();
    for (int jj = 0; jj < jn; ++jj) {
      float tv[4], bv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) tv[a] = ts[jj][ti * 4 + a];
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = bs[jj][tn * 4 + q];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[a][q] = fmaf(tv[a], bv[q], acc[a][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = i0 + ti * 4 + a;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = n0 + tn * 4 + q;
      if (i < p.R && n < p.N) expand_store(p, i, n, acc[a][q]);
    }
  }
}

// Tensor-core variant of expand_kernel for a 16-bit output (its dtype E): T and B staged as E (T
// rounded, as the Triton epilogues round s·T and dT), WMMA 16×16×16 with fp32 accumulation, then
// the same epilogue. 128 × 64 tiles: warp w owns rows [16w, 16w + 16) and the 64 columns.
template <typename E>
__global__ void __launch_bounds__(kThreads) expand_mma_kernel(const ExpandArgs p) {
  constexpr int TI = kExpandMmaRows, TN = kExpandTile, NF = TN / 16, LDS = kMmaLds;
  using Smem = MmaSmem<TI, TN, E>;
  __shared__ __align__(32) unsigned char smem[Smem::kBytes];
  E* const ts = Smem::rows(smem);  // ts[i * LDS + j]
  E* const bs = Smem::cols(smem);  // bs[n * LDS + j]
  const int warp = threadIdx.x / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);

  for (int64_t j0 = 0; j0 < p.J; j0 += kTileC) {
    stage_expand_slice<TI>(
        p, i0, n0, j0, [&](int ii, int jj, float v) { ts[ii * LDS + jj] = static_cast<E>(v); },
        [&](int nn, int jj, float v) { bs[nn * LDS + jj] = static_cast<E>(v); });
    __syncthreads();
    // k-steps of 16 up to J only: at r = 16 the second half of the slice is padding.
    mma_slice<NF>(acc, ts + warp * 16 * LDS, bs, p.J - j0 >= kTileC ? kTileC / 16 : static_cast<int>((p.J - j0 + 15) / 16));
    __syncthreads();
  }
  for_each_result<TI, TN, E>(acc, smem, [&](int ii, int nn, float v) {
    const int64_t i = i0 + ii, n = n0 + nn;
    if (i < p.R && n < p.N) expand_store(p, i, n, v);
  });
}

// One thread per element of t_out (the first M·R indices) and l_out (the next N·R); see PackArgs.
// Consecutive threads write consecutive addresses in either layout of l_out.
__global__ void __launch_bounds__(kThreads) pack_concat_kernel(const PackArgs p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nt = p.M * p.R;
  if (idx >= nt + p.N * p.R) return;
  const bool is_t = idx < nt;
  const int64_t e = is_t ? idx : idx - nt;
  const bool by_rank = !is_t && p.l_by_rank;
  const int64_t row = by_rank ? e % p.N : e / p.R, j = by_rank ? e / p.N : e % p.R;
  // Columns past J: the lora_bias column (if any), then the bias column (if any), then zeros.
  const int64_t j_v1 = p.op.v1 != nullptr ? p.J : -1;
  const int64_t j_v2 = p.op.v2 != nullptr ? p.J + (p.op.v1 != nullptr ? 1 : 0) : -1;
  float v = 0.f;
  if (is_t) {
    if (j < p.J) v = p.alpha * p.op.t[row * p.op.ldt + j];
    else if (j == j_v1 || j == j_v2) v = 1.f;
    store_f32(p.t_out, e, p.ot, v);
  } else {
    if (j < p.J) v = load_f32(p.op.b, row * p.op.sbn + j * p.op.sbj, p.op.bt);
    else if (j == j_v1) v = p.alpha * load_f32(p.op.v1, row * p.op.sv1, p.op.v1t);
    else if (j == j_v2) v = load_f32(p.op.v2, row * p.op.sv2, p.op.v2t);
    store_f32(p.l_out, e, p.ot, v);
  }
}

__global__ void make_mask_kernel(uint64_t seed, uint32_t threshold, int64_t M, int64_t K, int64_t G,
                                 uint8_t* bits) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * G) return;
  const int64_t m = idx / G, g = idx % G;
  bits[idx] = static_cast<uint8_t>(
      dropout_keep_byte(seed, static_cast<uint64_t>(m), static_cast<uint64_t>(g), threshold) & valid_bits(K, g));
}
