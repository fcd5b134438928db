# The defaults of `GPU_CHECK_PLAN=short bash scripts/gpu_check.sh` (make gpu-check-short), the plan for a
# device session of 15 minutes in all (bench/NOTES.md, "Runbook"). Sourced by gpu_check.sh, and by
# device_prebuild.sh, which compiles the Triton kernels of this benchmark and verify ahead of the session.
# Each default gives way to a value already in the environment.

# A small verify first (correctness against float64 and the masks bit for bit, fixed size; its full
# sweep compiles ~80 kernel variants in one process: a later call), then the numbers (WRONG rows where
# rel_err exceeds the table), then the GPU tests, which have more tests than time and take what is left.
# The host step (bench.host_profile, ~20 s) says where the CPU's time per step goes: the Triton rows were
# host-bound at N = 4096 on the H200 (session 28).
: "${GPU_CHECK_STEPS:=install,environment,verify,host,bench,tests}"
: "${GPU_CHECK_REQUIRE_GPU:=1}"
: "${GPU_CHECK_BUDGET:=360}"
: "${GPU_CHECK_CAP_BENCH:=140}"
: "${GPU_CHECK_CAP_TESTS:=150}"
: "${GPU_CHECK_CAP_VERIFY:=45}"
# The host step prints each table as it is measured, so a step stopped here keeps what it printed; its kernels are
# the benchmark's (prewarmed) but for three small calibration ones.
: "${GPU_CHECK_CAP_HOST:=60}"
# The headline configurations, every implementation that matters for issues 3 and 5, fixed tiles
# (autotuning compiles every config: a later session measures it); --budget-s keeps the table.
# triton-regen (the mask regenerated in backward) rather than triton-flat since session 34: the flattened
# loops were measured slower (session 28), the regenerate mode's dX epilogue never (its Philox ran 4 times).
# triton-dx128 (the dX GEMM's 128x128 fixed tiles of session 28, against the 128x256 default since session 35)
# rather than triton-1pass, measured slower in session 28 (the runbook's item 2 measures its variants).
# triton-dy1 (dT and dB from one read of dY, opt-in since session 36, against the default's two reads) rather
# than cuda-expand, measured slower than cuda-bitmask in session 28 (2.48 / 2.96 against 1.96 / 2.52 at p = 0).
# triton-devdesc (the TMA kernels' descriptors built in the kernel, opt-in since session 42) for its kernel time
# and host_us; its kernels are then in the prewarmed cache for the host step's row too.
: "${BENCH_ARGS:=--m 8192 --shapes 4096x4096,4096x14336 --ranks 16 --dropout 0,0.1 --budget-s 120
  --impls cublas,naive,peft,triton-bitmask,triton-regen,triton-dx128,triton-dy1,triton-devdesc,cuda-bitmask}"
: "${BENCH_AUTOTUNE:=0}"
# The files whose tests run kernels on the GPU; the CPU-only files (extension build, emulation
# harness, scripts) already pass in CI.
: "${GPU_CHECK_TESTS:=tests/test_lora_linear.py tests/test_cuda_backend.py tests/test_single_pass.py
  tests/test_hostile.py tests/test_compile.py tests/test_verify.py tests/test_layer.py tests/test_peft.py
  tests/test_dispatch_modes.py}"
# Not the compile-only tests of those files (they compile for sm_90 in a subprocess without the GPU): the CPU CI's
# GPU-stack stage runs them with the image's Triton, and here they would take minutes of the tests step's 8
# workers. Nor the demo: its verify (3 backends x 4 dtypes) and timings compile dozens of kernels outside the
# prewarmed cache, and the verify and bench steps already run those paths. Nor the autotuned case of the row
# splits under load: it tunes four kernels at 8192x4096->4096 (21 configs to compile; a later call's).
# Nor the 64-bit offset checks in the interpreter (a CPU subprocess, the same on any machine: CI runs them).
: "${PYTEST_ARGS:=--deselect tests/test_lora_linear.py::test_triton_kernels_compile_for_sm90
  --deselect tests/test_lora_linear.py::test_tuning_tables_fit_an_h100
  --deselect tests/test_lora_linear.py::test_compiled_graph_outputs_come_from_the_kernels
  --deselect tests/test_lora_linear.py::test_dropout_mask_philox_runs_once_per_tile_compile_for_sm90
  --deselect tests/test_lora_linear.py::test_w_kn_tma_kernels_compile_for_sm90_as_the_n_k_ones_do
  --deselect tests/test_lora_linear.py::test_traced_launches_fit_an_h100_without_stepping_down
  --deselect tests/test_lora_linear.py::test_flattened_tma_kernels_pipeline_across_tiles
  --deselect tests/test_lora_linear.py::test_backward_split_sums_under_load[tuned]
  --deselect tests/test_verify.py::test_demo_gpu
  --deselect tests/test_hostile.py::test_64_bit_offsets_in_the_interpreter}"
# PEFT's default (bf16 base, fp32 adapters) at a real size (TMA path) and an odd one (pointer path), on
# fixed tiles like the benchmark (tuning would compile every config of each kernel: minutes); --partial:
# the partial-gradient cases (frozen adapter, first layer, LoRA-FA + bias, biases) at the odd size.
: "${VERIFY_ARGS:=--backend triton --backend cuda --dtype bf16+fp32a --only-shapes --shape 2048,4096,14336,16
  --shape 67,203,130,1 -p 0 -p 0.1 --mask-mode bitmask --partial}"
: "${VERIFY_AUTOTUNE:=0}"
