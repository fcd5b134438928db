"""QLoRA: ``patch`` runs PEFT LoRA layers over bitsandbytes 4-bit bases fused (on CPU: bitsandbytes' CPU ops).

The fused call dequantizes the base weight to the layer's compute dtype as bitsandbytes' training path
does (dequantize, then a dense GEMM) and passes ``recompute_weight``, so the dense copy is not kept for
backward. Checked against PEFT's own forward on the same model: outputs and every trainable gradient,
both of PEFT's layer classes (``lora.bnb.Linear4bit``, built for a model marked ``is_loaded_in_4bit``, and
``lora.Linear`` over the 4-bit base otherwise), the torch and Triton (interpreter) backends, bf16 and fp32
inputs; plus dropout against a direct call, what is saved for backward, checkpointing, the fallbacks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft", reason="the QLoRA tests need peft installed")
bnb = pytest.importorskip("bitsandbytes", reason="the QLoRA tests need bitsandbytes installed")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lora_kernels as lk  # noqa: E402
import lora_kernels.integrations.peft as lkp  # noqa: E402

from ._utils import HAS_CUDA, INTERPRET, assert_close_ref  # noqa: E402

K, N, N2 = 96, 80, 72
# On a GPU the layers and tensors live there (bitsandbytes' CUDA ops, the Triton kernels compiled); on a
# CPU machine, bitsandbytes' CPU ops and the Triton interpreter.
DEV = "cuda" if HAS_CUDA and not INTERPRET else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERPRET or HAS_CUDA), reason="the Triton backend needs a GPU or TRITON_INTERPRET=1"))]  # fmt: skip


class _TwoLayers(nn.Module):
    """Two 4-bit projections (one with a bias), as a transformer block's q and o would be."""

    def __init__(self, seed: int = 0, compute_dtype: torch.dtype = torch.bfloat16, loaded_in_4bit: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        dense = [nn.Linear(K, N, bias=True), nn.Linear(N, N2, bias=False)]
        self.q = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=compute_dtype, quant_type="nf4")
        self.o = bnb.nn.Linear4bit(N, N2, bias=False, compute_dtype=compute_dtype, quant_type="fp4")
        for q, d in ((self.q, dense[0]), (self.o, dense[1])):
            q.load_state_dict(d.state_dict())
            q.to(DEV)  # bitsandbytes quantizes when the layer moves to its device
        self.is_loaded_in_4bit = loaded_in_4bit  # what transformers sets; PEFT then builds lora.bnb.Linear4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)))


def _model(loaded_in_4bit: bool = True, seed: int = 0, **lora_kw):
    kw = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q", "o"], "init_lora_weights": False}
    kw.update(lora_kw)
    return get_peft_model(_TwoLayers(seed, loaded_in_4bit=loaded_in_4bit), LoraConfig(**kw))


def _layers(model):
    return [model.base_model.model.q, model.base_model.model.o]


def _step(model, x, dy=None):
    """Output and the gradients of x and of every trainable parameter."""
    x = x.detach().requires_grad_()
    y = model(x)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEV).to(y.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    return y.detach(), torch.autograd.grad(y, [x, *params], dy), dy


class _Spy:
    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        real = lkp.lora_linear

        def spy(*args, **kwargs):
            self.calls.append(kwargs | {"x": args[0], "weight": args[1]})
            return real(*args, **kwargs)

        monkeypatch.setattr(lkp, "lora_linear", spy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32], ids=["bf16-x", "fp32-x"])
@pytest.mark.parametrize("loaded_in_4bit", [True, False], ids=["lora.bnb.Linear4bit", "lora.Linear"])
def test_patched_matches_peft(backend, xdt, loaded_in_4bit, monkeypatch) -> None:
    model = _model(loaded_in_4bit)
    expected = "peft.tuners.lora.bnb" if loaded_in_4bit else "peft.tuners.lora.layer"
    assert all(type(m).__module__ == expected for m in _layers(model))
    x = torch.randn(3, 7, K, generator=torch.Generator().manual_seed(1)).to(DEV).to(xdt)
    y0, g0, dy = _step(model, x)
    report = lk.patch(model, backend=backend, log=False)
    assert sorted(report.accelerated) == ["base_model.model.o", "base_model.model.q"] and not report.skipped
    spy = _Spy(monkeypatch)
    y1, g1, _ = _step(model, x, dy)
    assert len(spy.calls) == 2 and all(callable(c["recompute_weight"]) for c in spy.calls)
    # The layers' compute dtype (bf16), whatever x's: the fused GEMM is bitsandbytes' dense one.
    assert all(c["x"].dtype == c["weight"].dtype == torch.bfloat16 for c in spy.calls)
    assert all(m._lk_last_fallback is None for m in _layers(model))
    assert y1.dtype == y0.dtype == xdt
    # Both sides compute the base path in bf16 (the compute dtype): bf16 tolerances. With fp32 x the
    # fused low-rank path reads x rounded to bf16 as the base path does; PEFT's reads it unrounded.
    dtypes = [torch.bfloat16]
    assert_close_ref(y1, y0.double(), dtypes, "y")
    for i, (a, b) in enumerate(zip(g1, g0, strict=True)):
        assert a.dtype == b.dtype
        assert_close_ref(a, b.double(), dtypes, f"grad {i}")
    lk.unpatch(model)
    y2, g2, _ = _step(model, x, dy)
    torch.testing.assert_close(y2, y0, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bitmask", "regenerate"])
def test_dropout_is_the_fused_op_s_on_the_dequantized_weight(backend, mode) -> None:
    """p > 0: PEFT's masks come from torch's RNG, ours from the seed; the patched layer equals a direct
    lora_linear call on the dequantized weight with the same seed (drawn from the same generator state)."""
    model = _model(lora_dropout=0.25)
    lk.patch(model, backend=backend, dropout_mask=mode, log=False)
    layer = model.base_model.model.q
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(2)).to(DEV).to(torch.bfloat16).requires_grad_()
    torch.manual_seed(7)
    y = layer(x)
    base = layer.base_layer
    w = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).to(torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(7)
    ref = lk.lora_linear(x, w, A, B, base.bias.to(torch.bfloat16), scaling=2.0, dropout_p=0.25, backend=backend,
                         dropout_mask=mode)  # fmt: skip
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(DEV).to(y.dtype)
    got = torch.autograd.grad(y, [x, A, B], dy)
    want = torch.autograd.grad(ref, [x, A, B], dy)
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_, atol=0, rtol=0)


