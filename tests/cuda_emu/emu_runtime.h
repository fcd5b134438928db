// The CUDA runtime emulated on the host: lowrank_kernels.cuh compiled as C++, launches as pools of
// std::threads, and lowrank.cu's launchers (launch_skinny, launch_expand, launch_pack_concat,
// launch_make_mask) mirrored over it. Shared by harness.cpp (the kernels against float64) and
// ops_emu.cpp (csrc/lora_ops.cpp itself, the host orchestration, run on CPU tensors). One translation
// unit includes it once.
#pragma once
#include <barrier>
#include <thread>
#include <vector>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <random>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <ucontext.h>
#include <string>
#include <type_traits>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "lowrank.h"
#include "philox.cuh"
#include "wmma_emu.h"
#undef __global__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __launch_bounds__(x)
#define __shared__ static
struct D3 { unsigned x = 0, y = 0, z = 0; };
// Each emulated thread's indices; the OS thread (parallel schedule) or the scheduler (serial ones)
// points emu_self at the running thread's.
struct EmuThread { D3 tid, bid; };
thread_local EmuThread* emu_self = nullptr;
#define threadIdx (emu_self->tid)
#define blockIdx (emu_self->bid)
D3 blockDim{256, 1, 1};
std::barrier<>* g_bar;
// Schedules (LORA_EMU_SCHEDULE):
// - "parallel" (default): a block's threads are OS threads meeting at a std::barrier, so a missing
//   __syncthreads shows only if the OS happens to interleave them badly;
// - "forward", "reverse", "shuffle[:SEED]": the threads are fibers on one OS thread, run one at a
//   time from one barrier to the next in that order (a new random order every phase for shuffle).
//   Between two barriers each thread then sees every write of the threads before it and none of
//   those after it. A kernel without a race computes the same bits in every order; a missing barrier
//   (shared memory read in the phase in which another thread writes it, either way round) gives a
//   wrong value in forward or in reverse, deterministically. No warp is assumed to run in lockstep
//   (independent thread scheduling, as on Volta and later). Under -fsanitize=address use "parallel":
//   AddressSanitizer does not follow swapcontext's stack switches.
int g_schedule = -1;  // -1: not read yet; 0 parallel, 1 forward, 2 reverse, 3 shuffle
uint64_t g_schedule_seed = 1;
int emu_schedule() {
  if (g_schedule < 0) {
    const char* e = std::getenv("LORA_EMU_SCHEDULE");
    const std::string v = e ? e : "parallel";
    g_schedule = v == "forward" ? 1 : v == "reverse" ? 2 : v.rfind("shuffle", 0) == 0 ? 3 : 0;
    if (g_schedule == 0 && v != "parallel") {
      fprintf(stderr, "LORA_EMU_SCHEDULE=%s: expected parallel, forward, reverse or shuffle[:SEED]\n", v.c_str());
      std::exit(2);
    }
    if (g_schedule == 3 && v.size() > 8) g_schedule_seed = std::strtoull(v.c_str() + 8, nullptr, 10);
  }
  return g_schedule;
}
struct Fibers {
  static constexpr size_t kStack = 256 * 1024;
  ucontext_t sched;
  std::vector<ucontext_t> ctx;
  std::vector<std::unique_ptr<char[]>> stacks;  // kept across launches
  std::vector<EmuThread> state;
  std::vector<char> done;
  const std::function<void()>* body = nullptr;
  unsigned cur = 0;
  std::mt19937_64 rng{1};
};
Fibers* g_fibers = nullptr;
inline void emu_syncthreads() {
  if (g_fibers) {
    swapcontext(&g_fibers->ctx[g_fibers->cur], &g_fibers->sched);  // the scheduler runs the next thread
  } else {
    g_bar->arrive_and_wait();
  }
}
#define __syncthreads() emu_syncthreads()
int fails = 0;
std::atomic<int> g_wmma_fails{0};
void wmma_emu_fail(const char* what) {
  if (g_wmma_fails++ == 0) printf("  FAIL %s\n", what);
}
bool wmma_emu_lane0() { return threadIdx.x % 32 == 0; }
// 16-byte vector loads and stores (lowrank_kernels.cuh's load_vec16 / store_vec16 under LORA_KERNELS_EMU):
// a GPU faults on a misaligned one, so the emulation fails the case rather than reading it.
int g_vec16_misaligned = 0;
template <class V>
V emu_load16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ++g_vec16_misaligned;
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V>
void emu_store16(void* p, const V& v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) ++g_vec16_misaligned;
  std::memcpy(p, &v, sizeof(V));
}
#define LORA_KERNELS_EMU 1
namespace lora_kernels {
namespace {
#include "lowrank_kernels.cuh"
}
void fiber_entry() {
  Fibers& fb = *g_fibers;
  (*fb.body)();
  fb.done[fb.cur] = 1;
  swapcontext(&fb.ctx[fb.cur], &fb.sched);  // never resumed
}
// The serial schedules: nthreads fibers, each phase (barrier to barrier) runs them one at a time in
// the schedule's order. Every thread reaches the same number of barriers (the per-block one
// included), so a phase ends with all of them at a barrier or all of them done.
void run_fibers(unsigned nthreads, int mode, const std::function<void()>& body) {
  static Fibers fb;
  g_fibers = &fb;
  fb.body = &body;
  fb.ctx.assign(nthreads, ucontext_t{});
  fb.state.assign(nthreads, EmuThread{});
  fb.done.assign(nthreads, 0);
  while (fb.stacks.size() < nthreads) fb.stacks.push_back(std::make_unique<char[]>(Fibers::kStack));
  static uint64_t launches = 0;
  fb.rng.seed(g_schedule_seed * 1000003 + launches++);
  for (unsigned t = 0; t < nthreads; ++t) {
    fb.state[t].tid.x = t;
    getcontext(&fb.ctx[t]);
    fb.ctx[t].uc_stack.ss_sp = fb.stacks[t].get();
    fb.ctx[t].uc_stack.ss_size = Fibers::kStack;
    fb.ctx[t].uc_link = nullptr;
    makecontext(&fb.ctx[t], fiber_entry, 0);
  }
  std::vector<unsigned> order(nthreads);
  for (unsigned i = 0; i < nthreads; ++i) order[i] = mode == 2 ? nthreads - 1 - i : i;
  for (unsigned alive = nthreads; alive > 0;) {
    if (mode == 3) std::shuffle(order.begin(), order.end(), fb.rng);
    unsigned finished = 0;
    for (unsigned t : order) {
      fb.cur = t;
      emu_self = &fb.state[t];
      swapcontext(&fb.sched, &fb.ctx[t]);
      finished += fb.done[t];
    }
    if (finished != 0 && finished != nthreads) {
      printf("  FAIL %u of %u threads finished while the others wait at a barrier\n", finished, nthreads);
      ++fails;
      break;
    }
    alive = nthreads - finished;
  }
  g_fibers = nullptr;
  emu_self = nullptr;
}
// Blocks run one after another, z from last to first: the split partials must not depend on the
// order in which blocks run.
template <class F>
void launch(unsigned gx, unsigned gy, unsigned gz, unsigned nthreads, F f) {
  // One pool of nthreads threads (OS threads or fibers, per the schedule) walks the blocks one after
  // another (the __shared__ statics are reused by the next block): every thread runs this body, with
  // a barrier after each block, so the block is done before any thread starts the next one.
  const std::function<void()> body = [&] {
    for (unsigned bz = gz; bz-- > 0;)
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
          blockIdx.x = bx;
          blockIdx.y = by;
          blockIdx.z = bz;
          f();
          __syncthreads();
        }
  };
  if (const int mode = emu_schedule(); mode != 0) {
    run_fibers(nthreads, mode, body);
    return;
  }
  std::barrier<> bar(nthreads);
  g_bar = &bar;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < nthreads; ++t)
    ts.emplace_back([&, t] {
      EmuThread self;
      self.tid.x = t;
      emu_self = &self;
      body();
    });
  for (auto& t : ts) t.join();
}
int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int kEmuSms = 4;            // emulated SM count: small grids, so the split path runs
int64_t g_split_min_c = kSplitMinC;   // plan_skinny_split's min_c; lowered for the small shapes
int g_skinny_launches = 0, g_split_launches = 0;
int g_xload_launches[3] = {0, 0, 0};  // tensor-core skinny launches by XLoad (scalar, along c, along i)
bool g_vec_loads = true;               // false: as lowrank.cu under LORA_KERNELS_CUDA_VEC_LOADS=0
// Mirrors lowrank.cu's launch_skinny: same plan, same kernels, the workspace a NaN-filled vector.
void launch_skinny(const SkinnyArgs& a, cudaStream_t) {
  const int64_t JT = a.J + (a.ones_col ? 1 : 0);
  if (a.R == 0 || JT == 0) return;
  const int64_t gx = cdiv(a.R, skinny_tile_rows(JT, a.xt == kBF16 || a.xt == kF16)), gy = cdiv(JT, skinny_tile_cols(JT));
  const bool mma = a.xt == kBF16 || a.xt == kF16;
  // lowrank.cu's choice of kernel (tile, dtype, X loads), shared through skinny_kernel_for.
  const SkinnyKernelFn fn = skinny_kernel_for(a, g_vec_loads);
  if (mma) ++g_xload_launches[g_vec_loads ? static_cast<int>(skinny_x_load(a)) : 0];
  auto kernel = [fn](const SkinnyArgs& args, int64_t chunk, int64_t zstride) { fn(args, chunk, zstride); };
  const SkinnySplit sp = plan_skinny_split(a.R, JT, a.C, kEmuSms, mma, g_split_min_c);
  ++g_skinny_launches;
  if (sp.splits == 1) {
    launch(gx, gy, 1, kThreads, [&] { kernel(a, a.C, 0); });
    return;
  }
  if (sp.chunk % kTileC != 0 || (sp.splits - 1) * sp.chunk >= a.C || sp.splits * sp.chunk < a.C) {
    printf("  FAIL bad split plan C=%ld splits=%ld chunk=%ld\n", (long)a.C, (long)sp.splits, (long)sp.chunk);
    ++fails;
  }
  ++g_split_launches;
  std::vector<float> ws(sp.splits * a.R * JT, NAN);
  SkinnyArgs part = a;
  part.out = ws.data();
  part.ldo = JT;
  part.alpha = 1.f;
  launch(gx, gy, sp.splits, kThreads, [&] { kernel(part, sp.chunk, a.R * JT); });
  launch(cdiv(a.R * JT, kThreads), 1, 1, kThreads,
         [&] { skinny_reduce_kernel(ws.data(), sp.splits, a.R, JT, a.alpha, a.out, a.ldo); });
}
void launch_expand(const ExpandArgs& a, cudaStream_t) {
  if (a.R == 0 || a.N == 0) return;
  // As lowrank.cu: tensor cores for a 16-bit output, else the FMA kernel.
  if (a.ot == kBF16) {
    launch(cdiv(a.R, kExpandMmaRows), cdiv(a.N, kExpandTile), 1, kThreads, [&] { expand_mma_kernel<__nv_bfloat16>(a); });
  } else if (a.ot == kF16) {
    launch(cdiv(a.R, kExpandMmaRows), cdiv(a.N, kExpandTile), 1, kThreads, [&] { expand_mma_kernel<__half>(a); });
  } else {
    launch(cdiv(a.R, kExpandTile), cdiv(a.N, kExpandTile), 1, kThreads, [&] { expand_kernel(a); });
  }
}
void launch_pack_concat(const PackArgs& a, cudaStream_t) {
  const int64_t n = (a.M + a.N) * a.R;
  if (n == 0) return;
  launch(cdiv(n, kThreads), 1, 1, kThreads, [&] { pack_concat_kernel(a); });
}
void launch_make_mask(uint64_t seed, uint32_t th, int64_t M, int64_t K, uint8_t* bits, cudaStream_t) {
  int64_t G = cdiv(K, 8);
  if (M == 0 || G == 0) return;
  blockDim.x = kThreads;
  launch(cdiv(M * G, kThreads), 1, 1, kThreads, [&] {
    // make_mask_kernel returns early past the last element and has no __syncthreads: fine with the
    // pool's per-block barrier, which every thread reaches after f() returns
    make_mask_kernel(seed, th, M, K, G, bits);
  });
}
uint32_t dropout_threshold(double p) { return (uint32_t)std::nearbyint(p * 65536.0); }
}  // namespace lora_kernels
