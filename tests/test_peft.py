"""PEFT integration on a tiny random Llama (no hub): patch/unpatch, fused class, fallbacks, training."""

from __future__ import annotations

import copy
import csv
import importlib.util
import io
import logging

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="the PEFT integration tests need peft installed")
pytest.importorskip("transformers", reason="the PEFT integration tests need transformers installed")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_kernels as lk  # noqa: E402
import lora_kernels.integrations.peft as lkp  # noqa: E402
from lora_kernels.integrations import patch, register_fused_peft_module, unpatch  # noqa: E402
from tests._utils import assert_close_ref  # noqa: E402

HAS_TRITON_BACKEND = importlib.util.find_spec("triton") is not None
N_LINEAR = 14  # 2 layers x (q, k, v, o, gate, up, down)
# Explicit names for add_adapter: PEFT 0.14 does not expand "all-linear" there.
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ, VOCAB = 2, 16, 128


def _llama(seed: int = 0, dtype: torch.dtype = torch.float32, bias: bool = False) -> LlamaForCausalLM:
    """hidden 64, 2 layers, 4 heads of 16 (k/v: 2 heads -> N = 32), MLP 128, vocab 128."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        attention_bias=bias, mlp_bias=bias,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype)


def _peft_model(dtype: torch.dtype = torch.float32, bias: bool = False, seed: int = 0, **lora_kw) -> PeftModel:
    kw = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
    # init_lora_weights=False: B random too (B = 0 would make every dA zero and hide errors).
    kw.update(init_lora_weights=False)
    kw.update(lora_kw)
    return get_peft_model(_llama(seed, dtype, bias), LoraConfig(**kw))


def _ids(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _run(model: nn.Module, ids: torch.Tensor, gy: torch.Tensor | None = None):
    """Logits and the gradients of every trainable parameter for the loss sum(logits * gy)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    if gy is None:
        gy = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (logits * gy.to(logits.device, logits.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def _assert_model_close(logits, grads, ref_logits, ref_grads, dtypes) -> None:
    assert_close_ref(logits, ref_logits, dtypes, "logits")
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close_ref(grads[name], ref_grads[name], dtypes, name)


class _Spy:
    """Counts lora_linear calls made by the integration (proves the fused path ran)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[dict] = []
        self.out_dtypes: list[torch.dtype] = []
        real = lkp.lora_linear

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            out = real(*args, **kwargs)
            self.out_dtypes.append(out.dtype)
            return out

        monkeypatch.setattr(lkp, "lora_linear", spy)


def _lora_linears(model: nn.Module) -> list[PeftLoraLinear]:
    return [m for m in model.modules() if isinstance(m, PeftLoraLinear)]


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"use_rslora": True, "r": 4, "lora_alpha": 8},
        {"lora_bias": True, "bias": True},
    ],
    ids=["default", "rslora", "lora_bias"],
)
def test_patched_matches_peft_p0(case: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    case = dict(case)
    model = _peft_model(bias=case.pop("bias", False), **case)
    ref64 = copy.deepcopy(model).double()  # PEFT's own forward in float64: the truth
    ids = _ids()
    ref_logits, ref_grads = _run(ref64, ids)
    report = patch(model, backend="torch")
    assert len(report.accelerated) == N_LINEAR and not report.fallback and not report.skipped
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    assert len(spy.calls) == N_LINEAR
    assert all(m._lk_last_fallback is None for m in _lora_linears(model))
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])
    if case.get("lora_bias"):
        assert any(n.endswith("lora_B.default.bias") for n in grads)


def test_patched_layer_reads_weights_where_python_finds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The integration reads an nn.Linear's weight and bias from its instance dict, then its parameter registry
    (``_linear_attr``), as Python's lookup does for that class, without nn.Module.__getattr__. A plain tensor set in
    place of a parameter (as FSDP1's flat-parameter views are) is read from the instance dict; a base-layer subclass
    whose class defines ``weight`` (a property over another tensor) by the attribute lookup, so the fused call
    uses what PEFT's forward would."""
    torch.manual_seed(0)
    K, N, r = 24, 20, 4

    class ScaledWeightLinear(nn.Linear):  # (nn.Linear's forward: F.linear(x, self.weight, self.bias))
        @property
        def weight(self) -> torch.Tensor:  # (the class's attribute: Python finds it before the registry)
            return self._parameters["weight"] * 2.0

    def scaled(K: int, N: int) -> nn.Linear:
        lin = nn.Linear(K, N)
        lin.__class__ = ScaledWeightLinear  # (after nn.Linear registered its weight)
        return lin

    for kind in ("plain tensors", "property"):
        holder = nn.Module()
        holder.proj = nn.Linear(K, N) if kind == "plain tensors" else scaled(K, N)
        model = get_peft_model(
            holder, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False)
        )
        layer = model.base_model.model.proj
        if kind == "plain tensors":
            for lin in (layer.base_layer, layer.lora_B["default"]):
                w = lin._parameters.pop("weight").detach().clone()
                object.__setattr__(lin, "weight", w)  # (now only in the instance dict)
            assert "weight" not in layer.base_layer._parameters and "weight" in layer.base_layer.__dict__
        x = torch.randn(5, K)
        expected = layer(x).detach()  # PEFT's own forward
        patch(model, backend="torch", log=False)
        spy = _Spy(monkeypatch)
        got = layer(x).detach()
        assert len(spy.calls) == 1 and layer._lk_last_fallback is None, (kind, layer._lk_last_fallback)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=kind)
        monkeypatch.undo()


def test_fp32_adapters_under_bf16_base(monkeypatch: pytest.MonkeyPatch) -> None:
    # PEFT's default autocast_adapter_dtype=True keeps adapters in fp32 next to a bf16 base;
    # the torch backend runs bf16 correctly on CPU (the Triton interpreter does not).
    model = _peft_model(dtype=torch.bfloat16)
    lin = _lora_linears(model)[0]
    assert lin.base_layer.weight.dtype == torch.bfloat16 and lin.lora_A["default"].weight.dtype == torch.float32
    ref64 = copy.deepcopy(model).double()
    ids = _ids()
    ref_logits, ref_grads = _run(ref64, ids)
    peft_logits, peft_grads = _run(model, ids)
    patch(model, backend="torch")
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    # Each fused call returns bf16; the logits' dtype is the model's (transformers < 4.46 upcast them).
    assert len(spy.calls) == N_LINEAR and spy.out_dtypes == [torch.bfloat16] * N_LINEAR
    assert logits.dtype == peft_logits.dtype
    assert all(g.dtype == torch.float32 for g in grads.values())
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.bfloat16])
    # PEFT's own bf16 run meets the same bound: the patch is no less accurate than PEFT.
    _assert_model_close(peft_logits, peft_grads, ref_logits, ref_grads, [torch.bfloat16])


def test_autocast_bf16_over_fp32_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mixed-precision training (fp32 weights, bf16 autocast): lora_linear applies autocast's
    # linear rule itself, the adapters keep fp32 (PEFT under autocast computes them in bf16).
    model = _peft_model()
    ref64 = copy.deepcopy(model).double()
    ids = _ids()
    ref_logits, ref_grads = _run(ref64, ids)
    patch(model, backend="torch")
    spy = _Spy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, grads = _run(model, ids)
    assert len(spy.calls) == N_LINEAR
    _assert_model_close(logits.float(), grads, ref_logits, ref_grads, [torch.bfloat16])