def _saved_during(model, x) -> list[torch.Tensor]:
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_what_is_kept_for_backward(backend) -> None:
    """No dense (N, K) weight is kept, the mask is a bitmask (triton), and the layer keeps less than
    PEFT's path does at p = 0.1 (PEFT keeps the dropped fp32 copy of x and a mask per adapter call)."""
    model = _model(lora_dropout=0.1)
    model.train()
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(2)).to(DEV).to(torch.bfloat16).requires_grad_()
    peft_saved = _saved_during(model, x)
    lk.patch(model, backend=backend, log=False)
    ours = _saved_during(model, x)
    weights = {(N, K), (N2, N), (K, N), (N, N2)}
    assert not [t.shape for t in ours if t.is_floating_point() and tuple(t.shape) in weights]
    if backend == "triton":
        assert {tuple(t.shape) for t in ours if t.dtype == torch.uint8} == {(64, K // 8), (64, N // 8)}

    def nbytes(ts):  # distinct storages: a tensor saved twice (x by two ops) counts once
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

    assert nbytes(ours) < nbytes(peft_saved), (nbytes(ours), nbytes(peft_saved))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(backend, use_reentrant) -> None:
    """Checkpointing recomputes the forward (dequantizing again, redrawing the same seed from the restored
    RNG state): the gradients equal the plain run's."""
    model = _model(lora_dropout=0.1)
    lk.patch(model, backend=backend, log=False)
    inner = model.base_model.model
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(5)).to(DEV).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(6, N2, generator=torch.Generator().manual_seed(6)).to(DEV).to(torch.bfloat16)
    leaves = [x, *(p for p in model.parameters() if p.requires_grad)]

    def grads(run) -> list[torch.Tensor]:  # .backward(): reentrant checkpointing refuses autograd.grad
        for t in leaves:
            t.grad = None
        torch.manual_seed(1)
        run().backward(dy)
        return [t.grad.clone() for t in leaves]

    plain = grads(lambda: inner(x))
    ckpt = grads(lambda: torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=use_reentrant))
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_two_active_adapters_stack_into_one_call(monkeypatch) -> None:
    model = _model()
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["q", "o"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(8)).to(DEV).to(torch.bfloat16)
    y0, g0, dy = _step(model, x)
    lk.patch(model, backend="torch", log=False)
    spy = _Spy(monkeypatch)
    y1, g1, _ = _step(model, x, dy)
    assert len(spy.calls) == 2 and spy.calls[0]["scaling"] == 1.0  # stacked: the scalings are in B
    assert_close_ref(y1, y0.double(), [torch.bfloat16], "y")
    assert len(g1) == len(g0) == 1 + 8  # x, and A, B of two adapters on two layers
    for i, (a, b) in enumerate(zip(g1, g0, strict=True)):
        assert_close_ref(a, b.double(), [torch.bfloat16], f"grad {i}")


