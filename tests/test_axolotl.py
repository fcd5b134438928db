"""Axolotl through lora_kernels' plugin (``lora_kernels.integrations.axolotl``): Axolotl's own config
validation and ``ModelLoader`` on a tiny Llama, in a subprocess (tests/_axolotl_worker.py), compared
with the same model on PEFT's own layers. Training after loading is transformers' Trainer, tested over
patched models in tests/test_peft.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("axolotl", reason="the Axolotl plugin tests need axolotl installed")
pytest.importorskip("trl", reason="the Axolotl worker builds its tokenizer with tests/test_trl.py's helper")

from tests._utils import HAS_CUDA, INTERPRET, assert_close_ref  # noqa: E402
from tests.test_peft import N_LINEAR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "lora_kernels.integrations.axolotl.LoraKernelsPlugin"
OFF = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
TRITON = "triton" if (INTERPRET or HAS_CUDA) else None
QLORA = {"adapter": "qlora", "load_in_4bit": True}
REGENERATE_P01 = {"lora_dropout": 0.1, "lora_kernels_dropout_mask": "regenerate"}

SCENARIOS = {
    # Axolotl's default: its own kernels on (what the plugin has to prevent)
    "no_plugin": {"cfg": {}, "stop": "validate"},
    # PEFT's own layers, Axolotl's kernels off by hand: the reference for the plugin's runs
    "peft": {"cfg": OFF, "stop": "load"},
    "peft_p01": {"cfg": OFF | {"lora_dropout": 0.1}, "stop": "load"},
    "plugin": {"cfg": {"plugins": [PLUGIN], "lora_kernels_backend": TRITON or "torch"}, "stop": "load"},
    "plugin_p01_ref": {"cfg": REGENERATE_P01 | {"plugins": [PLUGIN], "lora_kernels_backend": "torch"}, "stop": "load"},
    "plugin_p01": {
        "cfg": REGENERATE_P01 | {"plugins": [PLUGIN], "lora_kernels_backend": TRITON or "torch"},
        "stop": "load",
    },
    "explicit_on": {"cfg": {"plugins": [PLUGIN], "lora_qkv_kernel": True}, "stop": "validate"},
    "explicit_off": {"cfg": {"plugins": [PLUGIN], "lora_mlp_kernel": False}, "stop": "validate"},
    "bad_backend": {"cfg": {"plugins": [PLUGIN], "lora_kernels_backend": "tpu"}, "stop": "validate"},
    # QLoRA: Axolotl's 4-bit base (bitsandbytes' CPU ops here), PEFT's lora.bnb.Linear4bit layers
    "qlora_peft": {"cfg": QLORA | OFF, "stop": "load"},
    "qlora_plugin": {"cfg": QLORA | {"plugins": [PLUGIN], "lora_kernels_backend": TRITON or "torch"}, "stop": "load"},
    # after the plugin's configs, in the same process: a config without it is left alone
    "no_plugin_after": {"cfg": OFF, "stop": "load"},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("axolotl")
    (tmp / "scenarios.json").write_text(json.dumps(SCENARIOS))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = os.environ | {"PYTHONPATH": path, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests._axolotl_worker", str(tmp / "out.pt"), str(tmp / "scenarios.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(tmp / "out.pt", weights_only=False)


def test_axolotl_switches_its_own_lora_kernels_on_by_default(results) -> None:
    """Without the plugin, Axolotl (with a GPU's capabilities) turns on its LoRA kernels, which bypass the
    PEFT layers' forward: what the plugin has to switch off."""
    assert results["no_plugin"]["flags"] == dict.fromkeys(
        ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel"], True
    )


def test_plugin_keeps_axolotls_kernels_off(results) -> None:
    for name in ("plugin", "plugin_p01", "explicit_off"):
        flags = results[name]["flags"]
        assert [flags[k] for k in OFF] == [False] * 3, (name, flags)
        assert flags["lora_embedding_kernel"] is None, (name, flags)  # not the plugin's to set


def _assert_fused_everywhere(res: dict, backend: str, mask: str, p: float, layer: str = "Linear") -> None:
    assert res["model_class"] == "PeftModelForCausalLM" and res["layer_classes"] == [layer]
    assert res["n_layers"] == N_LINEAR and res["patched"] == [True] * N_LINEAR
    assert res["options"] == [(backend, mask)]
    assert res["fallbacks"] == [None] * N_LINEAR
    assert res["calls"] == [(backend, mask, p)] * N_LINEAR  # each layer's forward ran fused, once
    assert not res["mlp_forward_replaced"]


def _assert_same_step(res: dict, ref: dict) -> None:
    # Axolotl loads the base in fp16 here (no bf16 in the capabilities given) and keeps the adapters in
    # fp32, PEFT's default: the step's outputs carry fp16 rounding.
    assert res["torch_dtype"] == ref["torch_dtype"] == "torch.float16"
    assert res["dtypes"] == ref["dtypes"] and {"torch.float16", "torch.float32"} <= set(ref["dtypes"])
    dt = [torch.float16, torch.float32]
    assert_close_ref(res["logits"], ref["logits"], dt, "logits")
    assert_close_ref(res["loss"], ref["loss"], dt, "loss")
    assert res["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) == 2 * N_LINEAR
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, f"{name}: no gradient in the reference run"
        assert_close_ref(res["grads"][name], g, dt, name)


def test_plugin_fuses_every_lora_linear_and_matches_peft(results) -> None:
    """ModelLoader with the plugin: all 14 LoRA Linears of the tiny Llama patched with the config's
    backend, each forward fused; logits, loss and every LoRA gradient as on PEFT's own layers (p = 0)."""
    ref = results["peft"]
    assert ref["patched"] == [False] * N_LINEAR and ref["calls"] == []
    _assert_fused_everywhere(results["plugin"], TRITON or "torch", "bitmask", 0.0)
    _assert_same_step(results["plugin"], ref)


def test_plugin_options_reach_the_fused_layers_with_dropout(results) -> None:
    """p = 0.1 and ``lora_kernels_dropout_mask: regenerate``: the config's backend and mask mode reach every
    layer; the Triton backend's step matches the reference backend's (the same Philox masks). PEFT's own
    masks differ, so against PEFT only the loss is close, not equal."""
    _assert_fused_everywhere(results["plugin_p01_ref"], "torch", "regenerate", 0.1)
    _assert_fused_everywhere(results["plugin_p01"], TRITON or "torch", "regenerate", 0.1)
    _assert_same_step(results["plugin_p01"], results["plugin_p01_ref"])
    assert not torch.equal(results["plugin_p01_ref"]["logits"], results["peft_p01"]["logits"])  # dropout ran


def test_plugin_fuses_axolotls_qlora_layers(results) -> None:
    """``adapter: qlora`` with ``load_in_4bit``: PEFT's bitsandbytes 4-bit LoRA layers, fused as
    ``lk.patch`` fuses them (the weight dequantized per call), matching PEFT's own step."""
    ref = results["qlora_peft"]
    assert ref["layer_classes"] == ["Linear4bit"] and ref["calls"] == []
    _assert_fused_everywhere(results["qlora_plugin"], TRITON or "torch", "bitmask", 0.0, layer="Linear4bit")
    _assert_same_step(results["qlora_plugin"], ref)


def test_plugin_refuses_axolotls_kernels_set_on(results) -> None:
    err = results["explicit_on"]["error"]
    assert err.startswith("ValueError") and "lora_qkv_kernel is set to true" in err and "false" in err, err


def test_plugin_args_are_validated_and_a_rejected_config_is_restored(results) -> None:
    res = results["bad_backend"]
    assert "lora_kernels_backend" in res["error"] and "tpu" in res["error"], res["error"]
    # the keys register() set to false are gone again from the user's config (load_cfg's contract)
    assert res["raw_flags_after"] == {}, res


def test_a_later_config_without_the_plugin_is_left_alone(results) -> None:
    """Axolotl's plugin manager outlives a config; the plugin acts only on configs that list it."""
    res = results["no_plugin_after"]
    assert res["patched"] == [False] * N_LINEAR and res["calls"] == []
    _assert_same_step(res, results["peft"])
