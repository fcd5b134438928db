# lora_kernels developer commands. Each target sets up .venv itself on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo lint gpu-check gpu-check-short device-prebuild device-preflight bench-dry wheel clean

setup:
	bash scripts/setup_env.sh

test: setup
	bash scripts/run_tests.sh

demo: setup
	$(PY) -m lora_kernels demo

lint: setup
	$(VENV)/bin/ruff check lora_kernels tests bench scripts setup.py
	$(VENV)/bin/ruff format --check lora_kernels tests bench scripts setup.py

gpu-check:
	bash scripts/gpu_check.sh

# The 15-minute device session: 6 minutes of checks, table last (bench/NOTES.md, "Runbook").
gpu-check-short:
	GPU_CHECK_PLAN=short bash scripts/gpu_check.sh

# Here, before a device session: the extension for the device image, its Triton kernels (compiled
# without a GPU) and CUTLASS, to carry there.
device-prebuild:
	bash scripts/device_prebuild.sh

# Right before a device call (no GPU, seconds): .device/ matches the committed sources and the plan.
device-preflight:
	python3 scripts/device_preflight.py

bench-dry: setup
	$(PY) -m bench.lora_linear --dry
	$(PY) bench/e2e_peft.py --dry

wheel: setup
	bash scripts/build_wheels.sh

clean:
	rm -rf build dist *.egg-info lora_kernels/*.so lora_kernels/_build_info.py