def test_patched_models_deepcopy_and_pickle() -> None:
    ids = _ids()
    patched = _peft_model()
    patch(patched, backend="torch", log=False)
    cfg = register_fused_peft_module(
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False), backend="torch"
    )
    fused = get_peft_model(_llama(), cfg)
    for model in (patched, fused):
        with torch.no_grad():
            want = model(input_ids=ids).logits
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for clone in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
            lins = _lora_linears(clone)
            assert len(lkp.inspect_model(clone).accelerated) == N_LINEAR
            # the clone's forward is bound to the clone's own layers, not the original's
            assert all(getattr(m.forward, "layer", m) is m for m in lins)
            with torch.no_grad():
                torch.testing.assert_close(clone(input_ids=ids).logits, want, atol=0, rtol=0)
            assert all(m._lk_last_fallback is None for m in lins)


def test_data_parallel_replicas_get_forwards_of_their_own() -> None:
    """nn.DataParallel (the HF Trainer's choice on several GPUs without torchrun) replicates each module
    by copying its ``__dict__``: the patched forward must be rebound to the replica, else every GPU's
    replica ran the first GPU's layer. On the CPU, what ``torch.nn.parallel.replicate`` does per module."""
    model = _peft_model()
    patch(model, backend="torch", log=False)
    for lin in _lora_linears(model):
        replica = lin._replicate_for_data_parallel()
        assert replica is not lin and replica.forward.layer is replica and lin.forward.layer is lin
        assert "_replicate_for_data_parallel" not in replica.__dict__
        x = torch.randn(3, 5, lin.in_features, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            torch.testing.assert_close(replica(x), lin(x), atol=0, rtol=0)
    unpatch(model)
    assert all("_replicate_for_data_parallel" not in m.__dict__ for m in _lora_linears(model))


def test_multi_adapter_sum_and_dropout_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peft_model()
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=LINEAR_NAMES, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():  # set_adapter's trainability differs across PEFT versions
        p.requires_grad_("lora_" in n)
    ref64 = copy.deepcopy(model).double()
    ids = _ids()
    ref_logits, ref_grads = _run(ref64, ids)
    assert any(".second." in n for n in ref_grads) and any(".default." in n for n in ref_grads)
    patch(model, backend="torch")
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    # one fused call per layer: both adapters stacked into one rank-12 update
    assert len(spy.calls) == N_LINEAR and all(c["scaling"] == 1.0 for c in spy.calls)
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])

    # Same dropout p on both adapters in training: still fused (one shared mask).
    for m in _lora_linears(model):
        for a in ("default", "second"):
            m.lora_dropout[a] = nn.Dropout(0.1)
    model.train()
    spy.calls.clear()
    model(input_ids=ids)
    assert len(spy.calls) == N_LINEAR and all(c["dropout_p"] == 0.1 for c in spy.calls)
    # Different p: cannot share one mask -> PEFT's path, with the reason recorded and reported.
    for m in _lora_linears(model):
        m.lora_dropout["second"] = nn.Dropout(0.2)
    spy.calls.clear()
    torch.manual_seed(5)
    patched_out = model(input_ids=ids).logits
    assert not spy.calls
    assert all("different dropout p" in m._lk_last_fallback for m in _lora_linears(model))
    assert all("different dropout p" in why for why in lkp.inspect_model(model).fallback.values())
    unpatch(model)
    torch.manual_seed(5)
    torch.testing.assert_close(model(input_ids=ids).logits, patched_out, atol=0, rtol=0)


def test_multi_adapter_lora_biases_are_scaled_per_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacked adapters with lora_bias=True: each adapter's bias enters with its own scaling
    (Σ_i s_i·lora_bias_i), as PEFT adds them; float64 PEFT is the truth."""
    model = _peft_model(bias=True, lora_bias=True)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=12, target_modules=LINEAR_NAMES, lora_bias=True,
                                           init_lora_weights=False))  # fmt: skip
    model.base_model.set_adapter(["default", "second"])
    g = torch.Generator().manual_seed(3)
    for m in _lora_linears(model):
        for a in ("default", "second"):
            with torch.no_grad():
                m.lora_B[a].bias.copy_(torch.randn(m.lora_B[a].bias.shape, generator=g))
        assert m.scaling["default"] != m.scaling["second"]
    for n, prm in model.named_parameters():
        prm.requires_grad_("lora_" in n)
    ref64 = copy.deepcopy(model).double()
    ids = _ids()
    ref_logits, ref_grads = _run(ref64, ids)
    patch(model, backend="torch")
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    assert len(spy.calls) == N_LINEAR
    assert sum(n.endswith(".bias") and "lora_B" in n for n in grads) == 2 * N_LINEAR
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])


def test_inactive_adapter_stays_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second adapter that is loaded but not active adds nothing (PEFT skips it): the fused call gets
    the active adapter alone, and switching adapters switches what the fused call runs."""
    model = _peft_model()
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=LINEAR_NAMES, init_lora_weights=False))
    ids = _ids()
    for active in ("default", "second"):
        model.base_model.set_adapter(active)
        for n, prm in model.named_parameters():
            prm.requires_grad_("lora_" in n and f".{active}." in n)
        ref_logits, ref_grads = _run(copy.deepcopy(model).double(), ids)
        unpatch(model)
        patch(model, backend="torch", log=False)
        spy = _Spy(monkeypatch)
        logits, grads = _run(model, ids)
        assert len(spy.calls) == N_LINEAR
        _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])
        monkeypatch.undo()


def test_training_with_dropout_reduces_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peft_model(lora_dropout=0.1, init_lora_weights=True)
    patch(model, backend="torch")
    spy = _Spy(monkeypatch)
    model.train()
    ids = _ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(spy.calls) == 8 * N_LINEAR and all(c["dropout_p"] == 0.1 for c in spy.calls)
    assert losses[-1] < losses[0] - 0.5, losses


def test_fallback_report_dora_embedding_merged(caplog: pytest.LogCaptureFixture) -> None:
    # DoRA: every layer is patched but its adapter is a variant -> PEFT's path, reported.
    dora = _peft_model(use_dora=True)
    ids = _ids()
    before = dora(input_ids=ids).logits
    report = patch(dora, backend="torch", log=False)
    assert report.accelerated == [] and len(report.fallback) == N_LINEAR
    assert all("DoRA" in why for why in report.fallback.values())
    torch.testing.assert_close(dora(input_ids=ids).logits, before, atol=0, rtol=0)

    # An Embedding target is not patched (skipped, with the reason); Linear targets are.
    model = _peft_model(target_modules=["embed_tokens", "q_proj", "v_proj"])
    with caplog.at_level(logging.INFO, logger="lora_kernels"):
        report = patch(model, backend="torch")
    assert len(report.accelerated) == 4
    assert list(report.skipped) == ["base_model.model.model.embed_tokens"]
    assert "Embedding" in report.skipped["base_model.model.model.embed_tokens"]
    assert len(caplog.records) == 1 and "4 of 5 LoRA layers run fused" in caplog.records[0].getMessage()

    # A merged adapter: PEFT's path (plain base layer) until unmerged, then fused again.
    model.merge_adapter()
    report = lkp.inspect_model(model)
    assert report.accelerated == [] and all("merged" in why for why in report.fallback.values())
    assert "merged into the base weight" in str(report)
    model.unmerge_adapter()
    assert len(lkp.inspect_model(model).accelerated) == 4


