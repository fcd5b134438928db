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
// accumulation), 128-row tiles. The FMA kernels remain for fp32.
#pragma once

constexpr int kThreads = 256;
constexpr int kTileC = 32;  // reduction slice per step (skinny: of C; expand: of J)
constexpr int kGroupsPerSlice = kTileC / 8;
constexpr int kExpandTile = 64;  // expand: rows and columns per block
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
  const int tid = threadIdx.x;
  const int ti = tid / 16, tj = tid % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * TJ;
  const int64_t JT = p.J + (p.ones_col ? 1 : 0);
  // Coalesce the tile loads along whichever index has unit stride.
  const bool x_c_fast = p.sxc == 1 || p.sxi != 1;
  const bool a_c_fast = p.sac == 1 || p.saj != 1;
  // Several column blocks recompute the same mask; only the first writes the bitmask. Splits over C
  // cover disjoint whole slices, so each writes the bits of its own columns.
  const bool write_bits = p.mask == SkinnyMask::kGenerate && p.bits_out != nullptr && blockIdx.y == 0;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * c_chunk;
  const int64_t c_end = c_begin + c_chunk < p.C ? c_begin + c_chunk : p.C;
  float* const out = p.out + static_cast<int64_t>(blockIdx.z) * out_zstride;

  float acc[RM][RN];
#pragma unroll
  for (int a = 0; a < RM; ++a)
#pragma unroll
    for (int q = 0; q < RN; ++q) acc[a][q] = 0.f;

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTileC) {
    if (p.mask == SkinnyMask::kGenerate) {
      // One Philox call per (row, group of 8 columns).
      for (int e = tid; e < TI * kGroupsPerSlice; e += kThreads) {
        const int ii = e / kGroupsPerSlice, gg = e % kGroupsPerSlice;
        const int64_t i = i0 + ii;
        const int64_t cb = c0 + 8 * gg;
        uint32_t keep = 0;
        if (i < p.R && cb < p.C) {
          const int64_t g = cb / 8;
          keep = dropout_keep_byte(p.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(g), p.threshold) &
                 valid_bits(p.C, g);
          if (write_bits) p.bits_out[i * p.ld_bits_out + g] = static_cast<uint8_t>(keep);
        }
#pragma unroll
        for (int e8 = 0; e8 < 8; ++e8) {
          float v = 0.f;
          if ((keep >> e8) & 1u) v = load_f32(p.x, i * p.sxi + (cb + e8) * p.sxc, p.xt) * p.keep_scale;
          xs[8 * gg + e8][ii] = v;
        }
      }
    } else {
      for (int e = tid; e < TI * kTileC; e += kThreads) {
        // c fast: a warp reads 8 consecutive c of 4 rows (32-byte runs per row) and its transposed
        // stores hit 32 distinct banks (SX ≡ 4 mod 32). i fast: 32 consecutive rows of one c.
        int ii, cc;
        if (x_c_fast) {
          const int chunk = e / 32, lane = e % 32;
          cc = (chunk % (kTileC / 8)) * 8 + lane % 8;
          ii = (chunk / (kTileC / 8)) * 4 + lane / 8;
        } else {
          cc = e / TI;
          ii = e % TI;
        }
        const int64_t i = i0 + ii, c = c0 + cc;
        float v = 0.f;
        if (i < p.R && c < p.C) {
          v = load_f32(p.x, i * p.sxi + c * p.sxc, p.xt);
          if (p.mask == SkinnyMask::kBitsTransposed) {
            const uint32_t bit = (p.bits_in[c * p.ld_bits_in + (i >> 3)] >> (i & 7)) & 1u;
            v = bit ? v * p.keep_scale : 0.f;
          }
        }
        xs[cc][ii] = v;
      }
    }
    for (int e = tid; e < TJ * kTileC; e += kThreads) {
      int jj, cc;
      if (a_c_fast) {
        const int chunk = e / 32, lane = e % 32;
        cc = (chunk % (kTileC / 8)) * 8 + lane % 8;
        jj = (chunk / (kTileC / 8)) * 4 + lane / 8;
      } else {
        cc = e / TJ;
        jj = e % TJ;
      }
      const int64_t j = j0 + jj, c = c0 + cc;
      float v = 0.f;
      if (c < p.C) {
        if (j < p.J) {
          v = load_f32(p.a, j * p.saj + c * p.sac, p.at);
        } else if (j == p.J && p.ones_col) {
          v = 1.f;
        }
      }
      as[cc][jj] = v;
    }
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
    const int64_t i = i0 + ti * RM + a;
    if (i >= p.R) continue;
#pragma unroll
    for (int q = 0; q < RN; ++q) {
      const int64_t j = j0 + tj * RN + q;
      if (j < JT) out[i * p.ldo + j] = p.alpha * acc[a][q];
    }
  }
}

