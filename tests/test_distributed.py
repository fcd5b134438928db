"""Data-parallel training with patched PEFT models: DDP and FSDP2 (``fully_shard``) on two ranks.

Trainers (accelerate, TRL, Axolotl) wrap the model after the LoRA layers are built, so the fused
layers must train under the wrappers' hooks: FSDP2 swaps sharded DTensor parameters for unsharded
ones around each forward and frees them again before backward (the fused op's saved weight must
come back), and both wrappers reduce the gradients the fused backward returns. Each rank runs one
sequence with its own dropout seed; the reduced gradients must equal the mean of the same
single-process steps, and at p = 0 PEFT's own float64 model.

Two ranks run as processes on this machine (gloo on CPU; the Triton backend in its interpreter).
On a GPU machine the Triton cases need two GPUs (nccl).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("peft", reason="the distributed tests train a patched PEFT model")
pytest.importorskip("transformers", reason="the distributed tests train a patched PEFT model")

from lora_kernels.integrations import patch  # noqa: E402
from tests._dist_worker import add_lora_llama, rank_step, run_rank  # noqa: E402
from tests._utils import assert_close_ref  # noqa: E402
from tests.test_peft import N_LINEAR, _ids, _peft_model  # noqa: E402

WORLD = 2
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)


def _device(backend: str) -> str:
    if backend == "torch" or INTERPRET:
        return "cpu"
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"the Triton backend on a GPU needs {WORLD} GPUs for nccl ranks (the interpreter runs it on CPU)")
    return "cuda"


def _spawn(tmp_path, case: dict) -> list[dict]:
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(run_rank, args=(WORLD, str(tmp_path / "init"), str(out), case), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(case: dict, model_fn) -> tuple[list[torch.Tensor], dict]:
    """Each rank's step run here, unwrapped: per-rank logits and the mean of the gradients."""
    logits, total = [], {}
    for rank in range(WORLD):
        model = model_fn()
        model.train()
        model.zero_grad(set_to_none=True)
        logits.append(rank_step(model, rank, case["device"]).detach().cpu())
        for name, p in model.named_parameters():
            if p.requires_grad:
                total[name] = total.get(name, 0) + p.grad.detach().cpu().double() / WORLD
    return logits, total


CASES = [
    # (wrapper, backend, p, patch after wrapping)
    ("ddp", "triton", 0.1, False),
    ("fsdp2", "triton", 0.1, False),
    ("fsdp2", "triton", 0.0, False),
    ("fsdp2", "torch", 0.1, True),
]


@pytest.mark.parametrize(
    "wrapper, backend, p, patch_after_wrap", CASES, ids=["ddp-triton-p0.1", "fsdp2-triton-p0.1",
                                                        "fsdp2-triton-p0", "fsdp2-torch-p0.1-patch-after"]
)  # fmt: skip
def test_data_parallel_step_matches_single_process(tmp_path, wrapper, backend, p, patch_after_wrap) -> None:
    case = {"wrapper": wrapper, "backend": backend, "p": p, "patch_after_wrap": patch_after_wrap,
            "device": _device(backend), "n_linear": N_LINEAR}  # fmt: skip
    ranks = _spawn(tmp_path, case)

    for r in ranks:
        assert r["n"] == N_LINEAR, r["n"]
        assert r["fallbacks"] == {None}, r["fallbacks"]  # every LoRA Linear ran fused on every rank

    def patched():
        model = _peft_model(lora_dropout=p).to(case["device"])
        patch(model, backend=backend, log=False)
        return model

    # The same fused steps without a wrapper: the same dropout masks (seeds drawn from the same RNG
    # state), so the reduced gradients differ only by the order of the reduction's sum.
    ref_logits, ref_grads = _single_process(case, patched)
    assert ranks[0]["grads"].keys() == ref_grads.keys() and len(ref_grads) == 2 * N_LINEAR
    for rank, r in enumerate(ranks):
        assert_close_ref(r["logits"], ref_logits[rank], [torch.float32], f"rank {rank} logits")
    for name, g in ranks[0]["grads"].items():
        assert_close_ref(g, ref_grads[name], [torch.float32], name)
        torch.testing.assert_close(ranks[1]["grads"][name], g, rtol=0, atol=0, msg=f"{name}: ranks disagree")

    if p == 0:  # and the truth: PEFT's own layers in float64
        base = _peft_model(lora_dropout=0.0)
        _, peft_grads = _single_process({**case, "device": "cpu"}, lambda: copy.deepcopy(base).double())
        for name, g in ranks[0]["grads"].items():
            assert_close_ref(g, peft_grads[name], [torch.float32], f"{name} vs PEFT float64")


@pytest.mark.parametrize("wrapper", ["fsdp2", "ddp"])
def test_add_lora_model_trains_under_data_parallel(tmp_path, wrapper) -> None:
    """The own-stack path (``lk.add_lora``, LoRALinear layers, no PEFT) under FSDP2 and DDP: the reduced
    gradients equal the mean of the unwrapped single-process steps."""
    case = {"wrapper": wrapper, "backend": "triton", "p": 0.1, "patch_after_wrap": False,
            "device": _device("triton"), "n_linear": N_LINEAR, "model": "add_lora"}  # fmt: skip
    ranks = _spawn(tmp_path, case)
    assert all(r["n"] == N_LINEAR for r in ranks)
    ref_logits, ref_grads = _single_process(case, lambda: add_lora_llama(0.1, "triton").to(case["device"]))
    assert ranks[0]["grads"].keys() == ref_grads.keys() and len(ref_grads) == 2 * N_LINEAR
    for rank, r in enumerate(ranks):
        assert_close_ref(r["logits"], ref_logits[rank], [torch.float32], f"rank {rank} logits")
    for name, g in ranks[0]["grads"].items():
        assert g.abs().max() > 0, name
        assert_close_ref(g, ref_grads[name], [torch.float32], name)
        torch.testing.assert_close(ranks[1]["grads"][name], g, rtol=0, atol=0, msg=f"{name}: ranks disagree")


def test_tensor_parallel_layers_take_peft_path(tmp_path) -> None:
    """Tensor parallelism leaves DTensor weights in the forward, which the fused op does not shard:
    each such call goes to PEFT's forward, with the reason recorded, and computes what PEFT does."""
    from peft.tuners.lora import Linear as PeftLoraLinear
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = _peft_model()
        lins = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
        for lin in lins:  # the base layers column-parallel, as a TP plan would shard q/k/v/gate/up
            parallelize_module(lin.base_layer, mesh, ColwiseParallel())
        ref = model(input_ids=_ids()).logits.detach()
        report = patch(model, backend="torch", log=False)
        # Patched, and reported on PEFT's path: parallelize_module hooks the base layers.
        assert len(report.patched) == N_LINEAR and not report.accelerated, str(report)
        assert all("hooks" in why for why in report.fallback.values()), str(report)
        out = model(input_ids=_ids()).logits.detach()
        assert all("tensor parallelism" in (m._lk_last_fallback or "") for m in lins)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
