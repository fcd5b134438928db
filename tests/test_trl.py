"""TRL's SFTTrainer over the fused layers, both ways in that the README gives: ``peft_config=
lk.register_fused_peft_module(cfg)`` (TRL builds the PEFT model, fused from the start) and
``lk.patch(trainer.model)`` after the trainer is built. A tiny random Llama and a word-level tokenizer made
here (no hub)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl", reason="the TRL integration tests need trl installed")
datasets = pytest.importorskip("datasets", reason="the TRL integration tests need datasets installed")

from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import lora_kernels as lk  # noqa: E402
import lora_kernels.integrations.peft as lkp  # noqa: E402
from tests._utils import HAS_CUDA, INTERPRET, assert_close_ref  # noqa: E402
from tests.test_peft import N_LINEAR, VOCAB, _llama, _lora_linears, _Spy  # noqa: E402

needs_triton = pytest.mark.skipif(
    not (INTERPRET or HAS_CUDA), reason="the Triton backend needs a GPU or TRITON_INTERPRET=1"
)


def _tokenizer() -> PreTrainedTokenizerFast:
    """Words w0 … w124 and three specials: VOCAB ids, as the tiny Llama has."""
    vocab = {f"w{i}": i for i in range(VOCAB - 3)} | {"<pad>": VOCAB - 3, "<eos>": VOCAB - 2, "<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _dataset():
    """Eight texts of 15 random words (16 tokens with the EOS that SFTTrainer appends)."""
    g = torch.Generator().manual_seed(3)
    words = torch.randint(0, VOCAB - 3, (8, 15), generator=g)
    return datasets.Dataset.from_dict({"text": [" ".join(f"w{int(w)}" for w in row) for row in words]})


def _sft_run(tmp_path, monkeypatch, route: str | None, backend: str, p: float, bf16: bool) -> tuple[dict, dict, list]:
    """Three SGD steps of SFTTrainer (two micro-batches of two texts each, TRL's default gradient
    checkpointing); the adapters before and after, and each fused call's output dtype.
    ``route``: None (PEFT's own layers), "register" or "patch"."""
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules="all-linear", init_lora_weights=False)
    if route == "register":
        assert lk.register_fused_peft_module(cfg, backend=backend) is cfg
    args = SFTConfig(
        output_dir=str(tmp_path / f"sft-{route}-{backend}-{bf16}"), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant",
        seed=0, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=not HAS_CUDA,
        bf16=bf16, max_length=32,
    )  # fmt: skip
    assert args.gradient_checkpointing  # TRL's default, kept: the fused layers run under it
    trainer = SFTTrainer(
        model=_llama(), args=args, train_dataset=_dataset(), processing_class=_tokenizer(), peft_config=cfg
    )
    model = trainer.model
    layers = _lora_linears(model)
    assert len(layers) == N_LINEAR
    if route == "patch":
        report = lk.patch(model, backend=backend, log=False)
        assert len(report.accelerated) == N_LINEAR, report
    if route == "register":  # PEFT built fused layers (patch() instead swaps each layer's forward)
        assert all(isinstance(m, lkp.FusedLoraLinear) for m in layers)
    init = {n: t.detach().cpu().double().clone() for n, t in model.named_parameters() if t.requires_grad}
    with monkeypatch.context() as mp:
        spy = _Spy(mp)
        trainer.train()
    out = {n: t.detach().cpu().double() for n, t in model.named_parameters() if t.requires_grad}
    if route is not None:  # every LoRA Linear's last call ran fused
        assert [m._lk_last_fallback for m in layers] == [None] * N_LINEAR
    else:
        assert spy.out_dtypes == []
    return init, out, spy.out_dtypes


def _assert_trained_alike(init, out, ref_init, ref, dtypes) -> None:
    assert out.keys() == ref.keys() == init.keys() and len(out) == 2 * N_LINEAR
    for name in out:
        assert torch.equal(init[name], ref_init[name]), f"{name}: the two runs started apart"
        assert (ref[name] - ref_init[name]).abs().max() > 1e-3, f"{name} did not train"
        assert_close_ref(out[name] - init[name], ref[name] - ref_init[name], dtypes, f"{name} update")


@needs_triton
@pytest.mark.parametrize("route, p", [("register", 0.0), ("patch", 0.1)])
def test_sft_trainer_trains_the_fused_layers(tmp_path, monkeypatch, route: str, p: float) -> None:
    """fp32 (``bf16=False``): the adapters after three steps on the Triton kernels match the same run on
    PEFT's own layers (p = 0) or, where PEFT's dropout masks differ from ours, on the reference backend."""
    ref_init, ref, _ = _sft_run(tmp_path, monkeypatch, None if p == 0 else "patch", "torch", p, bf16=False)
    init, out, dtypes = _sft_run(tmp_path, monkeypatch, route, "triton", p, bf16=False)
    # 3 steps x 2 micro-batches x 14 layers, and more where checkpointing replays a forward in backward
    assert len(dtypes) > 6 * N_LINEAR and set(dtypes) == {torch.float32}
    _assert_trained_alike(init, out, ref_init, ref, [torch.float32])


def _rel_update_err(init, out, ref_init, ref) -> float:
    """|| update - the fp32 run's update || / || the fp32 run's update ||, over all adapters together."""
    err = sum(((out[n] - init[n]) - (ref[n] - ref_init[n])).square().sum() for n in ref)
    return (err / sum((ref[n] - ref_init[n]).square().sum() for n in ref)).sqrt().item()


def test_sft_trainer_defaults_train_under_bf16_autocast(tmp_path, monkeypatch) -> None:
    """TRL's own defaults (``bf16=True``: fp32 weights under bf16 autocast, and gradient checkpointing): the
    fused layers run in bf16 and train as PEFT's layers do under the same autocast. Both runs' updates
    differ from the fp32 run's by bf16's rounding over three steps (about 10 % here, PEFT's as ours), so the
    check is against PEFT's own distance from it; a wrong scaling or a missing gradient is ~100 %."""
    ref_init, ref, _ = _sft_run(tmp_path, monkeypatch, None, "torch", 0.0, bf16=False)
    peft_init, peft, _ = _sft_run(tmp_path, monkeypatch, None, "torch", 0.0, bf16=True)
    init, out, dtypes = _sft_run(tmp_path, monkeypatch, "register", "torch", 0.0, bf16=True)
    assert len(dtypes) > 6 * N_LINEAR and set(dtypes) == {torch.bfloat16}
    peft_err = _rel_update_err(peft_init, peft, ref_init, ref)
    err = _rel_update_err(init, out, ref_init, ref)
    assert 0 < peft_err < 0.25, peft_err  # the runs really were bf16, and trained alike
    assert err <= 1.5 * peft_err, f"fused bf16 update {err:.3f} from fp32's, PEFT's {peft_err:.3f}"