def test_unpatch_restores_bit_identical_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peft_model(lora_dropout=0.1)
    model.train()
    ids = _ids()
    torch.manual_seed(3)
    before = model(input_ids=ids).logits
    patch(model, backend="torch")
    torch.manual_seed(3)
    patched = model(input_ids=ids).logits
    assert not torch.equal(patched, before)  # different (bit-identical-across-backends) dropout masks
    assert unpatch(model) == N_LINEAR
    assert unpatch(model) == 0
    for m in _lora_linears(model):
        assert not any(k.startswith("_lk_") or k == "forward" for k in m.__dict__)
    spy = _Spy(monkeypatch)
    torch.manual_seed(3)
    after = model(input_ids=ids).logits
    assert not spy.calls
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_mixed_batch_adapter_names_falls_back() -> None:
    model = _peft_model()
    model.add_adapter("second", LoraConfig(r=4, target_modules=LINEAR_NAMES, init_lora_weights=False))
    model.eval()
    ids = _ids()
    names = ["default", "second"]
    before = model(input_ids=ids, adapter_names=names).logits
    patch(model, backend="torch")
    out = model(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(out, before, atol=0, rtol=0)
    assert all("adapter_names" in m._lk_last_fallback for m in _lora_linears(model))


def test_extra_positional_argument_is_peft_s_business() -> None:
    """An extra positional argument is not silently dropped by the fused path: it goes to PEFT's forward,
    which passes it to the base layer, so the patched layer fails exactly as the unpatched one does."""
    model = _peft_model()
    layer = _lora_linears(model)[0]
    x = torch.randn(2, 3, layer.in_features)
    with pytest.raises(TypeError) as unpatched:
        layer(x, "extra")
    patch(model, backend="torch", log=False)
    with pytest.raises(TypeError) as patched:
        layer(x, "extra")
    assert str(patched.value) == str(unpatched.value)
    assert "extra forward arguments" in layer._lk_last_fallback


def test_input_of_another_dtype_is_peft_s_business() -> None:
    """A float32 input to a bfloat16 layer outside autocast: PEFT's path decides (here F.linear refuses
    it), so the patched layer fails exactly as the unpatched one does rather than with our own error."""
    model = _peft_model(dtype=torch.bfloat16)
    layer = _lora_linears(model)[0]
    x = torch.randn(2, 3, layer.in_features)
    with pytest.raises(RuntimeError) as unpatched:
        layer(x)
    patch(model, backend="torch", log=False)
    with pytest.raises(RuntimeError) as patched:
        layer(x)
    assert str(patched.value) == str(unpatched.value)
    assert "input dtype differs" in layer._lk_last_fallback


def test_disabled_input_casting_takes_peft_s_path() -> None:
    """peft.helpers.disable_input_dtype_casting under bf16 autocast: PEFT runs the fp32 adapters in
    autocast's dtype; the patched layer takes PEFT's path and gives its output bit for bit."""
    from peft.helpers import disable_input_dtype_casting

    model = _peft_model(dtype=torch.bfloat16)
    layer = _lora_linears(model)[0]
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(2, 3, layer.in_features).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), disable_input_dtype_casting(model):
        before = layer(x)
        patch(model, backend="torch", log=False)
        after = layer(x)
    assert torch.equal(after, before)
    assert "casting disabled" in layer._lk_last_fallback


