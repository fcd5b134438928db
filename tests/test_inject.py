"""lk.add_lora / lora_state_dict / merge_lora: LoRA on a plain PyTorch model, without PEFT.

A small transformer-like model (embedding, attention through nn.MultiheadAttention, projections, MLP,
an output layer exposed as transformers' ``get_output_embeddings``), in float64 on the reference backend
(the kernels behind LoRALinear are tested in test_layer.py / test_lora_linear.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_kernels as lk
from lora_kernels import LoRALinear

D = 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)  # its out_proj subclasses nn.Linear
        self.q_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.q_proj(x), x, self.v_proj(x), need_weights=False)[0]
        return x + h + self.mlp(x)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.extra_q_proj = nn.Linear(D, D)  # "q_proj" must not match it: names match by whole components
        self.lm_head = nn.Linear(D, 50, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for block in self.layers:
            h = block(h)
        return self.lm_head(self.extra_q_proj(h))


ALL = [f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "mlp.0", "mlp.2")] + ["extra_q_proj"]


def _model(seed: int = 0) -> Model:
    torch.manual_seed(seed)
    return Model().double()


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _randomize_adapters(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, layer in lk.lora_layers(model):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
        if layer.lora_bias is not None:
            layer.lora_bias.copy_(torch.randn(layer.lora_bias.shape, generator=g, dtype=torch.float64))


def test_all_linear_wraps_the_plain_linear_layers_but_the_output_layer():
    model = _model()
    ids = _ids()
    before = model(ids)
    base_weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = lk.add_lora(model, r=4, lora_alpha=8, backend="torch")
    assert names == ALL
    assert isinstance(model.lm_head, nn.Linear) and type(model.layers[0].attn.out_proj) is not LoRALinear
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoRALinear) and layer.r == 4 and layer.scaling == 2.0
        assert layer.base_layer.weight is base_weights[name], "the base weight is shared, not copied"
    torch.testing.assert_close(model(ids), before, rtol=1e-12, atol=1e-12)  # B = 0: the model is unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in names for w in ("lora_A", "lora_B")}
    model(ids).square().sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert all(model.get_submodule(n).lora_B.grad.abs().sum() > 0 for n in names)


def test_names_regex_exclusions_and_options():
    model = _model()
    assert lk.add_lora(model, 2, target_modules=["q_proj", "v_proj"], backend="torch") == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj",
    ]  # fmt: skip
    assert isinstance(model.extra_q_proj, nn.Linear) and not isinstance(model.extra_q_proj, LoRALinear)
    # Already wrapped layers are left alone; a second call adds the rest.
    assert lk.add_lora(model, 2, target_modules=["q_proj"]) == []
    assert lk.add_lora(model, 2, target_modules=r".*\.q_proj.*") == [], "nor their base_layer (no nesting)"
    assert lk.add_lora(model, 8, exclude_modules=["mlp.2", "extra_q_proj"]) == ["layers.0.mlp.0", "layers.1.mlp.0"]
    assert model.layers[0].q_proj.r == 2 and model.layers[0].mlp[0].r == 8
    assert lk.add_lora(model, 4, exclude_modules=["extra_q_proj"]) == ["layers.0.mlp.2", "layers.1.mlp.2"]
    assert lk.add_lora(model, 4) == ["extra_q_proj"]
    assert lk.add_lora(model, 4) == [], "everything wrapped: nothing to do, no error"
    # A string excludes by regex over the whole name, as target_modules (and PEFT's exclude_modules).
    model = _model()
    assert lk.add_lora(model, 2, exclude_modules=r"layers\.1\..*|.*mlp\.2") == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.0.mlp.0", "extra_q_proj",
    ]  # fmt: skip

    model = _model()
    names = lk.add_lora(
        model, 3, target_modules=r"layers\.1\.(q|v)_proj", lora_alpha=6, lora_dropout=0.1, use_rslora=True,
        lora_bias=True, dropout_mask="regenerate", adapter_dtype=torch.float32, freeze_base=False,
    )  # fmt: skip
    assert names == ["layers.1.q_proj", "layers.1.v_proj"]
    layer = model.layers[1].q_proj
    assert (layer.lora_dropout, layer.dropout_mask, layer.lora_A.dtype) == (0.1, "regenerate", torch.float32)
    assert layer.scaling == pytest.approx(6 / 3**0.5) and layer.lora_bias is not None
    assert model.emb.weight.requires_grad, "freeze_base=False leaves the rest of the model trainable"
    assert not layer.base_layer.weight.requires_grad, "the wrapped layer's own weight is frozen"
    # The default adapter dtype follows LoRALinear: fp32 next to a bf16 base.
    model = _model().to(torch.bfloat16)
    lk.add_lora(model, 2, target_modules=["v_proj"])
    assert model.layers[0].v_proj.lora_A.dtype == torch.float32


def test_what_cannot_be_wrapped_raises_and_leaves_the_model_unchanged(monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match=r"matched 'layers.0.attn.out_proj', which cannot be wrapped: "
                                         r"NonDynamicallyQuantizableLinear is a subclass"):  # fmt: skip
        lk.add_lora(model, 2, target_modules=r"layers\.0\..*proj")
    with pytest.raises(ValueError, match="matched 'layers.0.mlp', a Sequential: only nn.Linear"):
        lk.add_lora(model, 2, target_modules=["mlp"])
    with pytest.raises(ValueError, match=r"matched no nn.Linear layer of the model \(its nn.Linear layers include: "
                                         r"layers.0.attn.out_proj, layers.0.q_proj"):  # fmt: skip
        lk.add_lora(model, 2, target_modules=["k_proj"])
    with pytest.raises(ValueError, match="matched no nn.Linear layer"):  # a regex must match the whole name
        lk.add_lora(model, 2, target_modules=r"(q|v)_proj")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lk.add_lora(model, 2, target_modules="q_proj(")
    with pytest.raises(ValueError, match="exclude_modules 'mlp\\[' is not a valid regular expression"):
        lk.add_lora(model, 2, exclude_modules="mlp[")
    with pytest.raises(ValueError, match="exclude_modules must be a regex or a list of names"):
        lk.add_lora(model, 2, exclude_modules=[None])
    for bad in ([], [""], [3]):
        with pytest.raises(ValueError, match="non-empty list of names"):
            lk.add_lora(model, 2, target_modules=bad)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lk.add_lora("model", 2)
    # A bad LoRALinear option: nothing replaced, nothing frozen.
    for kwargs in ({"r": 0}, {"r": 2, "lora_dropout": 1.0}, {"r": 2, "backend": "jax"}):
        with pytest.raises(ValueError):
            lk.add_lora(model, **kwargs)
    assert not lk.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    # A failure past the first layer (LoRALinear froze the layers built before it): flags put back.
    built = []

    class FailOnTheThird(LoRALinear):
        def __init__(self, module, r, **kwargs):
            if len(built) == 2:
                raise RuntimeError("third layer")
            super().__init__(module, r, **kwargs)
            built.append(self)

    monkeypatch.setattr(lk.inject, "LoRALinear", FailOnTheThird)
    with pytest.raises(RuntimeError, match="third layer"):
        lk.add_lora(model, 2)
    assert len(built) == 2 and not lk.lora_layers(model) and all(p.requires_grad for p in model.parameters())
    # A bare nn.Linear is the model itself, not a layer of it: use LoRALinear directly.
    with pytest.raises(ValueError, match="matched no nn.Linear layer"):
        lk.add_lora(nn.Linear(4, 4), 2)


def test_state_dict_round_trip_and_merge_for_inference():
    model = _model()
    lk.add_lora(model, 4, lora_bias=True, backend="torch")
    _randomize_adapters(model)
    model.eval()
    ids = _ids()
    expected = model(ids)
    sd = lk.lora_state_dict(model)
    assert set(sd) == {f"{n}.{w}" for n in ALL for w in ("lora_A", "lora_B", "lora_bias")}
    assert set(sd) <= set(model.state_dict())
    # Into a fresh model with the same base weights and new adapters.
    other = _model()
    lk.add_lora(other, 4, lora_bias=True, backend="torch")
    other.eval()
    assert (other(ids) - expected).abs().max() > 1e-3
    missing, unexpected = other.load_state_dict(sd, strict=False)
    assert not unexpected and not any("lora" in k for k in missing)
    torch.testing.assert_close(other(ids), expected, rtol=0, atol=0)

    # lora_bias needs a base bias to merge into (v_proj has none): merge raises before changing anything.
    with pytest.raises(RuntimeError, match="cannot merge layers.0.v_proj: it has a lora_bias and its base layer no"):
        lk.merge_lora(model, unload=True)
    assert not any(layer.merged for _, layer in lk.lora_layers(model)) and len(lk.lora_layers(model)) == len(ALL)
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
    model = _model()
    lk.add_lora(model, 4, backend="torch")
    _randomize_adapters(model)
    model.eval()
    expected = model(ids)
    assert lk.merge_lora(model) == len(ALL)
    assert all(layer.merged for _, layer in lk.lora_layers(model))
    torch.testing.assert_close(model(ids), expected, rtol=1e-12, atol=1e-12)
    assert lk.merge_lora(model, unload=True) == len(ALL)  # merging again is a no-op; then unload
    assert not lk.lora_layers(model) and all(type(model.get_submodule(n)) is nn.Linear for n in ALL)
    torch.testing.assert_close(model(ids), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        lk.merge_lora(LoRALinear(nn.Linear(4, 4), 2), unload=True)


def test_a_wrapped_model_trains_under_dropout_on_the_triton_interpreter():
    """The same helper with the kernel backend: a training step of the wrapped model on the Triton
    backend (CPU interpreter) gives the reference backend's loss and adapter gradients."""
    pytest.importorskip("triton")
    from lora_kernels.backends import interpret_mode

    if not interpret_mode() and not torch.cuda.is_available():
        pytest.skip("the Triton backend needs a GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grads = {}
    for backend in ("torch", "triton"):
        model = _model().float().to(device)
        lk.add_lora(model, 4, lora_dropout=0.25, target_modules=["q_proj", "mlp.0"], backend=backend)
        _randomize_adapters(model)
        torch.manual_seed(5)  # the per-call dropout seeds: the same draws for both backends
        loss = model(_ids().to(device)).float().square().mean()
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (l0, g0), (l1, g1) = grads["torch"], grads["triton"]
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == 8
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-4, msg=n)


def test_a_layer_shared_under_two_names_gets_one_adapter_at_both():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a  # the same module at two names (weights shared between blocks)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Shared().double()
    assert lk.add_lora(model, 2, backend="torch") == ["a"]
    assert isinstance(model.a, LoRALinear) and model.b is model.a
    _randomize_adapters(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = model(x)
    assert set(lk.lora_state_dict(model)) == {"a.lora_A", "a.lora_B"}
    lk.merge_lora(model, unload=True)
    assert type(model.a) is nn.Linear and model.b is model.a
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_add_lora_options_mirror_lora_linear():
    """add_lora spells out LoRALinear's options (for the reader and the IDE): same names, same defaults."""
    import inspect

    layer = dict(inspect.signature(LoRALinear.__init__).parameters)
    helper = dict(inspect.signature(lk.add_lora).parameters)
    for name in ("self", "base", "r"):
        layer.pop(name)
    assert {n: p.default for n, p in layer.items()} == {n: helper[n].default for n in layer}
