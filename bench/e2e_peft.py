"""End-to-end LoRA fine-tuning throughput: PEFT with and without lora_kernels.patch.

A Llama-style model (random init; default: 4 decoder layers at Llama-3-8B sizes, bf16,
sequence 2048 x batch 4), LoRA r=16 on all linear layers, dropout 0.05, AdamW on the adapters.
``--arch gpt2`` times a GPT-2 model instead (default: 4 blocks at GPT-2 XL sizes, sequence 1024 x
batch 8): its projections are transformers' ``Conv1D``, weight stored (K, N) (PEFT's
``fan_in_fan_out``), so the patched row times the kernels on a transposed weight.
``--base nf4`` (Llama only) times QLoRA: every decoder projection becomes a bitsandbytes NF4 ``Linear4bit``
(compute dtype = ``--dtype``) before the adapters go on, as loading with transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` leaves them (needs bitsandbytes; no ``add_lora`` row there).
Each variant builds a fresh model and reports tokens/s at the median step time (each timed step synchronised;
min and max go to the CSV) and peak GPU memory, allocated and reserved, over the timed steps (forward +
backward + optimizer step):

  floor         same model, no adapters, backward to the embeddings only (no weight grads):
                the cost of the frozen model itself, what LoRA overhead is measured against (its
                backward also computes layer 0's input gradients, which the LoRA variants skip:
                ≈ 1-2 % of a backward, in the LoRA variants' favour)
  peft_default  PEFT's defaults (adapters kept in fp32 next to the bf16 base)
  peft_bf16     PEFT with ``autocast_adapter_dtype=False`` (bf16 adapters)
  patched       PEFT's defaults + ``lora_kernels.patch(model)``
  add_lora      no PEFT: ``lora_kernels.add_lora(model)`` wraps the same layers in LoRALinear (fp32
                adapters, as PEFT's default; GPT-2's Conv1D layers too, their weight read in place)

Prints a table and appends one CSV row per variant to ``bench/results/e2e_<gpu-slug>.csv`` (GPU name,
commit, date, torch/peft/transformers versions, sizes). ``--dry`` runs a tiny fp32 config on the
CPU in seconds (a smoke test; it writes no CSV unless ``--csv`` is given).

    python bench/e2e_peft.py                       # the full H100 configuration
    python bench/e2e_peft.py --layers 2 --seq 1024 # shrink
    python bench/e2e_peft.py --arch gpt2           # GPT-2 XL sizes (Conv1D projections)
    python bench/e2e_peft.py --base nf4            # QLoRA: 4-bit decoder projections (bitsandbytes)
    python bench/e2e_peft.py --dry
"""

from __future__ import annotations

import argparse
import collections
import csv
import datetime
import gc
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's lora_kernels
    sys.path.insert(0, str(ROOT))

VARIANTS = ("floor", "peft_default", "peft_bf16", "patched", "add_lora")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CSV_FIELDS = [
    "gpu", "commit", "date", "torch", "peft", "transformers", "variant", "arch", "base", "layers", "hidden",
    "intermediate", "heads", "kv_heads", "vocab", "seq", "batch", "r", "lora_alpha", "dropout",
    "dtype", "backend", "backend_resolved", "dropout_mask", "warmup", "steps", "step_ms", "step_ms_min", "step_ms_max",
    "tokens_per_s", "peak_gib", "reserved_gib",
]  # fmt: skip