@pytest.mark.parametrize("cuda_autocast_flag", [False, True], ids=["cpu-autocast", "flag-of-cuda-autocast-set"])
def test_autocast_output_dtype_is_peft_s(cuda_autocast_flag, monkeypatch) -> None:
    """PEFT's 4-bit layer casts the adapters' output back to the result's dtype unless
    ``torch.is_autocast_enabled()`` (CUDA's autocast, no device argument) holds; then it adds it uncast
    and the sum promotes. Its lora.Linear always casts back. Both states, both classes, on CPU: the flag is
    set by a stand-in for torch.is_autocast_enabled() that PEFT's forward and ours both call."""
    if cuda_autocast_flag:
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: True if not a else real(*a))
    x32 = torch.randn(3, K, generator=torch.Generator().manual_seed(9)).to(DEV)
    for loaded in (True, False):
        for xdt, adt in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)):
            model = _model(loaded)
            x = x32.to(xdt)
            with torch.autocast(DEV, dtype=adt):
                y0 = model(x)
                lk.patch(model, backend="torch", log=False)
                y1 = model(x)
            # Promoted only for the 4-bit class with the flag set: bf16 + fp16 -> fp32 (fp32 + bf16 stays fp32).
            # (On a GPU, CUDA's autocast is the one entered here: the flag holds either way.)
            want = torch.float32 if loaded and (cuda_autocast_flag or DEV == "cuda") else xdt
            assert y0.dtype == want, "PEFT's own rule changed"
            assert y1.dtype == want, (loaded, xdt, adt, y1.dtype)
            assert_close_ref(y1, y0.double(), [torch.bfloat16, torch.float16], "y")


def test_states_that_take_peft_s_path(monkeypatch) -> None:
    model = _model()
    lk.patch(model, backend="torch", log=False)
    layer = model.base_model.model.q
    x = torch.randn(2, K, device=DEV).to(torch.bfloat16)
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    layer(x)
    assert not spy.calls and "torch.compile" in layer._lk_last_fallback
    monkeypatch.undo()
    spy = _Spy(monkeypatch)
    with model.disable_adapter():
        model(x)
    assert not spy.calls
    # A 4-bit layer not yet quantized (still on its way to a device): PEFT's path, which says what is wrong.
    raw = bnb.nn.Linear4bit(K, N, compute_dtype=torch.bfloat16)
    assert "not quantized yet" in lkp._bnb_4bit_reason(raw)


def test_dora_on_a_4bit_base_is_reported() -> None:
    model = _model(use_dora=True)
    report = lk.patch(model, backend="torch", log=False)
    assert set(report.fallback) == {"base_model.model.q", "base_model.model.o"}
    assert all("DoRA" in why for why in report.fallback.values())


def test_register_fused_peft_module_leaves_4bit_bases_to_peft() -> None:
    """The build-time path (a lora.Linear subclass) would merge into a 4-bit weight as into a dense one:
    4-bit targets keep PEFT's own layers there; patch() is the way in for them."""
    cfg = lk.register_fused_peft_module(
        LoraConfig(r=4, lora_alpha=8, target_modules=["q", "o"], init_lora_weights=False)
    )
    model = get_peft_model(_TwoLayers(), cfg)
    assert not any(isinstance(m, lkp.FusedLoraLinear) for m in model.modules())
    assert type(model.base_model.model.q).__module__ == "peft.tuners.lora.bnb"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_llama_qlora_matches_peft(backend) -> None:
    """A tiny random Llama (bf16) with its 14 decoder projections in NF4, all-linear LoRA: logits and every
    adapter gradient of the patched model against PEFT's own, and all 14 layers fused."""
    transformers = pytest.importorskip("transformers", reason="the Llama case needs transformers installed")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    base = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16)
    from bench.e2e_peft import quantize_4bit  # what transformers' 4-bit loading leaves (the benchmark's too)

    assert quantize_4bit(base, torch.bfloat16) == 14
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEV)
    gy = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(2)).to(DEV).to(torch.bfloat16)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        (logits * gy).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref_logits, ref_grads = run()
    report = lk.patch(model, backend=backend, log=False)
    assert len(report.accelerated) == 14 and not report.fallback, str(report)
    logits, grads = run()
    assert_close_ref(logits, ref_logits.double(), [torch.bfloat16], "logits")
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for name in grads:
        assert_close_ref(grads[name], ref_grads[name].double(), [torch.bfloat16], name)


def test_bench_e2e_dry_run_with_4bit_bases(tmp_path, capsys) -> None:
    """``bench/e2e_peft.py --base nf4 --dry``: every variant times (no add_lora row: it wraps plain
    nn.Linear layers), the patched row runs all 14 projections fused and names the backend resolved for
    the dequantized weight's dtype, and the CSV says which base it timed."""
    import csv

    import bench.e2e_peft as e2e

    path = tmp_path / "e2e.csv"
    rows = e2e.main(["--dry", "--base", "nf4", "--csv", str(path)])
    assert [r["variant"] for r in rows] == ["floor", "peft_default", "peft_bf16", "patched"]
    assert [r["backend_resolved"] for r in rows] == ["", "", "", "torch:14"]
    captured = capsys.readouterr()
    assert "llama (nf4), 2 layers" in captured.out and "14 of 14 LoRA layers run fused" in captured.err
    with path.open(newline="") as f:
        assert {r["base"] for r in csv.DictReader(f)} == {"nf4"}
    for argv, msg in ((["--arch", "gpt2"], "llama only"), (["--variants", "patched,add_lora"], "not with --base nf4")):
        with pytest.raises(SystemExit):
            e2e.parse_args(["--base", "nf4", *argv])
        assert msg in capsys.readouterr().err
