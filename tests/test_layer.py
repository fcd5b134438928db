"""LoRALinear: forward/backward against the reference, init, merge/unmerge, train/eval, training."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from lora_kernels.api import new_seed
from lora_kernels.layer import LoRALinear
from lora_kernels.reference import lora_linear_ref
from tests._utils import assert_close_ref

HAS_TRITON_BACKEND = importlib.util.find_spec("triton") is not None


def _layer(
    K: int = 24, N: int = 40, r: int = 4, dtype: torch.dtype = torch.float32, bias: bool = True, **kw
) -> LoRALinear:
    base = nn.Linear(K, N, bias=bias, dtype=dtype)
    layer = LoRALinear(base, r, **kw)
    with torch.no_grad():  # B = 0 at init would make dA zero and hide errors in it
        layer.lora_B.normal_(0.0, 0.5)
        if layer.lora_bias is not None:
            layer.lora_bias.normal_()
    return layer


def _ref64(layer: LoRALinear, x: torch.Tensor, p: float = 0.0, seed: int | None = None):
    """float64 reference output and (x, A, B, lora_bias) leaves for gradients."""
    leaves = [
        t.detach().double().requires_grad_(True) if t is not None else None
        for t in (x, layer.lora_A, layer.lora_B, layer.lora_bias)
    ]
    w = layer.base_layer.weight.detach().double()
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    y = lora_linear_ref(leaves[0], w, leaves[1], leaves[2], b, leaves[3], layer.scaling, p, True, seed)
    return y, leaves


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_reference(lora_bias: bool, use_rslora: bool) -> None:
    torch.manual_seed(0)
    layer = _layer(lora_alpha=16, use_rslora=use_rslora, lora_bias=lora_bias, backend="torch")
    x = torch.randn(3, 5, 24, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref, leaves = _ref64(layer, x)
    ref.backward(gy.double())
    assert_close_ref(y, ref, [torch.float32], "y")
    assert_close_ref(x.grad, leaves[0].grad, [torch.float32], "dx")
    assert_close_ref(layer.lora_A.grad, leaves[1].grad, [torch.float32], "dA")
    assert_close_ref(layer.lora_B.grad, leaves[2].grad, [torch.float32], "dB")
    if lora_bias:
        assert_close_ref(layer.lora_bias.grad, leaves[3].grad, [torch.float32], "dlora_bias")
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    expected = 16 / math.sqrt(4) if use_rslora else 16 / 4
    assert layer.scaling == pytest.approx(expected)


def test_init_and_frozen_base() -> None:
    torch.manual_seed(0)
    base = nn.Linear(256, 32, dtype=torch.bfloat16)
    layer = LoRALinear.from_linear(base, r=8, lora_alpha=16, lora_bias=True)
    assert layer.base_layer is base and not base.weight.requires_grad and not base.bias.requires_grad
    # PEFT's default: fp32 adapters next to a half-precision base.
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.lora_bias.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_bias) == 0
    # kaiming_uniform(a=sqrt(5)) on fan_in K: bound = sqrt(6 / ((1 + 5) K)) = 1/sqrt(K).
    bound = 1.0 / math.sqrt(256)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    # B = 0: the adapted layer starts out as the base layer.
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B", "lora_bias"]
    assert LoRALinear(nn.Linear(8, 8, dtype=torch.float64), 2).lora_A.dtype == torch.float64
    assert LoRALinear(nn.Linear(8, 8), 2, adapter_dtype=torch.float16).lora_B.dtype == torch.float16


def test_argument_errors() -> None:
    base = nn.Linear(8, 8)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(8, 8, 1), 2)
    with pytest.raises(ValueError, match="r must be"):
        LoRALinear(base, 0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(base, 2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        LoRALinear(base, 2, backend="cutlass")
    with pytest.raises(ValueError, match="dropout_mask"):
        LoRALinear(base, 2, dropout_mask="bytes")
    with pytest.raises(TypeError, match="^adapter_dtype must be a floating dtype, got torch.int8"):
        LoRALinear(base, 2, adapter_dtype=torch.int8)


def test_seed_and_extra_state_stay_on_the_cpu_whatever_the_default_device() -> None:
    """Under torch.set_default_device("cuda") a seed drawn on the default device would come from the
    CUDA generator with a host sync per call; the meta device shows it without a GPU (.item() raises
    there), as it does for the merged flag's state tensor."""
    torch.manual_seed(5)
    expected = new_seed()
    with torch.device("meta"):
        torch.manual_seed(5)
        assert new_seed() == expected
        layer = LoRALinear(nn.Linear(8, 8), 2)
        state = layer.get_extra_state()
    assert state.device.type == "cpu" and not bool(state)


