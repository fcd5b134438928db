// Host emulation of the subset of CUDA's WMMA API (mma.h) that csrc/lowrank_kernels.cuh uses, for
// tests/cuda_emu/harness.cpp. WMMA calls are warp-collective with identical arguments in every lane,
// so each emulated thread holds the whole 16×16 tile and computes it in full; only lane 0 stores.
// The real API's preconditions are checked (pointers 256-bit aligned, ldm a multiple of 16 bytes),
// because a kernel that breaks them gives undefined results on a GPU but would pass here.
#pragma once

#include <cstdint>
#include <cstdio>
#include <type_traits>

void wmma_emu_fail(const char* what);  // defined by the harness: counts a failure
bool wmma_emu_lane0();                 // defined by the harness: threadIdx.x % 32 == 0

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float v[16][16];  // matrix_a: (m, k); matrix_b: (k, n); accumulator: (m, n)
};

inline void check_ptr(const void* p, unsigned ldm, unsigned elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) wmma_emu_fail("wmma: pointer not 256-bit aligned");
  if ((ldm * elem_bytes) % 16 != 0) wmma_emu_fail("wmma: ldm not a multiple of 16 bytes");
}

// matrix_a holds (m, k) and matrix_b (k, n): element (a, b) of the fragment is at p[a·ldm + b]
// (row_major) or p[b·ldm + a] (col_major) either way.
template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(T));
  for (int a = 0; a < 16; ++a)
    for (int b = 0; b < 16; ++b)
      f.v[a][b] = static_cast<float>(std::is_same_v<L, row_major> ? p[a * ldm + b] : p[b * ldm + a]);
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float x) {
  for (auto& row : f.v)
    for (float& e : row) e = x;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) {
      float acc = c.v[i][n];
      for (int k = 0; k < 16; ++k) acc += a.v[i][k] * b.v[k][n];  // 16-bit inputs: products exact in fp32
      r[i][n] = acc;
    }
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) d.v[i][n] = r[i][n];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_ptr(p, ldm, sizeof(float));
  if (!::wmma_emu_lane0()) return;
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) (layout == mem_row_major ? p[i * ldm + n] : p[n * ldm + i]) = f.v[i][n];
}

}  // namespace wmma
}  // namespace nvcuda
