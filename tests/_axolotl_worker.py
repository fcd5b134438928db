"""Axolotl's config and model loading with lora_kernels' plugin, in a process of its own (tests/test_axolotl.py).

Axolotl patches transformers and torch as it loads a model and keeps its plugins in a process-wide
singleton, so the suite runs it here rather than in pytest's process.

    python -m tests._axolotl_worker OUT.pt SCENARIOS.json

Each scenario (a dict) gives the config's extra keys (``cfg``, the plugin included or not) and
``stop``: "validate" (Axolotl's config steps only) or "load" (then ``ModelLoader`` builds the PEFT model
from a tiny Llama saved here, and one forward and backward runs on it). The results, one dict per
scenario, go to OUT.pt: the validated kernel flags, or the error raised; after "load" the LoRA Linear
layers' patch state, the fused calls made, the loss, the logits and the LoRA gradients.

It follows ``axolotl.cli.config.load_cfg``'s steps (prepare_plugins, validate_config with capabilities,
normalize_config, the plugin manager's cfg) without importing ``axolotl.cli``, whose imports need numba.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # no telemetry (and no network waits) from the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from axolotl.integrations.base import PluginManager  # noqa: E402
from axolotl.utils.config import normalize_config, prepare_plugins, validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

import lora_kernels.integrations.peft as lkp  # noqa: E402
from tests.test_peft import VOCAB, _llama  # noqa: E402
from tests.test_trl import _tokenizer  # noqa: E402

KERNEL_KEYS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")
# What the CLI passes on a one-GPU Hopper machine (axolotl.cli.config.gpu_capabilities): Axolotl
# switches its own LoRA kernels on only when it has capabilities.
CAPABILITIES = {"bf16": False, "fp8": False, "tf32": False, "n_gpu": 1, "compute_capability": "sm_90"}
ENV_CAPABILITIES = {"torch_version": torch.__version__.split("+", 1)[0]}


def _config(model_dir: str, out_dir: str, extra: dict) -> DictDefault:
    raw = {
        "base_model": model_dir, "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_linear": True, "datasets": [{"path": "unused", "type": "alpaca"}], "sequence_len": 32,
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "num_epochs": 1, "learning_rate": 1e-3,
        "output_dir": out_dir,
    } | extra  # fmt: skip
    path = os.path.join(out_dir, "config.yml")
    with open(path, "w") as f:  # through YAML, as a user's config arrives
        yaml.safe_dump(raw, f)
    with open(path) as f:
        return DictDefault(yaml.safe_load(f))


def _validated(cfg: DictDefault) -> DictDefault:
    prepare_plugins(cfg)
    try:
        cfg = validate_config(cfg, capabilities=CAPABILITIES, env_capabilities=ENV_CAPABILITIES)
    except Exception:
        if cfg.get("plugins"):  # as load_cfg does: plugins undo what register() did
            PluginManager.get_instance().on_config_validation_error(cfg)
        raise
    normalize_config(cfg)
    if cfg.get("plugins"):
        PluginManager.get_instance().cfg = cfg
    return cfg


def _fill_adapters(model: torch.nn.Module) -> None:
    """Nonzero LoRA weights, the same in every scenario (PEFT's B = 0 would make the check vacuous)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _load_and_step(cfg: DictDefault) -> dict:
    from axolotl.loaders.model import ModelLoader
    from axolotl.loaders.tokenizer import load_tokenizer

    model, _ = ModelLoader(cfg, load_tokenizer(cfg)).load()
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]  # lora.Linear, or bnb.Linear4bit (QLoRA)
    _fill_adapters(model)
    model.train()
    calls = []
    real = lkp.lora_linear

    def spy(*args, **kwargs):
        calls.append((kwargs.get("backend"), kwargs.get("dropout_mask"), kwargs.get("dropout_p")))
        return real(*args, **kwargs)

    lkp.lora_linear = spy
    try:
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, VOCAB - 3, (2, 16), generator=g)
        torch.manual_seed(3)  # the fused layers' dropout seeds come from torch's generator
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    finally:
        lkp.lora_linear = real
    return {
        "model_class": type(model).__name__,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "torch_dtype": str(cfg.torch_dtype),
        "layer_classes": sorted({type(m).__name__ for m in layers}),
        "n_layers": len(layers),
        "patched": [bool(m.__dict__.get("_lk_patched")) for m in layers],
        "options": sorted({(m.__dict__.get("_lk_backend"), m.__dict__.get("_lk_dropout_mask")) for m in layers}),
        "fallbacks": [m.__dict__.get("_lk_last_fallback") for m in layers],
        "calls": calls,
        "mlp_forward_replaced": any("forward" in layer.mlp.__dict__ for layer in model.base_model.model.model.layers),
        "loss": out.loss.detach().double(),
        "logits": out.logits.detach().double(),
        "grads": {n: p.grad.double() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None},
    }


def run(scenario: dict, model_dir: str, work: str) -> dict:
    out_dir = tempfile.mkdtemp(prefix="out-", dir=work)
    raw = _config(model_dir, out_dir, scenario["cfg"])
    try:
        cfg = _validated(raw)
    except Exception as e:  # noqa: BLE001 - the error is the result
        # and what the plugin left in the user's config after it (register() writes there)
        return {"error": f"{type(e).__name__}: {e}", "raw_flags_after": {k: raw[k] for k in KERNEL_KEYS if k in raw}}
    result = {"flags": {k: cfg.get(k) for k in KERNEL_KEYS}}
    if scenario["stop"] == "load":
        result |= _load_and_step(cfg)
    return result


def main(out: str, scenarios_json: str) -> None:
    with open(scenarios_json) as f:
        scenarios = json.load(f)
    work = os.path.dirname(os.path.abspath(out))  # everything it writes goes beside OUT
    model_dir = tempfile.mkdtemp(prefix="model-", dir=work)
    _llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    torch.save({name: run(s, model_dir, work) for name, s in scenarios.items()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
