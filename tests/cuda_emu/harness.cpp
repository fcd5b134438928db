// CPU emulation of the CUDA backend's low-rank and dropout-mask kernels (csrc/lowrank_kernels.cuh),
// run by tests/test_cuda_emulation.py where there is no GPU.
//
// The device code is compiled for the host as it is: a block is 256 emulated threads, __shared__
// arrays are statics (blocks run one after another). LORA_EMU_SCHEDULE picks how the threads run
// (emu_runtime.h): as fibers, one at a time from barrier to barrier in forward, reverse or shuffled
// order (deterministic: a missing __syncthreads fails in forward or reverse), or as std::threads at a
// std::barrier ("parallel", the default). The launch sequence of each test case mirrors csrc/lora_ops.cpp (lora_fwd:
// shrink T with the mask bits, expand into y, then the base GEMM accumulating into y; lora_bwd: dT,
// [dB | dlora_bias], the mask regenerated when not saved, dAᵀ, dX's low-rank part, then dY·W), with the
// CUTLASS GEMMs replaced by plain loops; also the concatenated-K variants (pack, then one GEMM over
// [x | t]·[W | l]ᵀ for the forward and [dY | dT]·[W ; A] for dX at p = 0). Everything is checked against a float64 reference computed
// here, the bits against the Philox mask bit for bit. launch_skinny splits the reduction over
// blockIdx.z with the launcher's own plan_skinny_split and reduce kernel, on an emulated 4-SM GPU
// (and, for the small shapes, 32-column splits) so that most cases take the split path.
// Prints "<n> cases, <f> failures" last.
#include "emu_runtime.h"
using namespace lora_kernels;

// Storage dtypes of a case: x, W, bias, dY, y, dX in g_store; lora_A, lora_B, lora_bias in g_adapter
// (the low-rank kernels convert in their loads/stores; the references use the rounded values).
DType g_store = kF32, g_adapter = kF32;

uint16_t enc16(DType t, float v) {
  uint16_t h;
  if (t == kBF16) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    std::memcpy(&h, &b, 2);
  } else {
    const __half b = __float2half_rn(v);
    std::memcpy(&h, &b, 2);
  }
  return h;
}
float dec16(DType t, uint16_t h) {
  if (t == kBF16) {
    __nv_bfloat16 b;
    std::memcpy(&b, &h, 2);
    return __bfloat162float(b);
  }
  __half b;
  std::memcpy(&b, &h, 2);
  return __half2float(b);
}
// A tensor stored as dtype t. Inputs: f holds the values, rounded to t in place (what the reference
// sees). Outputs: poisoned with NaN, read back through get().
struct Stored {
  DType t;
  std::vector<float>& f;
  std::vector<uint16_t> h;
  Stored(DType t_, std::vector<float>& f_) : t(t_), f(f_) {
    if (t == kF32) return;
    h.resize(f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      h[i] = enc16(t, f[i]);
      f[i] = dec16(t, h[i]);
    }
  }
  void* ptr() { return t == kF32 ? static_cast<void*>(f.data()) : static_cast<void*>(h.data()); }
  double get(int64_t i) const { return t == kF32 ? f[i] : dec16(t, h[i]); }
  void add(int64_t i, double v) {  // the base GEMM's epilogue: C + acc, rounded to the output dtype
    if (t == kF32) f[i] = static_cast<float>(f[i] + v);
    else h[i] = enc16(t, static_cast<float>(dec16(t, h[i]) + v));
  }
};

constexpr uint64_t kHashBasis = 0xcbf29ce484222325ull;  // FNV-1a
uint64_t g_out_hash = kHashBasis;
bool g_selftest = false;  // --selftest: corrupt one value of T, of the bits and of dT: every case must fail
void cmp(const char* what, const std::vector<double>& ref, const std::function<double(int64_t)>& got, double tol) {
  double maxerr = 0, maxref = 1e-30;
  for (size_t i = 0; i < ref.size(); ++i) {
    { double d = std::fabs(ref[i] - got(i)); if (!(d == d)) d = INFINITY; maxerr = std::max(maxerr, d); }
    maxref = std::max(maxref, std::fabs(ref[i]));
  }
  if (!(maxerr <= tol * maxref + 1e-6)) { printf("  FAIL %s maxerr %g maxref %g\n", what, maxerr, maxref); ++fails; }
}