# Per-architecture defaults of the model sizes (an explicit flag wins): Llama-3-8B's decoder layer, and
# GPT-2 XL's block (its attention has no grouped KV heads: kv_heads is n_head).
SIZES = {
    "llama": {"layers": 4, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": 128256,
              "seq": 2048, "batch": 4},
    "gpt2": {"layers": 4, "hidden": 1600, "intermediate": 6400, "heads": 25, "kv_heads": 25, "vocab": 50257,
             "seq": 1024, "batch": 8},
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    arch_help = "llama (nn.Linear projections) or gpt2 (transformers' Conv1D, weight stored (K, N))"
    p.add_argument("--arch", choices=sorted(SIZES), default="llama", help=arch_help)
    p.add_argument("--base", choices=("dense", "nf4"), default="dense",
                   help="nf4: decoder projections in bitsandbytes 4-bit (QLoRA; llama only)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="default per --arch (llama: 4, gpt2: 4)")
    p.add_argument("--hidden", type=int, default=None, help="default per --arch (llama: 4096, gpt2: 1600)")
    p.add_argument("--intermediate", type=int, default=None, help="default per --arch (llama: 14336, gpt2: 6400)")
    p.add_argument("--heads", type=int, default=None, help="default per --arch (llama: 32, gpt2: 25)")
    p.add_argument("--kv-heads", type=int, default=None, help="llama only (default 8); gpt2 has none")
    p.add_argument("--vocab", type=int, default=None, help="default per --arch (llama: 128256, gpt2: 50257)")
    p.add_argument("--seq", type=int, default=None, help="default per --arch (llama: 2048, gpt2: 1024)")
    p.add_argument("--batch", type=int, default=None, help="default per --arch (llama: 4, gpt2: 8)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--backend", default="auto", help="lora_kernels backend for the patched variant")
    p.add_argument("--dropout-mask", default="bitmask", choices=("bitmask", "regenerate"))
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {VARIANTS} (default: all; "
                   "with --base nf4 all but add_lora)")  # fmt: skip
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--csv", default=None, help="CSV to append to (default bench/results/e2e_<gpu>.csv)")
    p.add_argument("--no-csv", action="store_true", help="print only")
    p.add_argument("--dry", action="store_true", help="tiny fp32 config on the CPU (smoke test)")
    args = p.parse_args(argv)
    if args.arch == "gpt2" and args.kv_heads is not None:
        p.error("--kv-heads: GPT-2's attention has no grouped KV heads")
    for name, value in SIZES[args.arch].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dry:
        args.layers, args.hidden, args.intermediate, args.heads = 2, 64, 128, 4
        args.kv_heads = 2 if args.arch == "llama" else 4
        args.vocab, args.seq, args.batch, args.r, args.lora_alpha = 128, 32, 2, 8, 16
        args.dtype, args.device, args.steps, args.warmup = "fp32", "cpu", 2, 1
        args.no_csv = args.no_csv or args.csv is None
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.base == "nf4" and args.arch != "llama":
        p.error("--base nf4 quantizes nn.Linear projections: --arch llama only")
    default = [v for v in VARIANTS if args.base == "dense" or v != "add_lora"]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else default
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.base == "nf4" and "add_lora" in args.variants:
        p.error("add_lora wraps plain nn.Linear layers only: not with --base nf4")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def build_model(args: argparse.Namespace):
    """A random-init LlamaForCausalLM (or GPT2LMHeadModel) in ``args.dtype`` on ``args.device``."""
    if args.arch == "gpt2":
        from transformers import GPT2Config
        from transformers import GPT2LMHeadModel as Model

        # The model's own dropout off, as in Llama's config: the rows differ only in the LoRA layers.
        cfg = GPT2Config(
            n_embd=args.hidden, n_inner=args.intermediate, n_layer=args.layers, n_head=args.heads,
            vocab_size=args.vocab, n_positions=max(args.seq, 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    else:
        from transformers import LlamaConfig
        from transformers import LlamaForCausalLM as Model

        cfg = LlamaConfig(
            hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
            max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False,
        )  # fmt: skip
    # Create the weights directly in the target dtype and device (as from_pretrained does):
    # no fp32 copy of a multi-GiB model, and RoPE buffers built explicitly in fp32 stay so.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[args.dtype])
    try:
        with torch.device(args.device):
            model = Model(cfg)
    finally:
        torch.set_default_dtype(previous)
    if args.base == "nf4":
        quantize_4bit(model, DTYPES[args.dtype])
    return model


def quantize_4bit(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Every ``nn.Linear`` of the decoder layers becomes a bitsandbytes NF4 ``Linear4bit`` holding its
    weights (quantized as it moves back to the layer's device), and the model is marked
    ``is_loaded_in_4bit``: what ``from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))`` leaves
    (the output layer stays dense). Returns the number of layers quantized."""
    import bitsandbytes as bnb

    n = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or ".layers." not in name:
            continue
        with torch.device("cpu"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4")  # fmt: skip
        q.load_state_dict(module.state_dict())
        q = q.to(module.weight.device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        n += 1
    model.is_loaded_in_4bit = True
    return n


def prepare(variant: str, args: argparse.Namespace):
    """(model, trainable params) for one variant."""
    from bench._impls import import_peft
    from lora_kernels.integrations import patch

    LoraConfig, get_peft_model = import_peft()
    model = build_model(args)
    if variant == "floor":
        model.requires_grad_(False)
        # Backward runs through every layer down to the embedding output, computing activation
        # gradients only: the frozen model's own training cost.
        model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        return model, []
    if variant == "add_lora":
        import lora_kernels as lk

        lk.add_lora(model, args.r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout, backend=args.backend,
                    dropout_mask=args.dropout_mask)  # fmt: skip
        return model, [p for p in model.parameters() if p.requires_grad]
    # "all-linear" takes GPT-2's Conv1D projections too; fan_in_fan_out says their weight is (K, N)
    # (PEFT would set it itself, with a warning).
    cfg = LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout, target_modules="all-linear",
                     fan_in_fan_out=args.arch == "gpt2")  # fmt: skip
    model = get_peft_model(model, cfg, autocast_adapter_dtype=variant != "peft_bf16")
    if variant == "patched":
        report = patch(model, backend=args.backend, dropout_mask=args.dropout_mask, log=False)
        print(report, file=sys.stderr)
    return model, [p for p in model.parameters() if p.requires_grad]


def backends_used(model: torch.nn.Module) -> str:
    """What the patched layers' ``backend`` runs ("auto" resolved for each layer's device, dtypes and
    rank), e.g. "triton:28" or "cuda:4,triton:24": a row says which kernels it timed."""
    from lora_kernels import LoRALinear
    from lora_kernels.backends import resolved_backend
    from lora_kernels.integrations.peft import _Conv1D, _is_bnb_4bit, _is_fused

    counts: collections.Counter[str] = collections.Counter()
    for m in model.modules():
        if isinstance(m, LoRALinear):  # the add_lora row
            w = m.weight
            counts[resolved_backend(m.backend, w.new_empty((1, w.shape[1])), w, m.lora_A)] += 1
        elif _is_fused(m):
            base, A = m.get_base_layer(), m.lora_A[m.active_adapters[0]].weight
            if _is_bnb_4bit(base):  # the fused call gets the weight dequantized to the compute dtype
                cdt = base.compute_dtype or DTYPES["bf16"]
                w = torch.empty((), dtype=cdt, device=base.weight.device).expand(base.out_features, base.in_features)
            else:
                w = base.weight.T if isinstance(base, _Conv1D) else base.weight  # (N, K), as the fused call passes it
            counts[resolved_backend(getattr(m, "_lk_backend", "auto"), w.new_empty((1, w.shape[1])), w, A)] += 1
    return ",".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Build, warm up and time one variant; returns its measurements."""
    # The same token ids in every variant (drawn before the build: PEFT's init consumes the global RNG).
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    torch.manual_seed(0)
    model, params = prepare(variant, args)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    cuda = args.device.startswith("cuda")

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(args.device)
    fallback = {n: m.__dict__["_lk_last_fallback"] for n, m in model.named_modules()
                if m.__dict__.get("_lk_last_fallback")}  # fmt: skip
    if fallback:  # the "patched" row would time PEFT's own path for these layers
        raise RuntimeError(f"{len(fallback)} patched layers ran PEFT's path: {next(iter(fallback.items()))}")
    resolved = backends_used(model) if variant in ("patched", "add_lora") else ""
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    times = []
    for _ in range(args.steps):  # one sync per step (a step is ~10^2 ms): the median resists a slow step
        t0 = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    gib = 2**30
    return {
        "variant": variant,
        "backend_resolved": resolved,
        "step_ms": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "tokens_per_s": args.batch * args.seq / median,
        "peak_gib": torch.cuda.max_memory_allocated(args.device) / gib if cuda else float("nan"),
        # What must fit on the card: the caching allocator's reserve, not only what tensors hold.
        "reserved_gib": torch.cuda.max_memory_reserved(args.device) / gib if cuda else float("nan"),
    }


def _gpu_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _commit() -> str:
    # As the benchmark CSV's: git, else $LORA_KERNELS_COMMIT or .device/COMMIT (the device has no .git).
    from bench._report import _git_commit

    return _git_commit(ROOT)


def format_table(rows: list[dict]) -> str:
    floor = next((r["tokens_per_s"] for r in rows if r["variant"] == "floor"), None)
    lines = [f"{'variant':<14} {'tokens/s':>12} {'step ms':>10} {'peak GiB':>9} {'vs floor':>9}"]
    for r in rows:
        rel = f"{r['tokens_per_s'] / floor:.2f}x" if floor else "-"
        peak = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        lines.append(f"{r['variant']:<14} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>10.1f} {peak:>9} {rel:>9}")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    import peft
    import transformers

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    common = {
        "gpu": _gpu_name(args.device), "commit": _commit(), "date": date,
        "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
        "arch": args.arch, "base": args.base, "layers": args.layers, "hidden": args.hidden,
        "intermediate": args.intermediate,
        "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "seq": args.seq,
        "batch": args.batch, "r": args.r, "lora_alpha": args.lora_alpha, "dropout": args.dropout,
        "dtype": args.dtype, "backend": args.backend, "dropout_mask": args.dropout_mask, "warmup": args.warmup,
        "steps": args.steps,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            if next(csv.reader(f), []) != CSV_FIELDS:  # columns changed since: never mix headers
                path = path.with_name(f"{path.stem}-{date.replace(':', '')}{path.suffix}")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for r in rows:
            numbers = {k: f"{r[k]:.2f}" for k in ("step_ms", "step_ms_min", "step_ms_max")}
            numbers |= {"tokens_per_s": f"{r['tokens_per_s']:.0f}"}
            numbers |= {k: f"{r[k]:.3f}" for k in ("peak_gib", "reserved_gib")}
            writer.writerow({**common, **r, **numbers})


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    print(
        f"e2e_peft on {_gpu_name(args.device)}: {args.arch} ({args.base}), {args.layers} layers, hidden {args.hidden}, "
        f"MLP {args.intermediate}, seq {args.seq} x batch {args.batch}, {args.dtype}, LoRA r={args.r} "
        f"alpha={args.lora_alpha:g} dropout={args.dropout:g}, {args.steps} timed steps"
    )
    rows, failed = [], []
    for variant in args.variants:
        try:
            rows.append(run_variant(variant, args))
            print(format_table(rows[-1:]), flush=True)  # a later crash or kill keeps this number
        except Exception as e:  # one failing variant (OOM, a kernel error) must not lose the others
            failed.append(f"{variant}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"e2e_peft: {failed[-1]}", file=sys.stderr, flush=True)
        gc.collect()  # the variant's model and optimizer state go before the next one is built
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(format_table(rows))
    if not args.no_csv:
        # Same slug as bench/lora_linear.py's results files: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3".
        slug = re.sub(r"[^a-z0-9]+", "-", _gpu_name(args.device).lower()).strip("-") or "unknown"
        path = Path(args.csv) if args.csv else ROOT / "bench" / "results" / f"e2e_{slug}.csv"
        write_csv(path, rows, args)
        print(f"appended {len(rows)} rows to {path}")
    if failed:
        raise SystemExit(f"e2e_peft: {len(failed)} variant(s) failed: " + "; ".join(failed))
    return rows


if __name__ == "__main__":
    main()
