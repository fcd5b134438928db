"""lk.save_peft_adapter / lk.load_peft_adapter: PEFT's adapter files both ways, checked against PEFT itself.

The model is test_inject's (float64, reference backend); PEFT loads what we write and writes what we
load, and the outputs must agree to float64 rounding.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

import lora_kernels as lk
from lora_kernels import LoRALinear
from tests.test_inject import _ids, _model, _randomize_adapters

peft = pytest.importorskip("peft", reason="peft is not installed: the file-format checks load with PEFT itself")


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _ours(lora_bias=True):
    """Mixed ranks and alphas, rsLoRA, a lora_bias on some layers only, random adapters."""
    model = _model()
    lk.add_lora(model, 4, target_modules=["q_proj", "v_proj"], lora_alpha=8, use_rslora=True, lora_bias=lora_bias,
                lora_dropout=0.1, backend="torch")  # fmt: skip
    lk.add_lora(model, 8, target_modules=["mlp.0"], lora_alpha=16, use_rslora=True, backend="torch", freeze_base=False)
    lk.add_lora(model, 4, target_modules=["mlp.2"], lora_alpha=3, use_rslora=True, backend="torch", freeze_base=False)
    _randomize_adapters(model)
    return model.eval()


def test_peft_loads_what_we_save(tmp_path):
    model = _ours()
    ids = _ids()
    expected = model(ids)
    assert (expected - _model()(ids)).abs().max() > 0.1, "the adapters change the output"
    out = lk.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["lora_bias"]) == (4, 8.0, True, True)
    assert config["rank_pattern"] == {"layers.0.mlp.0": 8, "layers.1.mlp.0": 8}
    assert config["alpha_pattern"] == {"layers.0.mlp.0": 16.0, "layers.1.mlp.0": 16.0,
                                       "layers.0.mlp.2": 3.0, "layers.1.mlp.2": 3.0}  # fmt: skip
    assert config["lora_dropout"] == 0.1 and config["base_model_name_or_path"] == "tiny"
    loaded = peft.PeftModel.from_pretrained(_model(), out).eval()
    _close(loaded(ids), expected)
    # PEFT built the same layers: ranks, scalings, and the bias where we had none is zero.
    for name, layer in lk.lora_layers(model):
        peft_layer = loaded.base_model.model.get_submodule(name)
        assert peft_layer.r["default"] == layer.r and peft_layer.scaling["default"] == pytest.approx(layer.scaling)
        if layer.lora_bias is None:
            assert torch.count_nonzero(peft_layer.lora_B["default"].bias) == 0


def test_we_load_what_peft_saves(tmp_path):
    base = _model()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "mlp.2"], rank_pattern={"mlp.2": 6}, alpha_pattern={"q_proj": 3},
        use_rslora=True, lora_bias=True, lora_dropout=0.2,
    )  # fmt: skip
    peft_model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    peft_model.eval()
    ids = _ids()
    expected = peft_model(ids)
    assert (expected - _model()(ids)).abs().max() > 0.1, "the adapters change the output"
    peft_model.save_pretrained(tmp_path)

    model = _model()
    names = lk.load_peft_adapter(model, tmp_path, backend="torch", dropout_mask="regenerate")
    assert sorted(names) == sorted(f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "mlp.2"))
    q, m2 = model.layers[1].q_proj, model.layers[1].mlp[2]
    assert (q.r, q.lora_alpha, m2.r, m2.lora_alpha) == (4, 3.0, 6, 8.0)
    assert q.use_rslora and q.lora_bias is not None and q.lora_dropout == 0.2 and q.dropout_mask == "regenerate"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in names for w in ("lora_A", "lora_B", "lora_bias")}
    _close(model.eval()(ids), expected)

    # And back out again: PEFT reads our copy of its adapter as it read its own.
    lk.save_peft_adapter(model, tmp_path / "again")
    _close(peft.PeftModel.from_pretrained(_model(), tmp_path / "again").eval()(ids), expected)


def test_torch_bin_when_safetensors_is_missing(tmp_path, monkeypatch):
    model = _ours(lora_bias=False)
    ids = _ids()
    expected = model(ids)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import raises ImportError
    out = lk.save_peft_adapter(model, tmp_path)
    assert (out / "adapter_model.bin").is_file() and not (out / "adapter_model.safetensors").exists()
    monkeypatch.delitem(sys.modules, "safetensors.torch")
    fresh = _model()
    lk.load_peft_adapter(fresh, out, backend="torch")
    _close(fresh.eval()(ids), expected)
    assert all(layer.lora_bias is None for _, layer in lk.lora_layers(fresh))
    # Saving again with safetensors present replaces the .bin (one weights file per directory).
    lk.save_peft_adapter(model, out)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "adapter_model.bin").exists()


def test_what_cannot_be_saved_or_loaded_says_why(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        lk.save_peft_adapter(_model(), tmp_path)
    with pytest.raises(ValueError, match="is itself a LoRALinear"):
        lk.save_peft_adapter(LoRALinear(torch.nn.Linear(4, 4), 2), tmp_path)
    mixed = _model()
    lk.add_lora(mixed, 2, target_modules=["q_proj"], use_rslora=True)
    lk.add_lora(mixed, 2, target_modules=["v_proj"], freeze_base=False)
    with pytest.raises(ValueError, match="mix rsLoRA and plain scaling"):
        lk.save_peft_adapter(mixed, tmp_path)

    good = tmp_path / "good"
    lk.save_peft_adapter(_ours(), good)
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, **changes):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
        return d

    cases = [
        (variant("dora", use_dora=True), "use_dora=True is not supported"),
        (variant("ia3", peft_type="IA3"), "a IA3 adapter, not LoRA"),
        (variant("saved", modules_to_save=["lm_head"]), "modules_to_save"),
        (variant("rank", rank_pattern={}), "'layers.0.mlp.0' has rank 8, the config 4"),
    ]
    for directory, message in cases:
        model = _model()
        with pytest.raises(ValueError, match=message):
            lk.load_peft_adapter(model, directory)
        assert not lk.lora_layers(model)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "adapter_model.safetensors"))
    for name, extra, message in [
        ("emb", {"base_model.model.emb.lora_embedding_A": torch.zeros(2, 50)}, "not a LoRA Linear weight"),
        ("missing", {"base_model.model.nope.lora_A.weight": torch.zeros(4, 32),
                     "base_model.model.nope.lora_B.weight": torch.zeros(32, 4)}, "targets 'nope', which the model"),
        ("attn", {"base_model.model.layers.0.attn.out_proj.lora_A.weight": torch.zeros(4, 32),
                  "base_model.model.layers.0.attn.out_proj.lora_B.weight": torch.zeros(32, 4)},
         "a NonDynamicallyQuantizableLinear, not an nn.Linear"),
        ("half", {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, "needs lora_A.weight and lora_B"),
    ]:  # fmt: skip
        d = variant(name)
        save_file({**tensors, **extra}, str(d / "adapter_model.safetensors"))
        model = _model()
        with pytest.raises(ValueError, match=message):
            lk.load_peft_adapter(model, d)
        assert not lk.lora_layers(model)
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors or adapter_model.bin"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(config))
        lk.load_peft_adapter(_model(), tmp_path / "empty")


def _assert_same_step(peft_model, ours, ids, n_layers: int) -> None:
    """One training step (loss = mean of the squared logits) of PEFT's model and ours: the same logits and
    the same gradient for every adapter matrix (PEFT's parameter names mapped onto ours)."""
    steps = []
    for model in (peft_model, ours):
        model.train()  # lora_dropout 0: training mode changes nothing but autograd
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        g = {n.replace("base_model.model.", "").replace(".default", "").replace(".weight", ""): p.grad
             for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip
        steps.append({**g, "logits": logits.detach()})
    assert steps[0].keys() == steps[1].keys() and len(steps[0]) == 1 + 2 * n_layers
    for key in steps[0]:
        _close(steps[1][key], steps[0][key])


def test_a_transformers_llama_matches_peft_outputs_and_gradients(tmp_path):
    """A PEFT adapter on a (tiny, random) Llama loaded onto the plain model: same logits and the same
    adapter gradients as PEFT's own model; and ``add_lora``'s "all-linear" picks PEFT's layers."""
    pytest.importorskip("transformers", reason="the Llama check needs transformers")
    from tests.test_peft import _ids as llama_ids
    from tests.test_peft import _llama, _peft_model

    peft_model = _peft_model(dtype=torch.float64, use_rslora=True)  # all-linear, random A and B
    ids = llama_ids()
    peft_model.save_pretrained(tmp_path)
    ours = _llama(0, torch.float64)
    names = lk.load_peft_adapter(ours, tmp_path, backend="torch")
    assert len(names) == 14 and sorted(names) == sorted(lk.add_lora(_llama(0), 8, backend="torch"))

    _assert_same_step(peft_model, ours, ids, n_layers=14)


def test_gpt2_conv1d_adapters_both_ways(tmp_path):
    """GPT-2's projections are transformers' Conv1D (weight stored (K, N), PEFT's fan_in_fan_out): a PEFT
    adapter loads onto the plain model with the same logits and adapter gradients, add_lora picks the
    same layers, and PEFT loads what we save."""
    pytest.importorskip("transformers", reason="the GPT-2 check needs transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    def gpt2():
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return GPT2LMHeadModel(cfg).double()

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                             init_lora_weights=False, rank_pattern={"c_fc": 6})  # fmt: skip
    peft_model = peft.get_peft_model(gpt2(), config)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = gpt2()
    names = lk.load_peft_adapter(ours, tmp_path / "peft", backend="torch")
    assert len(names) == 8 and all(isinstance(ours.get_submodule(n).base_layer, Conv1D) for n in names)
    assert sorted(lk.add_lora(gpt2(), 4)) == sorted(names), "all-linear: the Conv1D layers, not lm_head"
    _assert_same_step(peft_model, ours, ids, n_layers=8)

    lk.save_peft_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ours").eval()
    _close(again(input_ids=ids).logits, ours.eval()(input_ids=ids).logits)
    # Merged and unloaded: the Conv1D layers again, holding the merged weights.
    expected = ours(input_ids=ids).logits
    lk.merge_lora(ours, unload=True)
    assert all(type(ours.get_submodule(n)) is Conv1D for n in names)
    _close(ours(input_ids=ids).logits, expected)