// Elementwise bound for a 16-bit concatenated-K GEMM: operands rounded once (relative u each), an
// fp32 sum, the result rounded once: |got - ref| ≤ 3u·Σ|terms| per element. absum holds Σ|terms| (the
// products of the unrounded operands); max-normalised checks are too loose on small outputs and too
// tight where a few large terms cancel.
void cmp_terms(const char* what, const std::vector<double>& ref, const std::function<double(int64_t)>& got,
               const std::vector<double>& absum, double u) {
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got(i), d = std::fabs(ref[i] - g);
    if (!(d <= 3 * u * absum[i] + 1e-6)) {
      printf("  FAIL %s at %zu: got %g want %g (sum of |terms| %g)\n", what, i, g, ref[i], absum[i]);
      ++fails;
      return;
    }
  }
}
void cmp_terms(const char* what, const std::vector<double>& ref, const std::vector<double>& got,
               const std::vector<double>& absum, double u) {
  cmp_terms(what, ref, [&](int64_t i) { return got[i]; }, absum, u);
}

// x layout: 0 = row-major padded (ld = K + 3), 1 = column-major, 2 = stride-2 inner, 3 = row-major with rows
// of a multiple of 8 elements (ld = K rounded up to 8, plus 8): with 16-bit storage the skinny kernels load
// its slices as 16-byte vectors along k (T) and along m (dAᵀ), as they load dY when N is a multiple of 8.
// Its buffer ends at x(M - 1, K - 1), so that under AddressSanitizer a vector read past K in the last row
// (a partial vector loaded whole) is an overflow. 4 = layout 3 starting one element into its buffer: rows of a
// multiple of 8 elements at a base 2 bytes past a 16-byte boundary (a view such as big[:, 1:K + 1]), which the
// kernels must load an element at a time (a GPU faults on a misaligned vector load; the emulation counts it).
void run_case(int64_t M, int64_t K, int64_t N, int64_t r, double p, uint64_t seed, int xlayout, bool save_mask) {
  std::mt19937 rng(M * 131 + K * 7 + N + r);
  std::normal_distribution<float> nd;
  int64_t sxi, sxc, xsize, xoff = 0;
  if (xlayout == 0) { sxi = K + 3; sxc = 1; xsize = M * (K + 3) + 1; }
  else if (xlayout == 1) { sxi = 1; sxc = M; xsize = M * K + 1; }
  else if (xlayout == 2) { sxi = 2 * K; sxc = 2; xsize = 2 * M * K + 1; }
  else { sxi = (K + 7) / 8 * 8 + 8; sxc = 1; xsize = std::max<int64_t>(1, (M - 1) * sxi + K); }  // ends at x(M-1, K-1)
  if (xlayout == 4) { xoff = 1; xsize += 1; }
  std::vector<float> xb(xsize), W(N * K), A(r * K), B(N * r), bias(N), lb(N), dy(M * N);
  for (auto& v : xb) v = nd(rng);
  for (auto& v : W) v = nd(rng); for (auto& v : A) v = nd(rng); for (auto& v : B) v = nd(rng);
  for (auto& v : bias) v = nd(rng); for (auto& v : lb) v = nd(rng); for (auto& v : dy) v = nd(rng);
  Stored xs(g_store, xb), Ws(g_store, W), biass(g_store, bias), dys(g_store, dy);
  Stored As(g_adapter, A), Bs(g_adapter, B), lbs(g_adapter, lb);
  const double out_tol = g_store == kBF16 ? 1.5e-2 : g_store == kF16 ? 3e-3 : 1e-4;
  auto X = [&](int64_t m, int64_t k) { return (double)xb[xoff + m * sxi + k * sxc]; };
  void* const x_ptr = static_cast<char*>(xs.ptr()) + xoff * (g_store == kF32 ? 4 : 2);
  const double s = 1.7;
  const bool dropout = p > 0;
  const int64_t G = (K + 7) / 8;
  const uint32_t th = dropout_threshold(p);
  auto keep = [&](int64_t m, int64_t k) -> double {
    if (!dropout) return 1.0;
    return (dropout_keep_byte(seed, m, k / 8, th) >> (k % 8)) & 1u ? 1.0 / (1.0 - p) : 0.0;
  };
  // ---------------- forward (mirrors lora_ops.cpp lora_fwd, fp32 everything) -------------
  std::vector<float> T(M * r, NAN), yf(M * N, NAN);
  Stored y(g_store, yf);
  std::vector<uint8_t> bits((dropout && save_mask) ? M * G : 0, 0xAB);
  {
    SkinnyArgs a{};
    a.x = x_ptr; a.sxi = sxi; a.sxc = sxc; a.xt = g_store;
    a.a = As.ptr(); a.saj = K; a.sac = 1; a.at = g_adapter;
    a.R = M; a.J = r; a.C = K; a.ones_col = false; a.alpha = 1.f;
    a.mask = dropout ? SkinnyMask::kGenerate : SkinnyMask::kNone;
    a.seed = seed; a.threshold = th; a.keep_scale = (float)(1.0 / (1.0 - p));
    a.bits_out = bits.size() ? bits.data() : nullptr; a.ld_bits_out = G;
    a.out = T.data(); a.ldo = r;
    launch_skinny(a, nullptr);
    ExpandArgs e{};
    e.op.t = T.data(); e.op.ldt = r; e.op.b = Bs.ptr(); e.op.sbn = r; e.op.sbj = 1; e.op.bt = g_adapter;
    e.op.v1 = lbs.ptr(); e.op.sv1 = 1; e.op.v1t = g_adapter; e.op.v2 = biass.ptr(); e.op.sv2 = 1; e.op.v2t = g_store;
    e.R = M; e.N = N; e.J = r; e.alpha = (float)s; e.bits = nullptr; e.out = y.ptr(); e.ldo = N; e.ot = g_store;
    launch_expand(e, nullptr);
    for (int64_t m = 0; m < M; ++m) for (int64_t n = 0; n < N; ++n) {
      double acc = 0; for (int64_t k = 0; k < K; ++k) acc += X(m, k) * W[n * K + k];
      y.add(m * N + n, acc);
    }
  }
  std::vector<double> Tref(M * r), Tabs(M * r), yref(M * N);
  for (int64_t m = 0; m < M; ++m) for (int64_t j = 0; j < r; ++j) {
    double acc = 0, mag = 0;
    for (int64_t k = 0; k < K; ++k) {
      acc += X(m, k) * keep(m, k) * A[j * K + k];
      mag += std::fabs(X(m, k) * keep(m, k) * A[j * K + k]);
    }
    Tref[m * r + j] = acc;
    Tabs[m * r + j] = mag;
  }
  // 16-bit X takes the tensor-core kernels, which round the second operand (A, B, T or dT) to X's
  // dtype: an elementwise bound with that unit roundoff. fp32 X: the FMA kernels, fp32 throughout.
  const double u16 = g_store == kBF16 ? 0x1p-8 : 0x1p-11;
  auto cmp_skinny = [&](const char* what, const std::vector<double>& ref, const std::function<double(int64_t)>& got,
                        const std::vector<double>& absum) {
    if (g_store == kF32) cmp(what, ref, got, 1e-4);
    else cmp_terms(what, ref, got, absum, u16);
  };
  // fp16 everywhere: T's and dT's second operand (lora_A, lora_B) is fp16 already, so the tensor-core
  // products are exact and only the fp32 accumulation (and the split reduce, and the scale) rounds:
  // (C + 2)·2⁻²⁴ per |term| (tripled by cmp_terms), far below u16 — 16-bit accumulation breaks it.
  auto cmp_skinny_exact = [&](const char* what, const std::vector<double>& ref,
                              const std::function<double(int64_t)>& got, const std::vector<double>& absum, int64_t C) {
    if (g_store == kF16 && g_adapter == kF16) cmp_terms(what, ref, got, absum, (C + 2) * 0x1p-24);
    else cmp_skinny(what, ref, got, absum);
  };
  for (int64_t m = 0; m < M; ++m) for (int64_t n = 0; n < N; ++n) {
    double base = bias[n]; for (int64_t k = 0; k < K; ++k) base += X(m, k) * W[n * K + k];
    double lr = lb[n]; for (int64_t j = 0; j < r; ++j) lr += Tref[m * r + j] * B[n * r + j];
    yref[m * N + n] = base + s * lr;
  }
  if (g_selftest) {
    T[(M * r) / 2] += 1.0f;
    if (bits.size()) bits[bits.size() / 2] ^= 1;
  }
  cmp_skinny_exact("T", Tref, [&](int64_t i) { return T[i]; }, Tabs, K);
  cmp("y", yref, [&](int64_t i) { return y.get(i); }, out_tol);
  if (bits.size()) {
    for (int64_t m = 0; m < M; ++m) for (int64_t g = 0; g < G; ++g) {
      uint32_t want = 0;
      for (int j = 0; j < 8; ++j) if (8 * g + j < K && keep(m, 8 * g + j) != 0) want |= 1u << j;
      if (bits[m * G + g] != want) { printf("  FAIL bits m=%ld g=%ld\n", (long)m, (long)g); ++fails; goto done_bits; }
    }
  }
done_bits:
  // ---------------- fused forward (lora_ops.cpp fused_forward): pack t = [s·T | 1 | 1] and
  // l = [B | s·lora_bias | bias] in a 16-bit dtype, then y = [x | t]·[W | l]ᵀ (the concatenated-K GEMM,
  // here a loop). Both, one or neither bias, and a transposed B, vary over the cases.
  {
    const DType ot = g_store == kF32 ? kBF16 : g_store;  // the GEMM is 16-bit; fp32 cases check the pack
    const bool has_lb = (M + N + r) % 2 == 0, has_bias = (M + K + r) % 3 != 0, b_t = xlayout == 1;
    const int64_t R = (r + has_lb + has_bias + 7) / 8 * 8;
    std::vector<float> Bt(r * N);
    for (int64_t n = 0; n < N; ++n) for (int64_t j = 0; j < r; ++j) Bt[j * N + n] = B[n * r + j];
    Stored Bts(g_adapter, Bt);
    std::vector<uint16_t> tp(M * R, 0xFFFF), lp(N * R, 0xFFFF);  // 0xFFFF: NaN in fp16 and bf16
    PackArgs pk{};
    pk.op.t = T.data(); pk.op.ldt = r;
    pk.op.b = b_t ? Bts.ptr() : Bs.ptr(); pk.op.sbn = b_t ? 1 : r; pk.op.sbj = b_t ? N : 1; pk.op.bt = g_adapter;
    pk.op.v1 = has_lb ? lbs.ptr() : nullptr; pk.op.sv1 = 1; pk.op.v1t = g_adapter;
    pk.op.v2 = has_bias ? biass.ptr() : nullptr; pk.op.sv2 = 1; pk.op.v2t = g_store;
    pk.M = M; pk.N = N; pk.J = r; pk.R = R; pk.alpha = (float)s; pk.ot = ot; pk.l_by_rank = false;
    pk.t_out = tp.data(); pk.l_out = lp.data();
    launch_pack_concat(pk, nullptr);
    if (g_selftest) tp[(M * R) / 2] ^= 0x4000;
    std::vector<double> yfr(M * N);
    for (int64_t m = 0; m < M; ++m) for (int64_t n = 0; n < N; ++n) {
      double v = has_bias ? bias[n] : 0.0; for (int64_t k = 0; k < K; ++k) v += X(m, k) * W[n * K + k];
      double lr = has_lb ? lb[n] : 0.0; for (int64_t j = 0; j < r; ++j) lr += Tref[m * r + j] * B[n * r + j];
      yfr[m * N + n] = v + s * lr;
    }
    std::vector<double> yfused(M * N), absum(M * N);
    for (int64_t m = 0; m < M; ++m) for (int64_t n = 0; n < N; ++n) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) { acc += X(m, k) * W[n * K + k]; mag += std::fabs(X(m, k) * W[n * K + k]); }
      for (int64_t j = 0; j < R; ++j) acc += (double)dec16(ot, tp[m * R + j]) * dec16(ot, lp[n * R + j]);
      // t holds the kernel's own T, from 16-bit x: its budget (Tabs) carries that rounding, which
      // exceeds u·|T| wherever the terms of T cancel (seen at r = 1, K = 5 in a --random run).
      for (int64_t j = 0; j < r; ++j) mag += s * (std::fabs(Tref[m * r + j]) + Tabs[m * r + j]) * std::fabs(B[n * r + j]);
      mag += (has_lb ? std::fabs(s * lb[n]) : 0.0) + (has_bias ? std::fabs(bias[n]) : 0.0);
      yfused[m * N + n] = dec16(ot, enc16(ot, (float)acc));  // the epilogue's rounding to the output
      absum[m * N + n] = mag;
    }
    // 16-bit t and l: s·T and the adapters rounded once more than on the expand path.
    cmp_terms("y fused", yfr, yfused, absum, ot == kBF16 ? 0x1p-8 : 0x1p-11);
  }
  // ---------------- backward (mirrors lora_bwd) -------------
  std::vector<float> dT(M * r, NAN), dBx(N * (r + 1), NAN), dAt(K * r, NAN), dxf(M * K, NAN);
  Stored dx(g_store, dxf);
  std::vector<uint8_t> mask = bits;
  {
    SkinnyArgs a{};
    a.x = dys.ptr(); a.sxi = N; a.sxc = 1; a.xt = g_store;
    a.a = Bs.ptr(); a.saj = 1; a.sac = r; a.at = g_adapter;
    a.R = M; a.J = r; a.C = N; a.alpha = (float)s; a.mask = SkinnyMask::kNone; a.keep_scale = 1.f;
    a.out = dT.data(); a.ldo = r;
    launch_skinny(a, nullptr);
  }
  {
    SkinnyArgs a{};
    a.x = dys.ptr(); a.sxi = 1; a.sxc = N; a.xt = g_store;
    a.a = T.data(); a.saj = 1; a.sac = r; a.at = kF32;
    a.R = N; a.J = r; a.C = M; a.ones_col = true; a.alpha = (float)s; a.mask = SkinnyMask::kNone;
    a.keep_scale = 1.f; a.out = dBx.data(); a.ldo = r + 1;
    launch_skinny(a, nullptr);
  }
  if (dropout && (int64_t)mask.size() != M * G) {
    mask.assign(M * G, 0xCD);
    launch_make_mask(seed, th, M, K, mask.data(), nullptr);
    for (int64_t m = 0; m < M; ++m) for (int64_t g = 0; g < G; ++g) {
      uint32_t want = 0;
      for (int j = 0; j < 8; ++j) if (8 * g + j < K && keep(m, 8 * g + j) != 0) want |= 1u << j;
      if (mask[m * G + g] != want) { printf("  FAIL regenerated bits m=%ld g=%ld\n", (long)m, (long)g); ++fails; goto done_mask; }
    }
  done_mask:;
  }
  {
    SkinnyArgs a{};
    a.x = x_ptr; a.sxi = sxc; a.sxc = sxi; a.xt = g_store;
    a.a = dT.data(); a.saj = 1; a.sac = r; a.at = kF32;
    a.R = K; a.J = r; a.C = M; a.alpha = 1.f;
    a.mask = dropout ? SkinnyMask::kBitsTransposed : SkinnyMask::kNone;
    a.keep_scale = (float)(1.0 / (1.0 - p)); a.bits_in = dropout ? mask.data() : nullptr; a.ld_bits_in = G;
    a.out = dAt.data(); a.ldo = r;
    launch_skinny(a, nullptr);
  }
  {
    ExpandArgs e{};
    e.op.t = dT.data(); e.op.ldt = r; e.op.b = As.ptr(); e.op.sbn = 1; e.op.sbj = K; e.op.bt = g_adapter;
    e.R = M; e.N = K; e.J = r; e.alpha = 1.f; e.bits = dropout ? mask.data() : nullptr; e.ld_bits = G;
    e.keep_scale = (float)(1.0 / (1.0 - p)); e.out = dx.ptr(); e.ldo = K; e.ot = g_store;
    launch_expand(e, nullptr);
    for (int64_t m = 0; m < M; ++m) for (int64_t k = 0; k < K; ++k) {
      double acc = 0; for (int64_t n = 0; n < N; ++n) acc += (double)dy[m * N + n] * W[n * K + k];
      dx.add(m * K + k, acc);
    }
  }
  std::vector<double> dTr(M * r), dAr(r * K), dBr(N * r), dlbr(N), dxr(M * K);
  std::vector<double> dTabs(M * r), dAabs(r * K), dBabs(N * r), dlbabs(N);  // error budgets, as Tabs
  for (int64_t m = 0; m < M; ++m) for (int64_t j = 0; j < r; ++j) {
    double acc = 0, mag = 0;
    for (int64_t n = 0; n < N; ++n) {
      acc += (double)dy[m * N + n] * B[n * r + j];
      mag += std::fabs((double)dy[m * N + n] * B[n * r + j]);
    }
    dTr[m * r + j] = s * acc;
    dTabs[m * r + j] = s * mag;
  }
  // dA and dB multiply the kernels' own dT and T: their budgets carry those tensors' budgets.
  for (int64_t j = 0; j < r; ++j) for (int64_t k = 0; k < K; ++k) {
    double acc = 0, mag = 0;
    for (int64_t m = 0; m < M; ++m) {
      acc += dTr[m * r + j] * X(m, k) * keep(m, k);
      mag += (std::fabs(dTr[m * r + j]) + dTabs[m * r + j]) * std::fabs(X(m, k) * keep(m, k));
    }
    dAr[j * K + k] = acc;
    dAabs[j * K + k] = mag;
  }
  for (int64_t n = 0; n < N; ++n) {
    double sl = 0, sla = 0;
    for (int64_t m = 0; m < M; ++m) { sl += dy[m * N + n]; sla += std::fabs(dy[m * N + n]); }
    dlbr[n] = s * sl;
    dlbabs[n] = s * sla;
    for (int64_t j = 0; j < r; ++j) {
      double acc = 0, mag = 0;
      for (int64_t m = 0; m < M; ++m) {
        acc += (double)dy[m * N + n] * Tref[m * r + j];
        mag += std::fabs((double)dy[m * N + n]) * (std::fabs(Tref[m * r + j]) + Tabs[m * r + j]);
      }
      dBr[n * r + j] = s * acc;
      dBabs[n * r + j] = s * mag;
    }
  }
  for (int64_t m = 0; m < M; ++m) for (int64_t k = 0; k < K; ++k) {
    double base = 0; for (int64_t n = 0; n < N; ++n) base += (double)dy[m * N + n] * W[n * K + k];
    double lr = 0; for (int64_t j = 0; j < r; ++j) lr += dTr[m * r + j] * A[j * K + k];
    dxr[m * K + k] = base + lr * keep(m, k);
  }
  // ---------------- dX at p = 0 (lora_ops.cpp fused_dx_no_dropout): t = dT, l = A padded to R rows
  // (l_by_rank), then dX = [dY | t]·[W ; l] (the concatenated-K GEMM, here a loop).
  if (!dropout) {
    const DType ot = g_store == kF32 ? kBF16 : g_store;
    const int64_t R = (r + 7) / 8 * 8;
    std::vector<uint16_t> tp(M * R, 0xFFFF), lp(R * K, 0xFFFF);
    PackArgs pk{};
    pk.op.t = dT.data(); pk.op.ldt = r;
    pk.op.b = As.ptr(); pk.op.sbn = 1; pk.op.sbj = K; pk.op.bt = g_adapter;  // l(n = k, j) = A[j, k]
    pk.M = M; pk.N = K; pk.J = r; pk.R = R; pk.alpha = 1.f; pk.ot = ot; pk.l_by_rank = true;
    pk.t_out = tp.data(); pk.l_out = lp.data();
    launch_pack_concat(pk, nullptr);
    if (g_selftest) lp[(R * K) / 2] ^= 0x4000;
    std::vector<double> dxf2(M * K), absum(M * K);
    for (int64_t m = 0; m < M; ++m) for (int64_t k = 0; k < K; ++k) {
      double acc = 0, mag = 0;
      for (int64_t n = 0; n < N; ++n) {
        acc += (double)dy[m * N + n] * W[n * K + k];
        mag += std::fabs((double)dy[m * N + n] * W[n * K + k]);
      }
      for (int64_t j = 0; j < R; ++j) acc += (double)dec16(ot, tp[m * R + j]) * dec16(ot, lp[j * K + k]);
      // t holds the kernel's own dT: its budget (dTabs) carries its rounding, as for y fused.
      for (int64_t j = 0; j < r; ++j) mag += (std::fabs(dTr[m * r + j]) + dTabs[m * r + j]) * std::fabs(A[j * K + k]);
      dxf2[m * K + k] = dec16(ot, enc16(ot, (float)acc));
      absum[m * K + k] = mag;
    }
    cmp_terms("dx fused", dxr, dxf2, absum, ot == kBF16 ? 0x1p-8 : 0x1p-11);
  }
  if (g_selftest) dT[(M * r) / 2] += 1.0f;
  cmp_skinny_exact("dT", dTr, [&](int64_t i) { return dT[i]; }, dTabs, N);
  cmp_skinny("dA", dAr, [&](int64_t i) { int64_t j = i / K, k = i % K; return dAt[k * r + j]; }, dAabs);
  cmp_skinny("dB", dBr, [&](int64_t i) { int64_t n = i / r, j = i % r; return dBx[n * (r + 1) + j]; }, dBabs);
  cmp_skinny("dlb", dlbr, [&](int64_t n) { return dBx[n * (r + 1) + r]; }, dlbabs);
  cmp("dx", dxr, [&](int64_t i) { return dx.get(i); }, out_tol);
  // The skinny kernels' outputs and the bits, bit for bit, into g_out_hash (--vector-ab compares two runs).
  auto mix = [](const void* data, size_t bytes) {
    for (size_t i = 0; i < bytes; ++i) g_out_hash = (g_out_hash ^ static_cast<const unsigned char*>(data)[i]) * 0x100000001b3ull;
  };
  mix(T.data(), T.size() * sizeof(float));
  mix(dT.data(), dT.size() * sizeof(float));
  mix(dBx.data(), dBx.size() * sizeof(float));
  mix(dAt.data(), dAt.size() * sizeof(float));
  mix(bits.data(), bits.size());
}