def test_dropout_without_a_seed_is_refused_inside_a_cuda_graph_capture(monkeypatch) -> None:
    """A captured call would bake the host seed into the graph: every replay, the same mask. That
    is refused with a reason; an explicit seed, eval() or p = 0 are the user's choices and run."""
    import lora_kernels as lk
    from lora_kernels.api import CAPTURE_SEED_MESSAGE

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    layer = _layer(lora_dropout=0.1, backend="torch")
    x = torch.randn(3, 24)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture") as err:
        layer(x)
    assert str(err.value) == CAPTURE_SEED_MESSAGE
    args = (x, layer.base_layer.weight, layer.lora_A, layer.lora_B)
    with pytest.raises(RuntimeError, match="same dropout mask"):
        lk.lora_linear(*args, dropout_p=0.1, backend="torch")
    lk.lora_linear(*args, dropout_p=0.1, seed=7, backend="torch")
    lk.lora_linear(*args, dropout_p=0.0, backend="torch")
    lk.lora_linear(*args, dropout_p=0.1, training=False, backend="torch")
    layer.eval()
    layer(x)


def test_dropout_train_uses_seeded_mask_and_eval_disables_it() -> None:
    torch.manual_seed(0)
    layer = _layer(lora_dropout=0.3, backend="torch")
    x = torch.randn(6, 24)
    # train: the seed is drawn from torch's default generator, so it can be replayed.
    torch.manual_seed(123)
    seed = new_seed()
    torch.manual_seed(123)
    y_train = layer(x)
    ref_drop, _ = _ref64(layer, x, p=0.3, seed=seed)
    ref_nodrop, _ = _ref64(layer, x, p=0.0)
    assert_close_ref(y_train, ref_drop, [torch.float32], "train")
    assert (y_train.double() - ref_nodrop).abs().max() > 1e-3, "dropout had no effect in train mode"
    y_train2 = layer(x)  # next call, next seed: a different mask
    assert not torch.allclose(y_train, y_train2)
    layer.eval()
    y_eval = layer(x)
    assert_close_ref(y_eval, ref_nodrop, [torch.float32], "eval")
    torch.testing.assert_close(layer(x), y_eval, atol=0, rtol=0)


@pytest.mark.parametrize("biases", ["both", "none"])  # "none": Llama's layers (no bias, no lora_bias)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_round_trip(dtype: torch.dtype, biases: str) -> None:
    torch.manual_seed(0)
    with_b = biases == "both"
    layer = _layer(K=64, N=48, r=8, dtype=dtype, bias=with_b, lora_bias=with_b, lora_alpha=16, backend="torch")
    layer.eval()
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone() if with_b else torch.zeros(())
    x = torch.randn(5, 64, dtype=dtype)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    layer.merge()  # idempotent
    delta = layer.lora_B.double() @ layer.lora_A.double() * layer.scaling
    # fp32 add, one cast: within one rounding of W's dtype of the exact merged weight.
    ulp = 2 * torch.finfo(dtype).eps * max(w0.abs().max().item(), delta.abs().max().item())
    assert (layer.base_layer.weight.double() - (w0.double() + delta)).abs().max().item() <= ulp
    y_merged = layer(x)
    # After merge forward is the plain linear with the merged weight.
    torch.testing.assert_close(y_merged, nn.functional.linear(x, layer.weight, layer.bias), atol=0, rtol=0)
    assert_close_ref(y_merged, y_unmerged.double(), [dtype], "merged vs unmerged")
    layer.unmerge()
    assert not layer.merged
    layer.unmerge()  # idempotent
    # One rounding of W's dtype per direction.
    assert (layer.base_layer.weight.double() - w0.double()).abs().max().item() <= ulp
    if with_b:
        assert (layer.base_layer.bias.double() - b0.double()).abs().max().item() <= ulp
    else:
        assert layer.base_layer.bias is None and layer.lora_bias is None
    assert_close_ref(layer(x), y_unmerged.double(), [dtype], "after unmerge")


def test_merge_needs_base_bias_for_lora_bias() -> None:
    layer = LoRALinear(nn.Linear(8, 8, bias=False), 2, lora_bias=True)
    with pytest.raises(RuntimeError, match="no bias"):
        layer.merge()


def test_state_dict_round_trip_keeps_merged_state() -> None:
    torch.manual_seed(0)
    layer = _layer(lora_bias=True, backend="torch").eval()
    keys = set(layer.state_dict())
    assert keys == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B", "lora_bias", "_extra_state"}
    layer.merge()
    fresh = LoRALinear(nn.Linear(24, 40), 4, lora_bias=True, backend="torch").eval()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    x = torch.randn(3, 24)
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)
    fresh.unmerge()
    layer.unmerge()
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)