def _assert_patched_model_takes_peft_path(model: nn.Module, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """Patching ``model`` changes nothing: no fused call, PEFT's logits bit for bit, ``why`` recorded per layer."""
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    patch(model, backend="torch", log=False)
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not spy.calls
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    assert all(why in m._lk_last_fallback for m in _lora_linears(model))


class _HalfDropout(nn.Module):
    """A custom "dropout" PEFT would call as a module: deterministic, unlike anything the fused op does."""

    def forward(self, x):
        return x * 0.5


class _DoubledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("part", ["lora_dropout", "lora_A", "lora_B"])
def test_custom_adapter_modules_take_peft_s_path(part: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter whose dropout, lora_A or lora_B PEFT calls is not a plain nn.Dropout / nn.Linear:
    the fused op would read the weights and skip the module's own forward, so PEFT's path runs."""
    model = _peft_model()
    for m in _lora_linears(model):
        if part == "lora_dropout":
            m.lora_dropout["default"] = _HalfDropout()
        else:
            old = getattr(m, part)["default"]
            new = _DoubledLinear(old.in_features, old.out_features, bias=old.bias is not None)
            new.load_state_dict(old.state_dict())
            getattr(m, part)["default"] = new
    why = "custom dropout" if part == "lora_dropout" else "non-Linear lora_A/lora_B"
    _assert_patched_model_takes_peft_path(model, monkeypatch, why)


@pytest.mark.parametrize("dropout_mask", ["bitmask", "regenerate"])
def test_patch_passes_its_dropout_mask_option(dropout_mask: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peft_model(lora_dropout=0.1)
    patch(model, backend="torch", dropout_mask=dropout_mask, log=False)
    spy = _Spy(monkeypatch)
    model.train()
    model(input_ids=_ids())
    assert len(spy.calls) == N_LINEAR and all(c["dropout_mask"] == dropout_mask for c in spy.calls)


def test_active_adapters_of_different_dtypes_take_peft_s_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stacking a float32 and a bfloat16 adapter into one call would run both in float32 (torch.cat
    promotes), not as PEFT runs each: such layers stay on PEFT's path and say why."""
    model = _peft_model()
    model.add_adapter("second", LoraConfig(r=4, target_modules=LINEAR_NAMES, init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    for m in _lora_linears(model):
        m.lora_A["second"].to(torch.bfloat16)
        m.lora_B["second"].to(torch.bfloat16)
    _assert_patched_model_takes_peft_path(model, monkeypatch, "different dtypes")


def test_save_load_merge_and_unload_on_patched_model(tmp_path) -> None:
    model = _peft_model()
    patch(model, backend="torch")
    ids = _ids()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = PeftModel.from_pretrained(_llama(), tmp_path)  # same base seed -> same base weights
    keys = set(saved.state_dict())
    assert keys == set(model.state_dict())
    assert patch(saved, backend="torch", log=False).accelerated
    with torch.no_grad():
        assert_close_ref(saved(input_ids=ids).logits, logits.double(), [torch.float32], "reloaded")

    merged = model.merge_and_unload()
    assert isinstance(merged, LlamaForCausalLM)
    assert not any(isinstance(m, PeftLoraLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    with torch.no_grad():
        assert_close_ref(merged(input_ids=ids).logits, logits.double(), [torch.float32], "merged")


def test_disable_adapter_context_on_patched_model(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peft_model()
    base_only = _llama()  # same seed: the base weights get_peft_model wrapped
    patch(model, backend="torch")
    ids = _ids()
    spy = _Spy(monkeypatch)
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
            assert all("disabled" in why for why in lkp.inspect_model(model).fallback.values())
        assert not spy.calls
        torch.testing.assert_close(disabled, base_only(input_ids=ids).logits, atol=0, rtol=0)
        model(input_ids=ids)
    assert len(spy.calls) == N_LINEAR


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_replays_the_same_masks(use_reentrant: bool) -> None:
    # Checkpointing restores the CPU RNG state before recomputing, and the dropout seed is drawn
    # from it: the recomputed forward uses the same masks, so gradients equal the plain run's.
    model = _peft_model(lora_dropout=0.1)
    patch(model, backend="torch", log=False)
    model.train()
    ids = _ids()
    torch.manual_seed(11)
    _, plain = _run(model, ids)
    # transformers 5 renamed gradient_checkpointing_enable; the GPU image may have either.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    torch.manual_seed(11)
    _, ckpt = _run(model, ids)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_register_fused_peft_module_builds_fused_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    class CustomLinear(nn.Linear):  # stands in for a quantized nn.Linear subclass with its own forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    def build(fused: bool) -> PeftModel:
        base = _llama()
        q = base.model.layers[0].self_attn.q_proj
        custom = CustomLinear(q.in_features, q.out_features, bias=False)
        custom.load_state_dict(q.state_dict())
        base.model.layers[0].self_attn.q_proj = custom
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False
        )
        if fused:
            assert register_fused_peft_module(cfg, backend="torch") is cfg
        torch.manual_seed(4)
        return get_peft_model(base, cfg)

    plain, fused = build(False), build(True)
    q0 = fused.base_model.model.model.layers[0].self_attn.q_proj
    v0 = fused.base_model.model.model.layers[0].self_attn.v_proj
    assert type(q0) is PeftLoraLinear  # custom forward: FusedLoraLinear.__new__ deferred to PEFT
    assert isinstance(v0, lkp.FusedLoraLinear) and v0._lk_backend == "torch"
    assert repr(v0).startswith("lora_kernels.lora.FusedLoraLinear")
    assert len(lkp.inspect_model(fused).accelerated) == 3  # v0, q1, v1
    spy = _Spy(monkeypatch)
    ids = _ids()
    ref_logits, ref_grads = _run(plain, ids)
    logits, grads = _run(fused, ids)
    assert len(spy.calls) == 3
    ref_grads = {k: g.double() for k, g in ref_grads.items()}
    _assert_model_close(logits, grads, ref_logits.double(), ref_grads, [torch.float32])
    # patch() on a fused-built model only updates the options; unpatch() leaves it fused.
    patch(fused, backend="auto", log=False)
    assert v0._lk_backend == "auto" and unpatch(fused) == 0 and v0._lk_backend == "torch"


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
def test_triton_backend_end_to_end_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real Triton kernels (under TRITON_INTERPRET=1 on CPU) behind a patched model, fp32.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _peft_model(r=16, lora_alpha=32).to(dev)
    ref64 = copy.deepcopy(model).double()
    ids = _ids().to(dev)
    gy = torch.randn(BATCH, SEQ, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_logits, ref_grads = _run(ref64, ids, gy.to(dev))
    patch(model, backend="triton", log=False)
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids, gy.to(dev))
    assert len(spy.calls) == N_LINEAR and all(c["backend"] == "triton" for c in spy.calls)
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
def test_generate_with_kv_cache_matches_peft() -> None:
    """Greedy ``generate`` on a patched model (Triton kernels): a prefill of 2 × 16 tokens, then decode
    steps of one token per sequence (M = 2, 3-D x of one position) through the KV cache. The same
    tokens as PEFT's own layers, and the step scores within the fp32 table."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _peft_model(lora_dropout=0.1).to(dev).eval()  # eval: dropout off, as generate runs it
    ids = _ids().to(dev)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    ref = model.generate(input_ids=ids, **kw)
    patch(model, backend="triton", log=False)
    out = model.generate(input_ids=ids, **kw)
    assert [m._lk_last_fallback for m in _lora_linears(model)] == [None] * N_LINEAR
    assert out.sequences.shape == (BATCH, SEQ + 6)
    torch.testing.assert_close(out.sequences, ref.sequences, rtol=0, atol=0)
    for step, (got, want) in enumerate(zip(out.scores, ref.scores, strict=True)):
        assert_close_ref(got, want.double(), [torch.float32], f"scores of step {step}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_compiled_patched_model_matches_eager(backend: str, p: float) -> None:
    """``torch.compile(fullgraph=True)`` of a whole patched PEFT Llama: one graph (the integration's
    per-call checks are traced, not graph breaks), and its logits and adapter gradients match the eager
    patched model's, dropout included (the compiled graph draws the same seeds from the CPU generator).
    On CPU under aot_eager; the Triton backend in the interpreter keeps its ops whole in the graph, on a
    GPU AOTAutograd decomposes them into their kernels."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if backend == "triton" and not HAS_TRITON_BACKEND:
        pytest.skip("triton is not installed")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _peft_model(lora_dropout=p).to(dev)
    patch(model, backend=backend, log=False)
    model.train()
    ids = _ids().to(dev)
    torch.manual_seed(5)
    e_logits, e_grads = _run(model, ids)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    torch.manual_seed(5)
    c_logits, c_grads = _run(compiled, ids)
    assert counter.frame_count == 1
    assert [m._lk_last_fallback for m in _lora_linears(model)] == [None] * N_LINEAR
    c_grads = {n.removeprefix("_orig_mod."): g for n, g in c_grads.items()}
    _assert_model_close(c_logits, c_grads, e_logits.double(), {n: g.double() for n, g in e_grads.items()},
                        [torch.float32])  # fmt: skip


class _TokenDataset(torch.utils.data.Dataset):
    """Eight random sequences of SEQ tokens, each its own label (causal LM loss)."""

    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_run(tmp_path, backend: str | None, p: float, checkpointing: str | None) -> dict:
    """Three SGD steps of transformers' Trainer (two micro-batches each); the adapters afterwards.
    ``backend=None``: PEFT's own layers. ``checkpointing``: None, "reentrant" or "non-reentrant", named
    rather than left to transformers' default, which changed in 5.0 (4.x: reentrant)."""
    from transformers import Trainer, TrainingArguments

    model = _peft_model(lora_dropout=p)
    if backend is not None:
        patch(model, backend=backend, log=False)
    if checkpointing == "reentrant":
        # Reentrant checkpointing gives the adapters no gradient unless the checkpointed block's input
        # requires grad (frozen embeddings): PEFT's recipe (prepare_model_for_kbit_training) does this.
        model.enable_input_require_grads()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"trainer-{backend}"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=3, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", seed=0, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=checkpointing is not None,
        gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"} if checkpointing else None,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=_TokenDataset()).train()
    if backend is not None:  # every LoRA Linear's last call ran fused
        assert [m._lk_last_fallback for m in _lora_linears(model)] == [None] * N_LINEAR
    return {n: p.detach().cpu().double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
@pytest.mark.parametrize(
    "p, checkpointing",
    [(0.0, None), (0.1, "non-reentrant"), (0.1, "reentrant")],
    ids=["p0", "p0.1-checkpointing", "p0.1-reentrant-checkpointing"],
)
def test_hf_trainer_trains_a_patched_model(tmp_path, p: float, checkpointing: str | None) -> None:
    """transformers' Trainer (which TRL's SFTTrainer builds on) trains a patched model: its own loss,
    gradient accumulation, optimizer and, at p = 0.1, gradient checkpointing of either kind (transformers
    5's default, non-reentrant, and 4.x's, reentrant with PEFT's input-grads hook). The adapters after three
    steps on the Triton kernels match the same run on PEFT's own layers (p = 0) or, where PEFT's dropout
    masks differ from ours, on the reference backend (the same masks)."""
    init = {n: t.detach().double() for n, t in _peft_model().named_parameters() if t.requires_grad}
    ref = _trainer_run(tmp_path, None if p == 0 else "torch", p, checkpointing)
    out = _trainer_run(tmp_path, "triton", p, checkpointing)
    assert out.keys() == ref.keys() == init.keys() and len(out) == 2 * N_LINEAR
    for name in out:
        assert (ref[name] - init[name]).abs().max() > 1e-3, f"{name} did not train"
        assert_close_ref(out[name] - init[name], ref[name] - init[name], [torch.float32], f"{name} update")


@pytest.mark.parametrize("arch, fused", [("llama", 14), ("gpt2", 8)])
def test_bench_e2e_dry_runs(
    arch: str, fused: int, tmp_path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dry run of each architecture: every variant times, the patched one ran every LoRA layer fused
    (2 layers × 7 nn.Linear projections in Llama, × 4 Conv1D ones in GPT-2), and the backend each row
    names was resolved on the tensors the fused call gets (the (N, K) view of a Conv1D weight)."""
    import bench.e2e_peft as e2e
    from lora_kernels import backends

    real = backends.resolved_backend

    def resolved_backend(backend, x, weight, lora_A):
        assert x.shape[1] == weight.shape[1] == lora_A.shape[1], (x.shape, weight.shape, lora_A.shape)
        return real(backend, x, weight, lora_A)

    monkeypatch.setattr(backends, "resolved_backend", resolved_backend)

    path = tmp_path / "e2e.csv"
    rows = e2e.main(["--dry", "--arch", arch, "--csv", str(path)])
    assert [r["variant"] for r in rows] == ["floor", "peft_default", "peft_bf16", "patched", "add_lora"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # The patched and add_lora rows name the kernels they timed: "auto" resolved per layer (--dry runs on
    # the CPU, where "auto" runs the reference), the other rows name none.
    assert [r["backend_resolved"] for r in rows] == ["", "", "", f"torch:{fused}", f"torch:{fused}"]
    captured = capsys.readouterr()
    assert "tokens/s" in captured.out and "patched" in captured.out and f"{arch} (dense), 2 layers" in captured.out
    assert f"{fused} of {fused} LoRA layers run fused" in captured.err
    with path.open(newline="") as f:
        written = list(csv.DictReader(f))
    assert [r["variant"] for r in written] == [r["variant"] for r in rows]
    assert {r["arch"] for r in written} == {arch} and {r["hidden"] for r in written} == {"64"}


def test_bench_e2e_model_sizes_follow_the_arch() -> None:
    """Each --arch has its own default sizes, an explicit flag wins over them, and --kv-heads (grouped
    KV heads) is refused for GPT-2, whose attention has none; the models built are the ones asked for."""
    from transformers.pytorch_utils import Conv1D

    import bench.e2e_peft as e2e

    llama, gpt2 = e2e.parse_args([]), e2e.parse_args(["--arch", "gpt2", "--seq", "512"])
    assert (llama.hidden, llama.intermediate, llama.heads, llama.kv_heads, llama.seq) == (4096, 14336, 32, 8, 2048)
    sizes = (gpt2.hidden, gpt2.intermediate, gpt2.heads, gpt2.vocab, gpt2.seq, gpt2.batch)
    assert sizes == (1600, 6400, 25, 50257, 512, 8)
    with pytest.raises(SystemExit):
        e2e.parse_args(["--arch", "gpt2", "--kv-heads", "5"])
    args = e2e.parse_args(["--dry", "--arch", "gpt2"])
    model, params = e2e.prepare("peft_default", args)
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8 and all(tuple(c.weight.shape) in {(64, 192), (64, 64), (64, 128), (128, 64)} for c in convs)
    assert len(params) == 2 * 8 and all(m.fan_in_fan_out for m in model.modules() if hasattr(m, "fan_in_fan_out"))
    assert model.base_model.model.config.n_positions >= args.seq


def test_bench_e2e_keeps_the_rows_of_variants_that_ran(tmp_path, monkeypatch, capsys) -> None:
    """A variant that fails (an OOM, a kernel error) costs only its own row: the others are printed,
    written, and the run exits non-zero naming the failure."""
    import bench.e2e_peft as e2e

    real = e2e.run_variant

    def run_variant(variant, args):
        if variant == "peft_bf16":
            raise RuntimeError("CUDA out of memory (simulated)\nmore")
        return real(variant, args)

    monkeypatch.setattr(e2e, "run_variant", run_variant)
    path = tmp_path / "e2e.csv"
    with pytest.raises(SystemExit, match=r"1 variant\(s\) failed: peft_bf16: RuntimeError: CUDA out of memory"):
        e2e.main(["--dry", "--csv", str(path)])
    lines = path.read_text().strip().splitlines()
    column = e2e.CSV_FIELDS.index("variant")
    assert [line.split(",")[column] for line in lines[1:]] == ["floor", "peft_default", "patched", "add_lora"]
    assert "patched" in capsys.readouterr().out


def test_bench_e2e_never_appends_under_another_header(tmp_path) -> None:
    """An e2e CSV written by an older version (other columns) is left alone: rows go to a new dated file."""
    import bench.e2e_peft as e2e

    old = tmp_path / "e2e.csv"
    old.write_text("gpu,commit,variant,step_ms\nH100,abc,floor,1.0\n")
    e2e.main(["--dry", "--csv", str(old), "--variants", "floor"])
    assert old.read_text() == "gpu,commit,variant,step_ms\nH100,abc,floor,1.0\n"
    (new,) = [p for p in tmp_path.glob("e2e-*.csv")]
    assert new.read_text().splitlines()[0].split(",") == e2e.CSV_FIELDS


def test_bench_e2e_variants_are_what_they_say(monkeypatch) -> None:
    """Each row times what its name says: the floor trains nothing but still runs the whole backward,
    peft_default keeps fp32 adapters next to the 16-bit base and peft_bf16 does not, patched carries the
    requested mask mode; throughput is tokens over the median step; a patched layer that ran PEFT's own
    path stops the row instead of timing PEFT under the patched name."""
    import bench.e2e_peft as e2e

    args = e2e.parse_args(["--dry", "--dtype", "bf16", "--dropout-mask", "regenerate"])
    args.dtype = "bf16"  # --dry sets fp32: the adapters' dtype shows only next to a 16-bit base
    floor, params = e2e.prepare("floor", args)
    assert params == [] and not any(p.requires_grad for p in floor.parameters())
    assert floor.get_input_embeddings()(torch.zeros(1, 2, dtype=torch.long)).requires_grad
    for variant, dtype in (("peft_default", torch.float32), ("peft_bf16", torch.bfloat16)):
        _, params = e2e.prepare(variant, args)
        assert params and {p.dtype for p in params} == {dtype}, variant
    patched, _ = e2e.prepare("patched", args)
    fused = [m for m in patched.modules() if getattr(m, "_lk_patched", False)]
    assert fused and {m._lk_dropout_mask for m in fused} == {"regenerate"}
    # add_lora: the same layers as PEFT's "all-linear", the same LoRA settings, no PEFT module anywhere.
    own, params = e2e.prepare("add_lora", args)
    layers = lk.lora_layers(own)
    peft_names = [n.removeprefix("base_model.model.") for n, m in patched.named_modules() if m in fused]
    assert sorted(n for n, _ in layers) == sorted(peft_names)
    assert {(m.r, m.lora_alpha, m.lora_dropout, m.dropout_mask) for _, m in layers} == {
        (args.r, args.lora_alpha, args.dropout, "regenerate")
    }
    assert {p.dtype for p in params} == {torch.float32} and len(params) == 2 * len(layers)
    assert not any(isinstance(m, PeftLoraLinear) for m in own.modules())

    dry = e2e.parse_args(["--dry", "--no-csv"])
    (row,) = e2e.main(["--dry", "--no-csv", "--variants", "peft_default"])
    assert row["tokens_per_s"] == pytest.approx(dry.batch * dry.seq / (row["step_ms"] / 1e3))
    table = e2e.format_table([{**row, "variant": "floor", "tokens_per_s": 1000.0},
                              {**row, "variant": "patched", "tokens_per_s": 900.0}])  # fmt: skip
    assert table.splitlines()[2].endswith("0.90x"), table

    real = e2e.prepare

    def prepare(variant, args):
        model, params = real(variant, args)
        layer = next(m for m in model.modules() if getattr(m, "_lk_patched", False))
        layer.lora_dropout["default"] = torch.nn.AlphaDropout(args.dropout)  # not nn.Dropout: PEFT's path
        return model, params

    monkeypatch.setattr(e2e, "prepare", prepare)
    with pytest.raises(RuntimeError, match="1 patched layers ran PEFT's path"):
        e2e.run_variant("patched", dry)


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
@pytest.mark.parametrize("input_grads", [False, True], ids=["frozen-embeddings", "input-require-grads"])
def test_flop_counter_gives_patched_and_peft_models_the_same_count(input_grads: bool) -> None:
    """An MFU figure from FlopCounterMode does not change when the model is patched: the fused ops'
    formulas count what PEFT's own matmuls count, forward and backward (the first layer's input needs
    no gradient unless input grads are enabled, as for gradient checkpointing)."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _peft_model(r=16, lora_alpha=32).to(dev)
    if input_grads:
        model.enable_input_require_grads()
    ids = _ids().to(dev)

    def count() -> tuple[int, dict]:
        with FlopCounterMode(display=False) as counter:
            _run(model, ids)
        return counter.get_total_flops(), counter.get_flop_counts()["Global"]

    peft_total, peft_ops = count()
    patch(model, backend="triton", log=False)
    fused_total, fused_ops = count()
    ops = {str(op) for op in fused_ops}
    assert "lora_kernels.triton_lora_fwd" in ops and "lora_kernels.triton_lora_bwd" in ops, ops
    assert fused_total == peft_total > 0, (fused_total, peft_total, peft_ops, fused_ops)


def _hook_base_output(model: nn.Module) -> None:
    for m in _lora_linears(model):
        m.base_layer.register_forward_hook(lambda mod, args, out: out * 2)


def _hook_lora_A_input(model: nn.Module) -> None:
    for m in _lora_linears(model):
        m.lora_A["default"].register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))


def _accelerate_cpu_offload(model: nn.Module) -> None:
    from accelerate import cpu_offload  # weights to "meta"; each module's hook loads them for its forward

    cpu_offload(model, execution_device=torch.device("cpu"))


@pytest.mark.parametrize(
    "hook",
    [_hook_base_output, _hook_lora_A_input, _accelerate_cpu_offload],
    ids=["base-hook", "lora_A-hook", "offload"],
)
def test_modules_with_hooks_take_peft_path(hook, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT calls base_layer, lora_A, lora_B and the dropout as modules, so their hooks run: DeepSpeed ZeRO-3's
    and accelerate's offloading gather the weights there, prune and user hooks change inputs or outputs. The
    fused op reads the weights without calling the modules, so such a layer takes PEFT's path."""
    offload = hook is _accelerate_cpu_offload
    if offload:
        pytest.importorskip("accelerate")
    model = _peft_model(bias=True, lora_bias=True)
    ids = _ids()
    hook(model)

    def run() -> tuple[torch.Tensor, dict]:
        if offload:  # inference only: the offloaded parameters are meta tensors without gradients
            with torch.no_grad():
                return model(input_ids=ids).logits, {}
        return _run(model, ids)

    want_logits, want_grads = run()
    report = patch(model, backend="torch", log=False)
    assert not report.accelerated, str(report)  # the report says so too (hooked, or skipped: not patched)
    spy = _Spy(monkeypatch)
    logits, grads = run()
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=0, rtol=0, msg=name)
    assert not spy.calls
    assert all("hooks" in m._lk_last_fallback for m in _lora_linears(model))


def test_nested_tuner_layer_takes_peft_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PeftMixedModel with LoHa added first: each LoRA Linear wraps a LoHa layer, whose forward (called by
    PEFT's) adds the LoHa update. The fused op over the innermost nn.Linear would drop it."""
    from peft import LoHaConfig

    targets = ["q_proj", "v_proj"]
    loha = LoHaConfig(r=4, alpha=4, target_modules=targets, init_weights=False)
    model = get_peft_model(_llama(), loha, adapter_name="loha", mixed=True)
    model.add_adapter("lora", LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    model.set_adapter(["loha", "lora"])
    lins = _lora_linears(model)
    assert len(lins) == 4 and all(type(m.base_layer).__name__ == "Linear" and m.base_layer is not m.get_base_layer()
                                  for m in lins)  # fmt: skip
    ids = _ids()
    want_logits, want_grads = _run(model, ids)
    report = patch(model, backend="torch", log=False)
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=0, rtol=0, msg=name)
    assert not spy.calls
    assert not report.accelerated and all("nested" in why for why in report.fallback.values())


def test_dropout_p1_takes_peft_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # nn.Dropout(1.0) is valid (it zeroes every element); the fused op takes p in [0, 1).
    model = _peft_model(lora_dropout=1.0, lora_bias=True, bias=True)
    model.train()
    ids = _ids()
    want_logits, want_grads = _run(model, ids)
    patch(model, backend="torch", log=False)
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    assert not spy.calls and all("p = 1.0" in m._lk_last_fallback for m in _lora_linears(model))
    torch.testing.assert_close(logits, want_logits, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=0, rtol=0, msg=name)
    model.eval()  # eval: no dropout, fused again
    model(input_ids=ids)
    assert len(spy.calls) == N_LINEAR


def test_patch_leaves_an_instance_forward_alone() -> None:
    """accelerate's add_hook_to_module wraps a module's forward as an instance attribute; patch() installing
    its own there would drop the hook, and unpatch() would not bring it back. Such a layer is not patched."""
    pytest.importorskip("accelerate")
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    model = _peft_model()
    hooked = _lora_linears(model)[0]
    add_hook_to_module(hooked, Double())
    ids = _ids()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    report = patch(model, backend="torch", log=False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)
    name = next(n for n, m in model.named_modules() if m is hooked)
    assert len(report.accelerated) == N_LINEAR - 1 and "forward" in report.skipped[name]
    assert patch(model, backend="torch", log=False).accelerated == report.accelerated  # patching again: same
    assert unpatch(model) == N_LINEAR - 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=0, rtol=0)


def test_rescaled_adapters_and_trainable_base_match_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's scale_layer / set_scale / unscale_layer change layer.scaling after patching, and a base trained
    along with the adapters (weight and bias require grad) gets its gradients through the fused op."""
    model = _peft_model(bias=True)
    for name, p in model.named_parameters():
        p.requires_grad_("layers.0." in name or "lora_" in name)  # layer 0's base weights train too
    patch(model, backend="torch", log=False)
    lins = _lora_linears(model)
    for m in lins:
        m.scale_layer(0.5)
    lins[0].set_scale("default", 3.0)  # 3 alpha / r = 6
    ref64 = copy.deepcopy(model)
    unpatch(ref64)
    ref64.double()
    ids = _ids()
    ref_logits, ref_grads = _run(ref64, ids)
    assert any(n.endswith("q_proj.base_layer.weight") for n in ref_grads)
    assert any(n.endswith("q_proj.base_layer.bias") for n in ref_grads)
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    assert [c["scaling"] for c in spy.calls] == [6.0] + [1.0] * (N_LINEAR - 1)
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])
    for m in lins:
        m.unscale_layer()
    spy.calls.clear()
    model(input_ids=ids)
    assert [c["scaling"] for c in spy.calls] == [2.0] * N_LINEAR


def _gpt2_peft(fused_backend: str | None = None, **lora_kw) -> PeftModel:
    """GPT-2 (1 block): its attention and MLP projections are transformers' Conv1D (weight (K, N)).
    ``fused_backend``: built through register_fused_peft_module with that backend."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=VOCAB, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=False)  # fmt: skip
    kw = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
              init_lora_weights=False)  # fmt: skip
    config = LoraConfig(**(kw | lora_kw))
    if fused_backend is not None:
        register_fused_peft_module(config, backend=fused_backend)
    return get_peft_model(GPT2LMHeadModel(cfg), config)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpt2_conv1d_layers_run_fused_and_match_peft(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's projections (transformers' Conv1D, ``fan_in_fan_out=True`` in PEFT) run fused: the (K, N)
    weight goes in as its transposed view, no copy (on Hopper the TMA kernels' W_KN variant reads it). Outputs and
    every adapter gradient match PEFT's own model in float64, with dropout's mask aside (p = 0)."""
    if backend == "triton" and not HAS_TRITON_BACKEND:
        pytest.skip("triton is not installed")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on a GPU, or on the CPU interpreted
    model = _gpt2_peft().to(dev)
    ids = _ids().to(dev)
    ref_logits, ref_grads = _run(copy.deepcopy(model).double(), ids)
    report = patch(model, backend=backend, log=False)
    assert len(report.accelerated) == 4 and report.skipped == {} and report.fallback == {}  # c_attn, 2 c_proj, c_fc
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    assert len(spy.calls) == 4 and all(c["backend"] == backend for c in spy.calls)
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])
    unpatch(model)
    logits_peft, _ = _run(model, ids)
    # Two fp32 computations in different orders (on a GPU, cuBLAS against the kernels): not bit for bit.
    torch.testing.assert_close(logits_peft, logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_register_fused_peft_module_builds_gpt2_layers_as_peft_does(
    fan_in_fan_out: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """register_fused_peft_module builds GPT-2's Conv1D projections, and its nn.Linear lm_head, fused, with the
    flags PEFT's own dispatch gives them: fan_in_fan_out following each base layer's layout, set with PEFT's
    warnings where the config says otherwise (a config naming both kinds flips it, as in PEFT), and
    is_target_conv_1d_layer on the Conv1D layers. The same weights; outputs and every adapter gradient match
    PEFT's model in float64; merge_and_unload, which reads the flag, gives PEFT's merged weights."""
    import warnings

    targets = ["c_attn", "c_proj", "c_fc", "lm_head"]
    built = {}
    for backend in (None, "torch"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = _gpt2_peft(backend, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
        built[backend] = model, [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]
    (plain, peft_warnings), (fused, warned) = built[None], built["torch"]
    assert warned == peft_warnings and len(warned) == (1 if fan_in_fan_out else 2), (warned, peft_warnings)
    ref_state, state = plain.state_dict(), fused.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    layers = {n: m for n, m in fused.named_modules() if isinstance(m, PeftLoraLinear)}
    ref_layers = {n: m for n, m in plain.named_modules() if isinstance(m, PeftLoraLinear)}
    assert layers.keys() == ref_layers.keys() and len(layers) == 5
    for name, layer in layers.items():
        ref = ref_layers[name]
        assert type(layer) is lkp.fused_linear_class("torch") and type(ref) is PeftLoraLinear, name
        assert (
            (layer.fan_in_fan_out, layer.is_target_conv_1d_layer)
            == (ref.fan_in_fan_out, ref.is_target_conv_1d_layer)
            == ((False, False) if "lm_head" in name else (True, True))
        )
    assert len(lkp.inspect_model(fused).accelerated) == 5
    ids = _ids()
    ref_logits, ref_grads = _run(copy.deepcopy(plain).double(), ids)
    spy = _Spy(monkeypatch)
    logits, grads = _run(fused, ids)
    assert len(spy.calls) == 5 and all(c["backend"] == "torch" for c in spy.calls)
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])
    merged, ref_merged = fused.merge_and_unload().state_dict(), plain.merge_and_unload().state_dict()
    assert merged.keys() == ref_merged.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], ref_merged[k], atol=1e-6, rtol=1e-6)


def test_fused_layer_sets_the_layout_flags_in_either_of_peft_s_calling_conventions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What FusedLoraLinear hands PEFT's Linear.__init__ under both conventions PEFT has used: the flag in
    the config it passes (recent releases) or as a keyword (0.14, not installable here). The flag follows the
    base layer (True for Conv1D, False for nn.Linear) with PEFT's warning when it is flipped, and Conv1D
    layers get is_target_conv_1d_layer; a matching flag passes through silently."""
    import types
    import warnings

    from transformers.pytorch_utils import Conv1D

    seen = []
    monkeypatch.setattr(PeftLoraLinear, "__init__", lambda self, base, name, *a, **kw: seen.append(kw))
    conv, lin = Conv1D(24, 16), nn.Linear(16, 24)
    for base, flag, want, warned in ((conv, False, True, "Conv1D"), (conv, True, True, None),
                                     (lin, True, False, "torch.nn.Linear"), (lin, False, False, None)):  # fmt: skip
        for style in ("config", "keyword"):
            config = types.SimpleNamespace(fan_in_fan_out=flag)
            kwargs = {"config": config} if style == "config" else {"fan_in_fan_out": flag}
            seen.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                layer = lkp.FusedLoraLinear(base, "default", r=4, lora_alpha=8, **kwargs)
            assert isinstance(layer, lkp.FusedLoraLinear) and len(seen) == 1
            got = config.fan_in_fan_out if style == "config" else seen[0]["fan_in_fan_out"]
            assert got is want, (type(base).__name__, flag, style)
            assert seen[0].get("is_target_conv_1d_layer", False) is (base is conv)
            msgs = [str(w.message) for w in caught]
            if warned is None:
                assert msgs == [], msgs
            else:
                assert msgs == [f"fan_in_fan_out is set to {not want} but the target module is `{warned}`. "
                                f"Setting fan_in_fan_out to {want}."], msgs  # fmt: skip


def test_other_base_layers_and_fan_in_fan_out_pairings_stay_on_peft_s_path() -> None:
    """A Conv1D subclass with its own forward is skipped, as is a fan_in_fan_out flag that does not
    match the base layer's layout (set by hand on an nn.Linear, cleared on a Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    class ScaledConv1D(Conv1D):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = _gpt2_peft()
    attn = model.base_model.model.transformer.h[0].attn
    attn.c_attn.base_layer.__class__ = ScaledConv1D
    attn.c_proj.fan_in_fan_out = False
    report = patch(model, backend="torch", log=False)
    assert report.skipped == {
        "base_model.model.transformer.h.0.attn.c_attn": "base layer ScaledConv1D has its own forward",
        "base_model.model.transformer.h.0.attn.c_proj": "fan_in_fan_out=False on a Conv1D base layer",
    }
    assert len(report.accelerated) == 2
    llama = _peft_model(target_modules=["q_proj"])
    q = llama.base_model.model.model.layers[0].self_attn.q_proj
    q.fan_in_fan_out = True
    why = patch(llama, backend="torch", log=False).skipped["base_model.model.model.layers.0.self_attn.q_proj"]
    assert why == "fan_in_fan_out=True on a Linear base layer"


def test_a_layer_without_the_active_adapter_runs_the_base_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two adapters on different targets: with "q_only" active, the other layers hold no active adapter
    (PEFT runs their base layer alone) and say so; q_proj runs fused with q_only's weights."""
    model = _peft_model(target_modules=["v_proj"])
    model.add_adapter("q_only", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    model.base_model.set_adapter("q_only")
    ids = _ids()
    ref_logits, ref_grads = _run(copy.deepcopy(model).double(), ids)
    report = patch(model, backend="torch", log=False)
    assert len(report.accelerated) == 2 and all(n.endswith("q_proj") for n in report.accelerated)
    assert len(report.fallback) == 2
    assert set(report.fallback.values()) == {"no active adapter on this layer"}
    spy = _Spy(monkeypatch)
    logits, grads = _run(model, ids)
    assert len(spy.calls) == 2
    _assert_model_close(logits, grads, ref_logits, ref_grads, [torch.float32])


def test_patch_options_are_checked_before_anything_changes() -> None:
    model = _peft_model()
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch'.*got 'tpu'"):
        patch(model, backend="tpu")
    with pytest.raises(ValueError, match="dropout_mask must be one of .*got 'bytes'"):
        patch(model, dropout_mask="bytes")
    with pytest.raises(ValueError, match="backend must be one of"):
        register_fused_peft_module(LoraConfig(r=4), backend="tpu")
    assert lkp.inspect_model(model).accelerated == []  # nothing was patched


# PEFT's LoRA variants besides DoRA (``lora_variant``, peft >= 0.16): each changes the layer's forward, backward or
# what its adapter holds. (config keyword, its value built from peft's config module, the variant's class)
_VARIANTS = {
    "velora": ("velora_config", lambda c: c.VeloraConfig(), "VeloraLinearVariant"),
    "kasa": ("kasa_config", lambda c: c.KasaConfig(), "KasaLinearVariant"),
    "monteclora": ("monteclora_config", lambda c: c.MontecloraConfig(), "MontecloraLinearVariant"),
    "mica": ("init_lora_weights", lambda c: "mica", "MiCALinearVariant"),
    "alora": ("alora_invocation_tokens", lambda c: [5, 6], "ALoraLinearVariant"),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.filterwarnings("ignore:aLoRA is currently only supported")
def test_lora_variants_take_peft_s_path(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model built with one of PEFT's LoRA variants (VeLoRA, KaSA, MonteCLoRA, MiCA, aLoRA: a custom backward,
    singular values, Monte Carlo sampling, another init with its own forward, adapters active from an invocation
    token on) is patched, but every call takes PEFT's path, reported with the variant's class, and the model's
    outputs and every gradient are PEFT's bit for bit (the same torch seed before each run)."""
    import dataclasses

    import peft
    import peft.tuners.lora.config as peft_config

    key, value, cls = _VARIANTS[variant]
    field = {f.name: f for f in dataclasses.fields(LoraConfig)}.get(key)
    if field is None or (key == "init_lora_weights" and "mica" not in field.metadata.get("lora_variants", ())):
        pytest.skip(f"peft {peft.__version__} has no {variant} variant")
    ref = _peft_model(**{key: value(peft_config)})
    model = copy.deepcopy(ref)
    report = patch(model, backend="torch", log=False)
    assert report.accelerated == [] and len(report.fallback) == N_LINEAR, report
    assert all(f"LoRA variant ({cls})" in why for why in report.fallback.values()), report.fallback
    ids = _ids()
    ids[:, 3], ids[:, 4] = 5, 6  # (aLoRA's invocation tokens: its adapters act from there on)
    spy = _Spy(monkeypatch)
    torch.manual_seed(0)
    logits, grads = _run(model, ids)
    torch.manual_seed(0)
    ref_logits, ref_grads = _run(ref, ids)
    assert not spy.calls, "a variant's layer reached the fused op"
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_a_lora_layer_subclass_or_a_quantized_base_weight_stays_peft_s() -> None:
    """A subclass of PEFT's lora.Linear with a forward of its own (the fused op would skip it), a base weight that is
    not a float tensor (int8, as quantizers store it) or is a tensor subclass: each such layer is skipped with
    its reason, the others are fused, and the model's outputs are PEFT's."""

    class ClippedLoraLinear(PeftLoraLinear):
        def forward(self, x, *args, **kwargs):
            return super().forward(x, *args, **kwargs).clamp(-0.05, 0.05)

    class TaggedTensor(torch.Tensor):
        pass

    model = _peft_model(target_modules=["q_proj", "k_proj", "v_proj"])
    ids = _ids()
    attn0, attn1 = (layer.self_attn for layer in model.base_model.model.model.layers)
    attn0.q_proj.__class__ = ClippedLoraLinear
    attn1.v_proj.base_layer.weight = nn.Parameter(TaggedTensor(attn1.v_proj.base_layer.weight.detach()),
                                                  requires_grad=False)  # fmt: skip
    with torch.no_grad():
        before = model(input_ids=ids).logits
    int8 = nn.Parameter(torch.ones(attn1.k_proj.base_layer.weight.shape, dtype=torch.int8), requires_grad=False)
    real_k = attn1.k_proj.base_layer.weight
    attn1.k_proj.base_layer.weight = int8
    report = patch(model, backend="torch", log=False)
    prefix = "base_model.model.model.layers"
    assert report.skipped == {
        f"{prefix}.0.self_attn.q_proj": "ClippedLoraLinear overrides peft's lora.Linear.forward",
        f"{prefix}.1.self_attn.k_proj": "base weight is Parameter of torch.int8 (quantized or tensor subclass)",
        f"{prefix}.1.self_attn.v_proj": "base weight is TaggedTensor of torch.float32 (quantized or tensor subclass)",
    }, report.skipped
    assert len(report.accelerated) == 3
    attn1.k_proj.base_layer.weight = real_k  # (an int8 weight does not run through nn.Linear: for the comparison)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(after, before)