int main(int argc, char** argv) {
  g_selftest = argc > 1 && std::string(argv[1]) == "--selftest";
  // --random N SEED [MAXDIM]: N random cases (sizes 1..MAXDIM, default 160; r 1..256, dtype
  // configurations, x layouts, p, saved or regenerated mask, split plans) instead of the fixed set.
  const bool random_mode = argc > 2 && std::string(argv[1]) == "--random";
  // --vector: only the cases written for the 16-byte vector loads (the AddressSanitizer run's set).
  const bool vector_mode = argc > 1 && std::string(argv[1]) == "--vector";
  // --vector-ab: that set twice, with the vector loads and with the element loads (g_vec_loads = false, as
  // LORA_KERNELS_CUDA_VEC_LOADS=0): the same values staged, so every skinny output must match bit for bit.
  const bool vector_ab = argc > 1 && std::string(argv[1]) == "--vector-ab";
  // LORA_EMU_STOP_AT_FAIL=1: stop after the first failing case (a mutant's run need not go on).
  const bool stop_at_fail = std::getenv("LORA_EMU_STOP_AT_FAIL") && std::string(std::getenv("LORA_EMU_STOP_AT_FAIL")) == "1";
  int n = 0, n_split = 0;
  auto one = [&](int64_t M, int64_t K, int64_t N, int64_t r, double p, int xl) {
    if ((g_selftest && n >= 6) || (stop_at_fail && fails)) return;
    const int before = fails, splits_before = g_split_launches;
    run_case(M, K, N, r, p, (uint64_t(1) << 40) + 17 + M, xl, (M + K) % 2 == 0);
    if (fails != before)
      printf("case M=%ld K=%ld N=%ld r=%ld p=%g xl=%d failed\n", (long)M, (long)K, (long)N, (long)r, p, xl);
    n_split += g_split_launches != splits_before;
    ++n;
  };
  // The last lines of every mode: the X loads the tensor-core skinny launches took, then the count.
  auto report = [&] {
    printf("tensor-core skinny launches by X loads: scalar %d, along c %d, along i %d\n", g_xload_launches[0],
           g_xload_launches[1], g_xload_launches[2]);
    if (g_vec16_misaligned) printf("  FAIL %d misaligned 16-byte loads or stores\n", g_vec16_misaligned);
    fails += g_wmma_fails.load() + (g_vec16_misaligned != 0);
    printf("%d cases, %d failures\n", n, fails);
    return 0;
  };
  // 16-byte vector loads (skinny_x_load), in the current dtypes: x row-major with aligned rows (T along k,
  // dAᵀ along m with the saved or regenerated mask), x column-major (dAᵀ along k; T along m without
  // dropout), dY with N a multiple of 8 (dT along n, dB along m); K = 203 and 206 end in a partial vector of 3
  // and 6 elements (at the end of x's buffer in layout 3), M = 37 and 70 in a partial row block.
  auto vector_cases = [&] {
    for (int64_t r : {1, 16, 40})
      for (double p : {0.0, 0.3}) {
        one(70, 203, 48, r, p, 3);
        one(37, 206, 40, r, p, 3);
        one(72, 203, 40, r, p, 1);
      }
    one(300, 264, 136, 16, 0.3, 3);
    one(70, 208, 48, 16, 0.3, 4);  // x misaligned: element loads for x (dY still as vectors)
    one(37, 200, 40, 1, 0.0, 4);
  };
  auto vector_set = [&] {
    for (DType st : {kBF16, kF16}) {
      g_store = st;
      g_adapter = st == kBF16 ? kF32 : kF16;
      vector_cases();
    }
  };
  if (vector_mode) {
    vector_set();
    return report();
  }
  if (vector_ab) {
    vector_set();
    const uint64_t vec_hash = g_out_hash;
    const int vec_launches = g_xload_launches[1] + g_xload_launches[2];
    g_out_hash = kHashBasis;
    g_vec_loads = false;
    g_xload_launches[1] = g_xload_launches[2] = 0;
    vector_set();
    printf("vector loads: %d launches, outputs %016llx; element loads: outputs %016llx\n", vec_launches,
           (unsigned long long)vec_hash, (unsigned long long)g_out_hash);
    if (vec_hash != g_out_hash || vec_launches == 0 || g_xload_launches[1] + g_xload_launches[2] != 0) {
      printf("  FAIL the two loads' outputs differ, or a run did not take its loads\n");
      ++fails;
    }
    return report();
  }
  if (random_mode) {
    const int count = std::atoi(argv[2]);
    std::mt19937_64 pick(argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 1);
    const int64_t maxdim = argc > 4 ? std::atoll(argv[4]) : 160;
    auto dim = [&](int64_t hi) { return (int64_t)(pick() % (uint64_t)hi) + 1; };
    for (int i = 0; i < count && !(stop_at_fail && fails); ++i) {
      const int64_t M = dim(maxdim), K = dim(maxdim), N = dim(maxdim);
      static const int64_t edge_ranks[] = {1, 64, 65, 128, 255, 256};
      const int64_t r = (pick() % 4 == 0) ? edge_ranks[pick() % 6] : dim(256);
      const int cfg = (int)(pick() % 3);  // fp32 everything, bf16 x with fp32 adapters, fp16 everywhere
      g_store = cfg == 0 ? kF32 : cfg == 1 ? kBF16 : kF16;
      g_adapter = cfg == 2 ? kF16 : kF32;
      g_split_min_c = pick() % 2 ? kTileC : kSplitMinC;
      const double p = pick() % 2 ? 0.3 : 0.0;
      const int xl = (int)(pick() % 5);
      const int before = fails;
      run_case(M, K, N, r, p, pick() >> 1, xl, pick() % 2 == 0);
      if (fails != before)
        printf("case M=%ld K=%ld N=%ld r=%ld p=%g xl=%d store=%d adapter=%d min_c=%ld failed\n", (long)M, (long)K,
               (long)N, (long)r, p, xl, (int)g_store, (int)g_adapter, (long)g_split_min_c);
      ++n;
    }
    return report();
  }
  g_split_min_c = kTileC;  // C ≤ 72 here: splits of one or two slices, the last one ragged
  for (int64_t M : {1, 37, 70})
    for (int64_t K : {1, 33, 72})
      for (int64_t N : {5, 40, 70})
        for (int64_t r : {1, 16, 24, 65})  // skinny column tiles 16, 16/32 (dB: r + 1), 32, 64
          for (double p : {0.0, 0.3})
            for (int xl : {0, 1, 2}) {
              if ((M + K + N + r + xl) % 3) continue;  // subsample to keep it quick
              one(M, K, N, r, p, xl);
            }
  // 16-bit storage: bf16 x with fp32 adapters (PEFT's default) and fp16 everywhere, on a subset. These
  // take the tensor-core skinny kernels (column tiles 16/32/64 at r = 1/16, 24, 40/65); the last shapes
  // span several 128-row blocks (M = 300 for T and dT, K = 200 and N = 260 for dAᵀ and dB).
  for (DType st : {kBF16, kF16}) {
    g_store = st;
    g_adapter = st == kBF16 ? kF32 : kF16;
    for (int64_t r : {1, 16, 24, 40, 65})
      for (int xl : {0, 1, 2}) one(37 + 33 * (xl == 2), 72, 40 + 30 * (r == 16), r, xl == 1 ? 0.0 : 0.3, xl);
    one(300, 200, 260, 16, 0.3, 0);
    one(300, 200, 260, 40, 0.0, 1);
    vector_cases();
  }
  g_store = g_adapter = kF32;
  // The launcher's plan as it is (min_c = kSplitMinC): long reductions over M (dB, dAᵀ) and over
  // K and N (T without dropout, dT) on grids of 1–2 row blocks.
  g_split_min_c = kSplitMinC;
  for (int xl : {0, 1, 2}) {  // each x layout with and without dropout, for both shapes
    one(1100, 33, 40, 16, xl == 1 ? 0.3 : 0.0, xl);
    one(40, 1100, 1030, 16, xl == 1 ? 0.0 : 0.3, xl);
  }
  // Empty problems (M, K or N = 0, as lora_linear passes them through): every output written, dA and
  // dB as zeros (an empty reduction), nothing read out of bounds.
  for (DType st : {kF32, kBF16}) {
    g_store = st;
    g_adapter = kF32;
    one(0, 33, 40, 16, 0.3, 0);
    one(0, 33, 40, 16, 0.0, 1);
    one(37, 0, 40, 16, 0.3, 2);
    one(37, 33, 0, 16, 0.3, 0);
  }
  g_store = g_adapter = kF32;
  // The keep test is u16 >= threshold: p chosen so that x(0, 0)'s 16-bit value equals the threshold
  // (kept), with the mask saved (M = 5: M + K even) and regenerated (M = 6); a > would drop it. r = 7
  // with one bias (M = 5: bias only, M = 6: lora_bias only) fills the fused pack's R = 8 exactly.
  for (int64_t M : {5, 6}) {
    const uint64_t seed = (uint64_t(1) << 40) + 17 + M;
    uint32_t c[4] = {0, 0, 0, 0};
    philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    one(M, 17, 9, 7, (c[0] & 0xFFFFu) / 65536.0, 0);
  }
  printf("split path: %d of %d skinny launches, in %d of %d cases\n", g_split_launches, g_skinny_launches, n_split, n);
  return report();
}