def test_optimizer_steps_reduce_loss_with_dropout() -> None:
    torch.manual_seed(0)
    K, N = 32, 16
    target = nn.Linear(K, N)
    layer = LoRALinear(nn.Linear(K, N), r=4, lora_alpha=8, lora_dropout=0.1, lora_bias=True, backend="torch")
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=2e-2)
    x = torch.randn(256, K)
    with torch.no_grad():
        y_target = target(x)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(layer(x), y_target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_extra_repr_and_properties() -> None:
    layer = LoRALinear(nn.Linear(16, 8, bias=False), 4, lora_alpha=8, lora_dropout=0.05)
    text = repr(layer)
    for part in ("in_features=16", "out_features=8", "r=4", "scaling=2", "lora_dropout=0.05", "bias=False"):
        assert part in text, text
    assert layer.bias is None and layer.weight is layer.base_layer.weight


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
def test_triton_backend_matches_reference_fp32() -> None:
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = _layer(K=64, N=64, r=16, lora_dropout=0.1, lora_bias=True, backend="triton").to(dev)
    x = torch.randn(2, 32, 64, device=dev, requires_grad=True)
    torch.manual_seed(7)
    seed = new_seed()
    torch.manual_seed(7)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref, leaves = _ref64(layer, x, p=0.1, seed=seed)
    ref.backward(gy.double())
    assert_close_ref(y, ref, [torch.float32], "y")
    grads = (x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_bias.grad)
    for got, leaf, name in zip(grads, leaves, ("dx", "dA", "dB", "dlora_bias"), strict=True):
        assert_close_ref(got, leaf.grad, [torch.float32], name)


@pytest.mark.skipif(not HAS_TRITON_BACKEND, reason="triton is not installed")
@pytest.mark.parametrize("dropout_mask", ["bitmask", "regenerate"])
def test_dropout_mask_option_reaches_the_kernels(dropout_mask: str) -> None:
    """The layer's ``dropout_mask`` decides what the kernels keep for backward: the packed keep bits
    (M, ceil(K/8)) uint8 in "bitmask" mode, no mask at all in "regenerate" mode."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = _layer(K=40, N=32, r=4, lora_dropout=0.3, backend="triton", dropout_mask=dropout_mask).to(dev)
    x = torch.randn(2, 3, 40, device=dev, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    masks = [tuple(t.shape) for t in saved if t.dtype == torch.uint8 and t.numel() > 0]
    assert masks == ([(6, 5)] if dropout_mask == "bitmask" else []), masks
    y.sum().backward()
    assert torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv1d_base_is_read_in_place_and_merges(backend: str) -> None:
    """transformers' Conv1D (GPT-2's projections: y = x W + b, W stored (K, N)) as the base: the same
    function as an nn.Linear holding Wᵀ, the kernels reading the (K, N) weight in place (no copy), and
    merge/unmerge updating that storage."""
    if backend == "triton" and not HAS_TRITON_BACKEND:
        pytest.skip("triton is not installed")
    transformers = pytest.importorskip("transformers", reason="Conv1D is transformers'")
    Conv1D = transformers.pytorch_utils.Conv1D
    dev = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    torch.manual_seed(0)
    K, N, r = 48, 40, 8
    conv = Conv1D(N, K).to(dev)
    torch.nn.init.normal_(conv.bias)
    linear = nn.Linear(K, N).to(dev)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a = LoRALinear(conv, r, lora_alpha=16, lora_dropout=0.2, lora_bias=True, backend=backend)
    b = LoRALinear(linear, r, lora_alpha=16, lora_dropout=0.2, lora_bias=True, backend=backend)
    assert (a.in_features, a.out_features) == (K, N) and a.weight.shape == (N, K)
    assert a.weight.data_ptr() == conv.weight.data_ptr() and a.bias is conv.bias
    with torch.no_grad():
        for p, q in zip((a.lora_A, a.lora_B, a.lora_bias), (b.lora_A, b.lora_B, b.lora_bias), strict=True):
            p.copy_(torch.randn_like(p))
            q.copy_(p)
    x = torch.randn(3, 5, K, device=dev)
    gy = torch.randn(3, 5, N, device=dev)
    outs = []
    for layer in (a, b):
        torch.manual_seed(11)  # the same dropout seed for both
        y = layer(x)
        y.backward(gy)
        outs.append((y.detach(), layer.lora_A.grad, layer.lora_B.grad, layer.lora_bias.grad))
    for got, want, name in zip(outs[0], outs[1], ("y", "dA", "dB", "dlora_bias"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    a.eval()
    expected = a(x)
    w0 = conv.weight.clone()
    a.merge()
    assert isinstance(a.base_layer, Conv1D) and a.base_layer is conv
    # The Conv1D itself now holds W + s·B·A; x·(W + s·B·A) rounds otherwise than x·W + s·(x·A)·B (on a GPU, 1e-5 of
    # an output of ~10 was seen).
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a(x), expected, rtol=1e-5, atol=1e-5)
    a.unmerge()
    torch.testing.assert_close(conv.weight, w0, rtol=1e-6, atol=1e-6)
