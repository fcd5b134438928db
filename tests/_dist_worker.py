"""One rank of tests/test_distributed.py: a patched PEFT model trained one step under DDP or FSDP2.

Started by ``torch.multiprocessing.spawn`` (a module-level function, so spawn can import it). Each
rank builds the same tiny Llama (same seed), patches it, wraps it, runs its own slice of the batch
with its own dropout seed, and saves the logits and the *reduced* gradients (FSDP2's sharded
gradients gathered to full tensors) for the parent to compare with single-process runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def rank_step(model: torch.nn.Module, rank: int, device: str) -> torch.Tensor:
    """Rank ``rank``'s training step: its sequence of the batch, its CPU RNG seed (the dropout seeds are
    drawn from it), loss ``sum(logits * gy)``, backward. Returns the logits. The parent runs the same
    step on an unwrapped model."""
    from tests.test_peft import _ids

    ids = _ids()[rank : rank + 1].to(device)
    torch.manual_seed(100 + rank)
    logits = model(input_ids=ids).logits
    gy = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (logits * gy.to(device, logits.dtype)).sum().backward()
    return logits


def add_lora_llama(p: float, backend: str) -> torch.nn.Module:
    """The tiny Llama with ``lk.add_lora`` instead of PEFT (the own-stack path): LoRALinear layers on every
    linear but lm_head, B random (from its own generator: every rank builds the same model)."""
    import lora_kernels as lk
    from tests.test_peft import _llama

    model = _llama(0)
    lk.add_lora(model, 8, lora_alpha=16, lora_dropout=p, backend=backend)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def run_rank(rank: int, world: int, init_file: str, out_dir: str, case: dict) -> None:
    # Each rank is one process on a 2-core machine: one intra-op thread each, as torchrun sets.
    torch.set_num_threads(1)
    device = case["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
    store = dist.FileStore(init_file, world)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    try:
        _train_step(rank, world, Path(out_dir), case)
        # Every rank past its last collective before any closes its connections: a rank that tears its
        # process group down while a peer still reads the last all-gather can abort that peer (seen once
        # on CI: "terminate called without an active exception"). The file store is no gloo connection.
        store.set(f"done{rank}", "1")
        store.wait([f"done{r}" for r in range(world)])
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: process-group and thread-pool destructors racing at exit
    # can abort a process whose work is done (this module runs no C++ of ours). An exception above
    # still propagates and fails the spawn.
    os._exit(0)


def _train_step(rank: int, world: int, out: Path, case: dict) -> None:
    from peft.tuners.lora import Linear as PeftLoraLinear
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from lora_kernels import LoRALinear
    from lora_kernels.integrations import patch
    from tests.test_peft import _peft_model

    device = case["device"]
    own = case.get("model") == "add_lora"
    model = (add_lora_llama(case["p"], case["backend"]) if own else _peft_model(lora_dropout=case["p"])).to(device)
    if not case["patch_after_wrap"] and not own:
        patch(model, backend=case["backend"], log=False)
    if case["wrapper"] == "ddp":
        model = DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
    else:  # FSDP2, as accelerate/TRL apply it: each decoder layer, then the root
        mesh = init_device_mesh(device, (world,))
        for layer in (model.model if own else model.base_model.model.model).layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if case["patch_after_wrap"]:
        report = patch(model, backend=case["backend"], log=False)
        assert len(report.accelerated) == case["n_linear"], str(report)
    model.train()

    logits = rank_step(model, rank, device)

    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name.removeprefix("module.")] = g.detach().cpu()
    if own:  # LoRALinear has no fallback: every layer runs lora_linear
        lins = [m for m in model.modules() if isinstance(m, LoRALinear)]
        fallbacks = {None}
    else:
        lins = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
        # Every LoRA Linear ran, and ran fused (a fallback leaves its reason here).
        fallbacks = {m.__dict__.get("_lk_last_fallback", "never called") for m in lins}
    torch.save({"logits": logits.detach().cpu(), "grads": grads, "fallbacks": fallbacks, "n": len(lins)},
               os.path.join(out, f"rank{rank}.pt"))  # fmt: skip