// Tensor-core variant of skinny_kernel for 16-bit X (x or dY): the same contract and the same
// loads, but the slices are staged as E (X's dtype; A converted to it, as the Triton path does) and
// multiplied with WMMA 16×16×16 fragments, fp32 accumulation. At r = 64 the FMA kernel is bound by
// the CUDA cores (M·K·r FMAs ≈ 75 µs at M = 8192, K = 4096 on an H100), several times the time of
// reading x. Block tile 128 × TJ: warp w owns output rows [16w, 16w + 16) and all TJ columns
// (TJ/16 accumulator fragments). The dropout scale is applied once to the result (x is staged
// unscaled, so the kept values stay exact in E).
template <int TJ, typename E>
__global__ void __launch_bounds__(kThreads)
    skinny_mma_kernel(const SkinnyArgs p, const int64_t c_chunk, const int64_t out_zstride) {
  namespace wmma = nvcuda::wmma;
  static_assert(TJ == 16 || TJ == 32 || TJ == 64, "skinny column tile: 16, 32 or 64");
  constexpr int TI = kSkinnyMmaRows, NF = TJ / 16;
  constexpr int LDS = kTileC + 8;  // staged row length (elements): 80 bytes, fragment rows 32-byte aligned
  constexpr int LDC = TJ + 4;      // fp32 result rows (floats)
  constexpr int kStageBytes = (TI + TJ) * LDS * 2;
  constexpr int kResultBytes = TI * LDC * 4;
  // The staged operands and, after the last slice, the fp32 result share one buffer.
  __shared__ __align__(32) unsigned char smem[kStageBytes > kResultBytes ? kStageBytes : kResultBytes];
  E* const xs = reinterpret_cast<E*>(smem);  // xs[i * LDS + c]
  E* const as = xs + TI * LDS;               // as[j * LDS + c]
  float* const cs = reinterpret_cast<float*>(smem);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * TJ;
  const int64_t JT = p.J + (p.ones_col ? 1 : 0);
  const bool x_c_fast = p.sxc == 1 || p.sxi != 1;
  const bool a_c_fast = p.sac == 1 || p.saj != 1;
  const bool write_bits = p.mask == SkinnyMask::kGenerate && p.bits_out != nullptr && blockIdx.y == 0;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.z) * c_chunk;
  const int64_t c_end = c_begin + c_chunk < p.C ? c_begin + c_chunk : p.C;
  float* const out = p.out + static_cast<int64_t>(blockIdx.z) * out_zstride;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(acc[f], 0.f);

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTileC) {
    if (p.mask == SkinnyMask::kGenerate) {
      for (int e = tid; e < TI * kGroupsPerSlice; e += kThreads) {
        const int ii = e / kGroupsPerSlice, gg = e % kGroupsPerSlice;
        const int64_t i = i0 + ii;
        const int64_t cb = c0 + 8 * gg;
        uint32_t keep = 0;
        if (i < p.R && cb < p.C) {
          const int64_t g = cb / 8;
          keep = dropout_keep_byte(p.seed, static_cast<uint64_t>(i), static_cast<uint64_t>(g), p.threshold) &
                 valid_bits(p.C, g);
          if (write_bits) p.bits_out[i * p.ld_bits_out + g] = static_cast<uint8_t>(keep);
        }
#pragma unroll
        for (int e8 = 0; e8 < 8; ++e8) {
          float v = 0.f;
          if ((keep >> e8) & 1u) v = load_f32(p.x, i * p.sxi + (cb + e8) * p.sxc, p.xt);
          xs[ii * LDS + 8 * gg + e8] = static_cast<E>(v);
        }
      }
    } else {
      for (int e = tid; e < TI * kTileC; e += kThreads) {
        int ii, cc;
        if (x_c_fast) {  // 32 consecutive c of one row (64 bytes)
          ii = e / kTileC;
          cc = e % kTileC;
        } else {  // 32 consecutive rows of one c
          cc = e / TI;
          ii = e % TI;
        }
        const int64_t i = i0 + ii, c = c0 + cc;
        float v = 0.f;
        if (i < p.R && c < p.C) {
          v = load_f32(p.x, i * p.sxi + c * p.sxc, p.xt);
          if (p.mask == SkinnyMask::kBitsTransposed && !((p.bits_in[c * p.ld_bits_in + (i >> 3)] >> (i & 7)) & 1u)) {
            v = 0.f;
          }
        }
        xs[ii * LDS + cc] = static_cast<E>(v);  // x values are E already: exact
      }
    }
    for (int e = tid; e < TJ * kTileC; e += kThreads) {
      int jj, cc;
      if (a_c_fast) {
        jj = e / kTileC;
        cc = e % kTileC;
      } else {
        cc = e / TJ;
        jj = e % TJ;
      }
      const int64_t j = j0 + jj, c = c0 + cc;
      float v = 0.f;
      if (c < p.C) {
        if (j < p.J) {
          v = load_f32(p.a, j * p.saj + c * p.sac, p.at);
        } else if (j == p.J && p.ones_col) {
          v = 1.f;
        }
      }
      as[jj * LDS + cc] = static_cast<E>(v);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileC; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> af;
      wmma::load_matrix_sync(af, xs + warp * 16 * LDS + k, LDS);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        // B(k = c, n = j) = as[j * LDS + c]: column-major with leading dimension LDS.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, as + f * 16 * LDS + k, LDS);
        wmma::mma_sync(acc[f], af, bf, acc[f]);
      }
    }
    __syncthreads();
  }
  // The staging buffers are free now (the loop ended with a barrier): reuse them for the result.
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::store_matrix_sync(cs + warp * 16 * LDC + f * 16, acc[f], LDC, wmma::mem_row_major);
  __syncthreads();
  const float scale = p.alpha * (p.mask == SkinnyMask::kNone ? 1.f : p.keep_scale);
  for (int e = tid; e < TI * TJ; e += kThreads) {
    const int ii = e / TJ, jj = e % TJ;
    const int64_t i = i0 + ii, j = j0 + jj;
    if (i < p.R && j < JT) out[i * p.ldo + j] = scale * cs[ii * LDC + jj];
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

// Block (x, y) covers out rows [x·64, x·64 + 64) and columns [y·64, y·64 + 64); thread (ti, tn)
// owns rows ti·4 + [0, 4) and columns tn·4 + [0, 4).
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandArgs p) {
  constexpr int TI = kExpandTile, TN = kExpandTile, S = kExpandStride;
  __shared__ __align__(16) float ts[kTileC][S];  // ts[j][i]
  __shared__ __align__(16) float bs[kTileC][S];  // bs[j][n]
  const int tid = threadIdx.x;
  const int ti = tid / 16, tn = tid % 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TI;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * TN;
  const bool b_j_fast = p.sbj == 1 || p.sbn != 1;

  float acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[a][q] = 0.f;

  for (int64_t j0 = 0; j0 < p.J; j0 += kTileC) {
    const int jn = p.J - j0 < kTileC ? static_cast<int>(p.J - j0) : kTileC;  // no FMAs on padding
    for (int e = tid; e < TI * kTileC; e += kThreads) {
      // T is row-major with j contiguous: a warp reads 8 consecutive j of 4 rows.
      const int chunk = e / 32, lane = e % 32;
      const int jj = (chunk % (kTileC / 8)) * 8 + lane % 8;
      const int ii = (chunk / (kTileC / 8)) * 4 + lane / 8;
      const int64_t i = i0 + ii, j = j0 + jj;
      ts[jj][ii] = (i < p.R && j < p.J) ? p.t[i * p.ldt + j] : 0.f;
    }
    for (int e = tid; e < TN * kTileC; e += kThreads) {
      int nn, jj;
      if (b_j_fast) {
        const int chunk = e / 32, lane = e % 32;
        jj = (chunk % (kTileC / 8)) * 8 + lane % 8;
        nn = (chunk / (kTileC / 8)) * 4 + lane / 8;
      } else {
        jj = e / TN;
        nn = e % TN;
      }
      const int64_t n = n0 + nn, j = j0 + jj;
      bs[jj][nn] = (n < p.N && j < p.J) ? load_f32(p.b, n * p.sbn + j * p.sbj, p.bt) : 0.f;
    }
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
    if (i >= p.R) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = n0 + tn * 4 + q;
      if (n >= p.N) continue;
      float v = acc[a][q];
      if (p.v1 != nullptr) v += load_f32(p.v1, n * p.sv1, p.v1t);
      v *= p.alpha;
      if (p.v2 != nullptr) v += load_f32(p.v2, n * p.sv2, p.v2t);
      if (p.bits != nullptr) {
        const uint32_t bit = (p.bits[i * p.ld_bits + (n >> 3)] >> (n & 7)) & 1u;
        v = bit ? v * p.keep_scale : 0.f;
      }
      store_f32(p.out, i * p.ldo + n, p.ot, v);
    }
  }
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
  const int64_t j_v1 = p.v1 != nullptr ? p.J : -1;
  const int64_t j_v2 = p.v2 != nullptr ? p.J + (p.v1 != nullptr ? 1 : 0) : -1;
  float v = 0.f;
  if (is_t) {
    if (j < p.J) v = p.alpha * p.t[row * p.ldt + j];
    else if (j == j_v1 || j == j_v2) v = 1.f;
    store_f32(p.t_out, e, p.ot, v);
  } else {
    if (j < p.J) v = load_f32(p.b, row * p.sbn + j * p.sbj, p.bt);
    else if (j == j_v1) v = p.alpha * load_f32(p.v1, row * p.sv1, p.v1t);
    else if (j == j_v2) v = load_f32(p.v2, row * p.sv2, p.v2t);
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
