"""The launch cache of ``lora_kernels.triton_ops.launch``: a hit launches what ``JITFunction.run`` would.

The eager Triton path launches an already-compiled kernel straight through its runner once Triton has
launched that specialization itself (bench/NOTES.md, session 38). These tests run the whole host path on
the CPU under ``record_launches`` (the kernels compile for sm_90, their launchers record instead of
calling the driver), in a subprocess without TRITON_INTERPRET so that the kernels are JITFunctions, and
compare what reaches the launcher with the cache on and off: the same compiled kernels (Triton's hash),
grids and every parameter, for each launch of a training step, on the paths that take it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("triton")
pytest.importorskip("triton.tools.tensor_descriptor", reason="needs Triton's host TensorDescriptor (3.4+)")


def _run(script: str, *argv: str) -> dict:
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET and with a Triton cache of its own;
    return the JSON it printed last."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORA_KERNELS_FAST_LAUNCH")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        path = Path(cache) / "script.py"  # (a file: Triton reads a @jit function's source from it)
        path.write_text(script)
        proc = subprocess.run([sys.executable, str(path), *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Where a script's call plans pass a tensor's address as an int (launch.POINTER_INTS), it is tagged with the tensor.
_ADDRESSES = r"""
from lora_kernels.triton_ops import launch as _launch


class Address(int):
    tensor = None


def _tagged(t):
    a = Address(t.data_ptr())
    a.tensor = t
    return a


_launch._pointer = _tagged
"""

# The start of the scripts that compare launches: each launch as the launcher receives it, in JSON.
_LAUNCHES = (
    _ADDRESSES
    + r"""
import json
import torch
from triton.tools.tensor_descriptor import TensorDescriptor
from lora_kernels.triton_ops import launch as L
from lora_kernels.triton_ops.compile_only import record_launches


def norm(v):
    # Outputs are new tensors each call: compare what the kernel is given about them.
    if isinstance(v, Address):  # (an int to the launcher: the tensor's address, which the comparisons describe)
        assert int(v) == v.tensor.data_ptr()
        v = v.tensor
    if isinstance(v, torch.Tensor):
        return ["T", str(v.dtype), list(v.shape), list(v.stride()), v.data_ptr() % 16]
    if isinstance(v, TensorDescriptor):
        return ["D", norm(v.base), list(v.shape), list(v.strides), list(v.block_shape)]
    return repr(v)


def launches(seen):
    return [[l.name, l.hash, list(l.grid), [norm(a) for a in l.args], l.stream, repr(l.metadata)] for l in seen]
"""
)

_STEPS = r"""  # (after _LAUNCHES)
import functools, sys
import lora_kernels as lk
from lora_kernels.triton_ops import lora_linear as tri

out = {}
seen = []
with record_launches(seen.append):
    for name, case in json.loads(sys.argv[1]).items():
        torch.manual_seed(0)
        M, K, N, r, p = case["shape"]
        x = torch.randn(*case.get("lead", []), M, K, dtype=torch.bfloat16, requires_grad=True)
        # (K, N)-stored: the TMA kernels take its transpose, a view the launchers make (W_KN)
        W = torch.randn(K, N, dtype=torch.bfloat16).T if case.get("w_kn") else torch.randn(N, K, dtype=torch.bfloat16)
        A = torch.randn(r, K, requires_grad=True)
        B = torch.randn(N, r, requires_grad=True)
        dy = torch.randn(*x.shape[:-1], N, dtype=torch.bfloat16)
        tri.FWD_MODE = tri.BWD_MODE = case.get("mode", "two")
        tri.TMA_FLATTEN = case.get("flat", False)  # (its hook re-points the output descriptors at half tiles)
        tri.TMA_DESC = case.get("desc", "host")  # "device": the TMA kernels build their descriptors (global scratch)
        tuned = case.get("tuned", False)
        tri.AUTOTUNE = tuned
        if tuned:  # real Autotuners pruned to one config, nothing timed (as bench.host_overhead's tuned rows)
            def make(kernel, pick=slice(0, 1)):
                tuner = tri._make_autotuner(kernel, prune=lambda c, n, **kw: tri._prune(c, n, **kw)[pick])
                tuner._bench = lambda *args, config, **meta: [0.0, 0.0, 0.0]
                return tuner
            tri._autotuner = functools.cache(make)

        def step(fast, seed, plans=False):
            L.FAST_LAUNCH, L.PLANS = fast, plans
            seen.clear()
            x.grad = A.grad = B.grad = None
            lk.lora_linear(x, W, A, B, None, None, 2.0, p, True, seed, backend="triton").backward(dy)
            return launches(seen)

        L.clear()  # (cases may share kernels: count each case's own misses)
        # Tuned: the first step goes through Triton's Autotuner.run, later ones launch the config it chose.
        slow = step(False, 1234)
        # Per launch: its host descriptors, and the tensor maps Triton's launcher expanded them into (checked).
        maps = [[l.name, sum(type(a) is TensorDescriptor for a in l.args), len(l.tensor_maps)] for l in seen]
        before = dict(L.stats())
        first = step(True, 1234)     # the cache's misses: Triton launches and the entries are stored
        mid = dict(L.stats())
        hit = step(True, 1234)       # every launch a hit
        other_seed = step(True, 99)  # the seed is not specialised on: still hits, with its own value
        slow_other = step(False, 99)
        after = dict(L.stats())
        out[name] = dict(slow=slow, first=first, hit=hit, other_seed=other_seed, slow_other=slow_other, maps=maps,
                         misses=mid["misses"] - before["misses"], hits=after["hits"] - mid["hits"],
                         late_misses=after["misses"] - mid["misses"])
        if tuned:  # the keys whose chosen config the later steps launched
            out[name]["chosen"] = sorted(k.__name__ for k in (tri._shrink_kernel, tri._fwd_tma_kernel,
                                         tri._bwd_dx_tma_kernel) if tri._autotuner(k).lk_chosen)
        # Launch plans: the first step with them records (its launches through the cache), later ones replay.
        p0 = dict(L.stats())
        plan_first = step(True, 1234, plans=True)
        p1 = dict(L.stats())
        plan_hit = step(True, 1234, plans=True)
        plan_other = step(True, 99, plans=True)
        p2 = dict(L.stats())
        # (why a layout is not replayed whole, per call plan kept; None where it is)
        whole = sorted(str(c.why) for c in L._CALLS.values())
        # Call plans off: the launch plans alone replay every launch.
        L.CALLS = False
        calls_off = step(True, 99, plans=True)
        p2b = dict(L.stats())
        L.CALLS = True
        # Switches that change launches under the same plan key, the backward's integer arguments (its row splits)
        # and the shrink's fixed tiles: the sites that no longer match launch as without plans, and are recorded
        # again.
        tri.BWD_SPLIT_M = "2"
        shrink_cfg = tri._shrink_cfg
        tri._shrink_cfg = lambda *a: {**shrink_cfg(*a), "BLOCK_M": 64}
        split_slow = step(False, 1234)
        p3 = dict(L.stats())
        split_plan = step(True, 1234, plans=True)
        split_again = step(True, 1234, plans=True)
        p4 = dict(L.stats())
        tri.BWD_SPLIT_M, tri._shrink_cfg = "auto", shrink_cfg
        # A constexpr only (the TMA kernels' FLATTEN).
        tri.TMA_FLATTEN = not case.get("flat", False)
        other_slow = step(False, 1234)
        other_plan = step(True, 1234, plans=True)
        tri.TMA_FLATTEN = case.get("flat", False)
        out[name].update(other_slow=other_slow, other_plan=other_plan)

        # An argument of another type with an equal value (2 == 2.0 in a plan key), straight to the autograd
        # Function's forward launcher (the public call passes float(scaling)): Triton specialises an int apart.
        def fwd_only(scaling, plans):
            L.FAST_LAUNCH, L.PLANS = plans, plans
            seen.clear()
            with torch.no_grad():
                tri._fwd(x.detach().reshape(-1, K), W, None, A.detach(), B.detach(), None, scaling, p, 1234, True)
            return launches(seen)

        fwd_only(2.0, True)
        out[name].update(float_plan=fwd_only(2.0, True), int_slow=fwd_only(2, False), int_plan=fwd_only(2, True))
        if tuned:
            # Other tuners (choosing the last config rather than the first): the sites see another tuner.
            tri._autotuner = functools.cache(lambda kernel: make(kernel, slice(-1, None)))
            tuner_slow = step(False, 1234)
            tuner_plan = step(True, 1234, plans=True)
            # During a CUDA-graph capture an untuned key launches the fixed tiles: not kept in the plan, so the next
            # step outside the capture tunes (fresh tuners) and launches the config chosen, as without plans.
            tri._autotuner = functools.cache(lambda kernel: make(kernel, slice(-1, None)))
            capturing, tri._capturing = tri._capturing, lambda: True
            captured = step(True, 1234, plans=True)
            tri._capturing = capturing
            after_capture = step(True, 1234, plans=True)  # (tunes: its tuned launches are not a launch plan's)
            after_capture_again = step(True, 1234, plans=True)  # (so no call plan was kept from that call)
            out[name].update(tuner_slow=tuner_slow, tuner_plan=tuner_plan, captured=captured,
                             after_capture=after_capture, after_capture_again=after_capture_again)
        out[name].update(plan_first=plan_first, plan_hit=plan_hit, plan_other=plan_other,
                         plan_hits_recording=p1["plan_hits"] - p0["plan_hits"],
                         plan_hits=p2["plan_hits"] - p1["plan_hits"],
                         call_hits=p2["call_hits"] - p1["call_hits"],
                         call_hits_recording=p1["call_hits"] - p0["call_hits"],
                         whole=whole, calls_off=calls_off,
                         calls_off_hits=[p2b[k] - p2[k] for k in ("plan_hits", "call_hits")],
                         cache_calls_replaying=p2["hits"] + p2["misses"] - p1["hits"] - p1["misses"],
                         split_slow=split_slow, split_plan=split_plan, split_again=split_again,
                         split_plan_hits=p4["plan_hits"] - p3["plan_hits"])
print(json.dumps(out))
"""

_CASES = {
    "tma p=0": dict(shape=[64, 256, 256, 16, 0.0]),
    "tma p=0.1, 3-D x": dict(shape=[32, 256, 256, 16, 0.1], lead=[2]),
    "tma p=0.1, flattened": dict(shape=[64, 256, 256, 16, 0.1], flat=True),
    "tma p=0.1, (K, N) weight": dict(shape=[64, 256, 256, 16, 0.1], w_kn=True),
    "tma p=0.1, in-kernel descriptors": dict(shape=[64, 256, 256, 16, 0.1], desc="device"),
    "pointer K=250 p=0.1": dict(shape=[67, 250, 130, 8, 0.1]),
    "single-pass p=0.1": dict(shape=[64, 256, 256, 16, 0.1], mode="single"),
    "tuned, chosen configs, tma p=0.1": dict(shape=[64, 256, 256, 16, 0.1], tuned=True),
}


@pytest.fixture(scope="module")
def steps() -> dict:
    return _run(_LAUNCHES + _STEPS, json.dumps(_CASES))


@pytest.mark.parametrize("case", list(_CASES))
def test_cached_launches_match_tritons_own(steps, case):
    """Every launch of a forward+backward step reaches the launcher with the same compiled kernel, grid and
    parameters whether Triton binds it (cache off) or the cache does; a new seed (an unspecialised
    argument) hits and passes its own value; the second step misses nothing."""
    got = steps[case]
    assert got["slow"], "no launch recorded"
    assert got["first"] == got["slow"] and got["hit"] == got["slow"], case
    assert got["other_seed"] == got["slow_other"] and got["other_seed"] != got["slow"], case
    assert got["misses"] == len(got["slow"]) and got["late_misses"] == 0, got
    assert got["hits"] == 2 * len(got["slow"]), got
    if "tuned" in case:
        assert got["chosen"] == ["_bwd_dx_tma_kernel", "_fwd_tma_kernel", "_shrink_kernel"], got["chosen"]


@pytest.mark.parametrize("case", list(_CASES))
def test_launch_plans_replay_tritons_launches(steps, case):
    """With launch plans (``launch.planned``) the first step records and later steps replay each launch the
    Triton launchers make through ``_launch``: the same compiled kernels, grids and parameters as Triton's own
    launches, a new seed passed through, no call to the launch cache while replaying. A switch that changes a
    launch's integer arguments under the same plan key (``LORA_KERNELS_BWD_SPLIT_M``), other fixed tiles for
    the shrink, a constexpr (``LORA_KERNELS_TMA_FLATTEN``), an int scaling where a float was recorded, other
    autotuners: each is seen by the site check, and those launches go through the launcher as without plans
    (the others still replay). The fixed tiles an untuned key falls back to during a CUDA-graph capture are not
    kept: the next step outside the capture launches the config the autotuner then chooses."""
    got = steps[case]
    n = len(got["slow"])
    assert got["plan_first"] == got["slow"] and got["plan_hit"] == got["slow"], case
    assert got["plan_other"] == got["slow_other"], case
    assert got["plan_hits_recording"] == 0, got
    assert got["plan_hits"] == 2 * n and got["cache_calls_replaying"] == 0, got
    # Call plans: the two-launch paths replay each forward and backward whole (the single-pass kernels take barrier
    # words the launchers keep, so their calls replay launch by launch); with call plans off the launch plans replay
    # the same launches.
    if case.startswith("single-pass"):
        assert got["call_hits"] == 0 and all("SYNC" in why for why in got["whole"]), got["whole"]
    else:
        assert got["call_hits"] == 4 and got["whole"] == ["None", "None"], (got["call_hits"], got["whole"])
    assert got["call_hits_recording"] == 0, got
    assert got["calls_off"] == got["slow_other"] and got["calls_off_hits"] == [n, 0], got["calls_off_hits"]
    assert got["split_slow"] != got["slow"], "the switch changed nothing: it tests nothing"
    if not case.startswith(("pointer", "single-pass")):  # (FLATTEN is the two-launch TMA kernels')
        assert got["other_slow"] != got["slow"], "the switch changed nothing: it tests nothing"
    assert got["other_plan"] == got["other_slow"], case
    if not case.startswith("single-pass"):
        assert got["int_slow"] != got["float_plan"], "the int scaling changed nothing: it tests nothing"
    assert got["int_plan"] == got["int_slow"], case
    if "tuned" in case:
        assert got["tuner_slow"] != got["slow"], "the other tuners chose the same configs: it tests nothing"
        assert got["tuner_plan"] == got["tuner_slow"], case
        assert got["captured"] != got["tuner_slow"], "the capture took the chosen configs: it tests nothing"
        assert got["after_capture"] == got["tuner_slow"], case
        assert got["after_capture_again"] == got["tuner_slow"], case
    assert got["split_plan"] == got["split_slow"] and got["split_again"] == got["split_slow"], case
    # The forward GEMM replays (single-pass: the forward); the backward's launches were recorded again.
    assert 0 < got["split_plan_hits"] < 2 * n, (case, got)


def test_recorded_launches_expand_descriptors_as_tritons_launcher(steps):
    """``record_launches`` runs Triton's own host-descriptor expansion (its launcher's, before the C launcher)
    on every launch, with the driver's tensor-map encoder replaced by a check of its documented requirements
    (``compile_only.encode_tiled``): every TMA launch of every case (the single-pass kernels' included) came
    through it, one checked tensor map per descriptor."""
    tma = 0
    for case, got in steps.items():
        for name, descs, maps in got["maps"]:
            assert maps == descs, (case, name, descs, maps)
            tma += descs > 0
            if "in-kernel" in case:  # (LORA_KERNELS_TMA_DESC=device: the kernels take plain tensors)
                assert descs == 0, (case, name)
    assert tma >= 10, "the TMA launches were not reached: nothing was checked"


def test_cached_launches_cover_each_kernel_of_the_step(steps):
    """The cases reach every kernel of the two-launch TMA and pointer paths and the single-pass kernels."""
    names = {launch[0] for case in steps.values() for launch in case["slow"]}
    assert {"_shrink_kernel", "_fwd_tma_kernel", "_fwd_kernel", "_bwd_dy_kernel", "_bwd_dx_kernel",
            "_bwd_dx_tma_kernel", "_fwd_single_pass_kernel", "_bwd_single_pass_kernel"} <= names, names  # fmt: skip


_KEYS = r"""
import itertools, json
import torch
from triton.backends.compiler import BaseBackend
from triton.tools.tensor_descriptor import TensorDescriptor
from lora_kernels.triton_ops import launch as L

spec = L.native_specialize_impl
base = torch.empty(4096, dtype=torch.bfloat16)
values = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**63 - 16, 2**63,
          0.0, 1.0, 2.5, True, False, None]
values += [base[i:] for i in range(16)] + [base.float()[i:] for i in range(4)]
values += [base.to(torch.uint8)[i:] for i in range(16)]
values += [TensorDescriptor.from_tensor(base[i:i + 64 * 48].view(48, 64), [b, 64]) for i in (0, 8) for b in (16, 32)]
values += [TensorDescriptor.from_tensor(base[:64 * 40].view(40, 64), [16, 64])]


class Param:
    def __init__(self, constexpr, const, dns, dnsa):
        self.is_constexpr, self.is_const = constexpr, const
        self.do_not_specialize, self.do_not_specialize_on_alignment = dns, dnsa


class Kernel:
    pass


def flat(key):
    for part in key:
        if isinstance(part, tuple):
            yield from flat(part)
        else:
            yield part


conflicts, checked = [], 0
for const, dns, dnsa in itertools.product((False, True), repeat=3):
    k = Kernel()
    k.params = [Param(False, const, dns, dnsa)]
    seen = {}
    for v in values:
        if v is None:
            continue
        key = L._specs(BaseBackend, k, (v,))
        truth = spec(BaseBackend, v, const, not dns, not dnsa)
        try:
            hash(key)
        except TypeError:
            conflicts.append(["unhashable", repr(key)])
            continue
        if isinstance(v, torch.Tensor) and any(part is v for part in flat(key)):
            conflicts.append(["tensor kept in the key", repr(key)])
        checked += 1
        if seen.setdefault(key, truth) != truth:
            conflicts.append([repr(key), repr(truth), repr(seen[key])])
print(json.dumps(dict(conflicts=conflicts, checked=checked)))
"""


def test_keys_determine_tritons_specialization():
    """The cache's key of an argument is at least as fine as Triton's own specialization of it (equal keys,
    equal specializations), for integers across the 1 / 16 / int32 / int64 boundaries, floats, bools,
    tensors at every 2-byte offset, descriptors, with every combination of a parameter's flags; and no
    tensor is kept in a key (the cache would hold it alive). Run by both CI stacks (Triton 3.6 and 3.8)."""
    got = _run(_KEYS)
    assert got["checked"] > 300 and got["conflicts"] == [], got


_SWITCHES = r"""
import json
import torch
import lora_kernels as lk
from lora_kernels.triton_ops import launch as L
from lora_kernels.triton_ops.compile_only import record_launches

import triton
import triton.language as tl


@triton.jit
def _flag_kernel(X, FLAG: tl.constexpr):
    tl.store(X + tl.arange(0, 64), tl.full((64,), FLAG, tl.float32))


@triton.jit(do_not_specialize=["seed_lo"])
def _seeded(X, seed_lo):
    tl.store(X + tl.arange(0, 64), tl.full((64,), seed_lo, tl.float32))


seen = []
res = {}
with record_launches(seen.append):
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    W, A, B = torch.randn(256, 256, dtype=torch.bfloat16), torch.randn(16, 256), torch.randn(256, 16)
    lk.lora_linear(x, W, A, B, backend="triton")
    res["after_first"] = L.stats()
    L._CACHE_MAX = 1  # full: each store starts the cache over
    seen.clear()
    lk.lora_linear(x, W[:128], A, B[:128], backend="triton")  # another N
    res["bounded"] = dict(L.stats(), launches=len(seen))
    L.FAST_LAUNCH = False
    before = L.stats()
    lk.lora_linear(x, W, A, B, backend="triton")
    res["off"] = [before, L.stats()]
    # Keyword constexprs: the cache returns the compiled kernel Triton's own launch returns for each value
    # (a kernel outside lora_kernels, launched through the cache directly).
    L._CACHE_MAX = 4096
    L.clear()
    t = torch.empty(64)
    flags = (True, 1, 2.0, False, 0, True, 1, 2.0, False, 0)
    slow = [L.launch(_flag_kernel, (1,), (t,), {"FLAG": flag}) for flag in flags[:5]]
    L.FAST_LAUNCH = True
    fast = [L.launch(_flag_kernel, (1,), (t,), {"FLAG": flag}) for flag in flags]
    res["flags"] = dict(L.stats(), same=[f is slow[i % 5] for i, f in enumerate(fast)])
    # A plan's varying argument (a seed half) replays only while it keeps the int32 type it was recorded with.
    plan = []
    compiled = L.launch(_seeded, (1,), (t, 5), {})
    L.record([plan, 0, None], _seeded, None, {}, {}, (t, 5), compiled, (1,), {})
    res["varying"] = [L.replay([plan, 0, None], _seeded, None, {}, {}, (t, v)) for v in (7, -2**31, 2**31, 2**40)]
    # A knob JITFunction.run folds into the options, changed between launches: a miss, Triton's debug kernel.
    from triton import knobs
    L.clear()
    plain = L.launch(_flag_kernel, (1,), (t,), {"FLAG": True})
    with knobs.runtime.scope():
        knobs.runtime.debug = True
        dbg = [L.launch(_flag_kernel, (1,), (t,), {"FLAG": True}) for _ in range(2)]
    again = L.launch(_flag_kernel, (1,), (t,), {"FLAG": True})
    res["debug"] = dict(L.stats(), differ=dbg[0] is not plain, debug=bool(dbg[0].metadata.debug),
                        same=dbg[1] is dbg[0], back=again is plain)
    # A stage-inspection hook adds its pipeline's hash to Triton's key on every launch: nothing cached or planned.
    calls = []

    def hook(*a):
        calls.append(len(a))
        return None if a else ("", "lk-test-pipeline")

    before = L.stats()
    with knobs.runtime.scope():
        knobs.runtime.add_stages_inspection_hook = hook
        hooked = [L.launch(_flag_kernel, (1,), (t,), {"FLAG": True}) for _ in range(2)]
        no_plan = L.plan_key("tag", (t,), 0) is None
    import inspect
    from triton.runtime.jit import JITFunction

    res["hook"] = dict(before=before, after=L.stats(), differ=hooked[0] is not plain, keyed=calls.count(0),
                       no_plan=no_plan, run_keys=("add_stages_inspection_hook" in inspect.getsource(JITFunction.run)))
res["cleared_on_exit"] = L.stats()["entries"]
print(json.dumps(res))
"""


def test_cache_is_bounded_switchable_and_cleared():
    """At its bound the cache starts over and launches still happen; LORA_KERNELS_FAST_LAUNCH's switch
    sends every launch through Triton; for constexprs passed by keyword (True, 1, 2.0, False, 0) it returns
    the compiled kernel Triton's own launch returns; leaving ``record_launches`` empties it (its entries
    point at stand-in launchers). A launch plan's site replays a seed half only while it is an int32, the type
    its kernel was compiled for."""
    got = _run(_SWITCHES)
    assert got["after_first"]["misses"] == 2 and got["after_first"]["entries"] == 2, got
    bounded = got["bounded"]  # (the forward GEMM's N changed; the shrink kernel's key has no N)
    assert bounded["launches"] == 2 and bounded["misses"] == 3 and bounded["entries"] == 1, got
    assert got["off"][0] == got["off"][1], got  # no hit, no miss: the cache was not consulted
    assert got["flags"]["same"] == [True] * 10 and got["flags"]["hits"] >= 5, got["flags"]
    assert got["cleared_on_exit"] == 0, got
    assert got["varying"] == [True, True, False, False], got["varying"]
    # A knob changed between launches (Triton's debug) misses and launches Triton's debug kernel, then hits it.
    debug = got["debug"]
    assert debug["differ"] and debug["debug"] and debug["same"] and debug["back"], debug
    assert debug["misses"] == 2 and debug["hits"] == 2, debug
    # Under a stage-inspection hook every launch is Triton's own, and no plan; from Triton 3.8 its run puts the hook's
    # pipeline in its key, asking the hook on every launch (3.6 calls it only in the compile).
    hook = got["hook"]
    assert hook["before"] == hook["after"] and hook["no_plan"], hook
    if hook["run_keys"]:
        assert hook["differ"] and hook["keyed"] >= 2, hook


def test_keys_hold_every_knob_tritons_run_folds_into_the_options():
    """Every ``kwargs[...] = ...knobs.<group>.<name>`` in the installed Triton's ``JITFunction.run`` is in the launch
    cache's and plans' key (``launch._run_knobs``): each changed alone changes the key. A knob a newer Triton adds
    (3.9 added fpsan's) fails here rather than as a cached kernel compiled without it."""
    import inspect
    import re

    from triton import knobs
    from triton.runtime.jit import JITFunction

    from lora_kernels.triton_ops import launch as L

    folded = re.findall(r'kwargs\["(\w+)"\]\s*=[^\n]*?knobs\.(\w+)\.(\w+)', inspect.getsource(JITFunction.run))
    assert {name for name, _, _ in folded} >= {"debug", "instrumentation_mode"}, folded
    base = L._run_knobs()
    for name, group, attr in folded:
        knob_group = getattr(knobs, group)
        value = getattr(knob_group, attr)
        with knob_group.scope():
            setattr(knob_group, attr, (not value) if isinstance(value, bool) else f"{value}-changed")
            assert L._run_knobs() != base, (name, group, attr)
        assert L._run_knobs() == base, (name, group, attr)


_CALLS_SCRIPT = (
    _ADDRESSES
    + r"""
import json
import sys
import torch
from lora_kernels.triton_ops import launch as L
from lora_kernels.triton_ops.compile_only import record_launches

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed_lo"])
def _seeded(X, Y, seed_lo, n):
    tl.store(X + tl.arange(0, 64), tl.full((64,), seed_lo, tl.float32))


SHIFT = 0  # a module switch the launcher reads: rebinding it makes the recipes of this module stale


def arg(v):
    return v.tensor if isinstance(v, Address) else v


def empty(n):
    t = torch.empty(n)
    if L.RECORDING:
        L.note_empty(t)
    return t


def launcher(x, y, seed, how):
    out = empty(64)
    other = y
    if how == "zeroed":
        out.zero_()  # a torch op writing the call's tensor: not in a recipe
    elif how == "zeros":
        other = torch.zeros(64)  # a tensor of another origin
    elif how == "view":
        other = y[:32]
    elif how == "noted view":
        other = y[:32]
        if L.RECORDING:
            L.note_view(other, y, lambda t: t[:32])
    if how == "nested":  # a planned call inside this one
        call(x, seed, "plain", y)
    lo = seed + 1 if how == "underived" else seed + SHIFT
    L.planned_launch(_seeded, (1,), (out, other, lo, 64 + SHIFT), {})
    if how == "sum":
        return (out, out.sum())
    return (out,)


def derive(seed):
    return {"seed_lo": seed + SHIFT}


def call(x, seed, how, y=None):
    y = torch.randn(64) if y is None else y
    key = L.plan_key(("t", how), (x, y, seed), 2)
    return L.planned(key, launcher, x, y, seed, how, varying=2, derive=derive)


def main():  # (in a function: the loop's variables are not globals of the launcher's module, which recipes watch)
    res = {}
    seen = []
    with record_launches(seen.append):
        x = torch.randn(64)
        for how in ("plain", "zeroed", "zeros", "view", "noted view", "underived", "sum", "aliased"):
            L.clear()
            runs = []
            for seed in (5, 6, 7):
                seen.clear()
                y = x if how == "aliased" and seed == 5 else torch.randn(64)
                outs = call(x, seed, how, y)
                (l,) = seen
                runs.append(dict(seed=l.args[2], n=l.args[3], fresh=arg(l.args[0]) is outs[0], y=arg(l.args[1]) is y,
                                 shape=list(arg(l.args[1]).shape), stats=L.stats(),
                                 ints=[type(a) is Address for a in l.args[:2]]))
            res[how] = dict(runs=runs, why=[str(c.why) for c in L._CALLS.values()])
        L.clear()
        for seed in (5, 6, 7):
            seen.clear()
            call(x, seed, "nested")
            res.setdefault("nested", []).append([len(seen), L.stats()["call_hits"]])
        res["nested_why"] = sorted(str(c.why) for c in L._CALLS.values())
        # A module switch rebound: the recipe is stale, the launcher runs (and records again) with the new value.
        L.clear()
        for shift in (0, 0, 3, 3):
            globals()["SHIFT"] = shift
            seen.clear()
            call(x, 5, "plain")
            res.setdefault("switch", []).append([seen[0].args[2], seen[0].args[3], L.stats()["call_hits"]])
        # The module watched, as the launchers' modules are: once a recipe found its globals the same, it compares the
        # module's generation; an attribute set (even to the same object) or deleted moves it on, and the globals are
        # compared again. A write into the module's __dict__ is not seen then (the launchers' modules make none).
        mod = sys.modules[__name__]
        L.watch(__name__)
        L.clear()
        mod.EXTRA = 1
        steps = [("set", 0), ("set", 0), ("none", 0), ("set", 3), ("none", 3), ("dict", 5), ("set", 3), ("del", 3)]
        for how, shift in steps:
            if how == "set":
                mod.SHIFT = shift
            elif how == "dict":
                globals()["SHIFT"] = shift
            elif how == "del":
                del mod.EXTRA
            seen.clear()
            call(x, 5, "plain")
            res.setdefault("watched", []).append([seen[0].args[2], seen[0].args[3], L.stats()["call_hits"]])
        res["watched_type"] = type(mod).__name__
    print(json.dumps(res))


main()
"""
)


def test_call_plans_replay_whole_calls_and_refuse_what_they_cannot_see():
    """A call plan (``launch.planned`` with ``derive``) replays a whole call from the second on: a fresh allocation
    per call, the varying value derived from the call's own seed, the inputs and a noted view passed through. A
    call that writes one of its tensors by a torch op in place, passes a tensor the recorder did not see made
    (``torch.zeros``, an unnoted view), passes a seed value ``derive`` does not give, returns a tensor made by
    torch, or was given one tensor at two positions (later calls may give two), is marked as not replayable whole:
    its launches replay from the launch plan, and with the values each call gives. Rebinding a global of the
    launcher's module makes its recipe stale: the next call runs the launcher (the new value reaches the launch)
    and records again. A call with a planned call inside is not replayed whole."""
    got = _run(_CALLS_SCRIPT)
    for how in ("plain", "noted view"):
        runs = got[how]["runs"]
        assert [r["seed"] for r in runs] == [5, 6, 7] and all(r["fresh"] for r in runs), (how, runs)
        assert [r["stats"]["call_hits"] for r in runs] == [0, 1, 2], (how, runs)
        assert [r["ints"] for r in runs] == [[False, False], [True, True], [True, True]], (how, runs)
        assert got[how]["why"] == ["None"], got[how]
    assert got["plain"]["runs"][2]["y"] and got["noted view"]["runs"][2]["shape"] == [32]
    reasons = {"zeroed": "in place", "zeros": "not allocated", "view": "not allocated", "underived": "not derived",
               "sum": "returns", "aliased": "two positions"}  # fmt: skip
    for how, why in reasons.items():
        runs = got[how]["runs"]
        assert [r["stats"]["call_hits"] for r in runs] == [0, 0, 0], (how, runs)
        assert len(got[how]["why"]) == 1 and why in got[how]["why"][0], (how, got[how]["why"])
        expect = [s + 1 for s in (5, 6, 7)] if how == "underived" else [5, 6, 7]
        assert [r["seed"] for r in runs] == expect, (how, runs)  # each call's own value: launch plans
        assert [r["stats"]["plan_hits"] for r in runs] == [0, 1, 2], (how, runs)
        assert how in ("view", "zeros") or all(r["y"] for r in runs), (how, runs)  # each call's own tensor
        assert not any(any(r["ints"]) for r in runs), (how, runs)  # (launch plans pass the tensors)
    assert got["switch"] == [[5, 64, 0], [5, 64, 1], [8, 67, 1], [8, 67, 2]], got["switch"]
    # Watched (launch.WatchedModule): record; same globals after a set (replay); the generation alone (replay); a new
    # value (record); replay; a __dict__ write unseen (replay: the recipe's n = 67, not 69; ``derive`` reads SHIFT
    # itself); set back to the recipe's value (replay); an attribute deleted (record).
    assert got["watched_type"] == "WatchedModule", got
    expect = [[5, 64, 0], [5, 64, 1], [5, 64, 2], [8, 67, 2], [8, 67, 3], [10, 67, 4], [8, 67, 5], [8, 67, 5]]
    assert got["watched"] == expect, got["watched"]
    # A call with a planned call inside: the outer one is not replayed whole (its recorder would not see the inner
    # launches); the inner one is, once the outer no longer records.
    assert got["nested"] == [[2, 0], [2, 0], [2, 1]], got["nested"]
    assert got["nested_why"] == ["None", "a planned call inside it"], got["nested_why"]


_MODEL = r"""  # (after _LAUNCHES)
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from lora_kernels.integrations import patch


def main():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules=targets))  # fmt: skip
    report = patch(model, backend="triton", log=False)
    model.train()
    ids = torch.randint(0, 512, (2, 32))
    seen, res = [], {"fused": len(report.accelerated)}

    def step(calls, seed):
        L.CALLS = calls
        seen.clear()
        torch.manual_seed(seed)
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return launches(seen)

    with record_launches(seen.append):
        for phase in ("plain", "checkpointed"):
            if phase == "checkpointed":  # (the forward runs again inside the backward)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            step(False, 1)
            off = step(False, 2)
            before = L.stats()["call_hits"]
            on = [step(True, 2), step(True, 2)]
            res[phase] = dict(launches=len(off), same=[o == off for o in on], hits=L.stats()["call_hits"] - before,
                              other_seed=step(True, 3) != off)  # fmt: skip
    print(json.dumps(res))


main()
"""


def test_call_plans_over_a_patched_peft_model():
    """A two-layer Llama with PEFT LoRA on every projection, patched onto the Triton backend: two training steps
    with call plans reach the launcher with exactly the launches of a step without them (kernels, grids, every
    parameter), with and without activation checkpointing (which runs each forward again inside the backward);
    most calls are replayed whole (the first call of each layout records), and another seed changes the launches."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    got = _run(_LAUNCHES + _MODEL)
    assert got["fused"] == 14, got
    for phase, launches in (("plain", 56), ("checkpointed", 84)):  # 4 launches per fused layer, forwards again
        r = got[phase]
        assert r["launches"] == launches and r["same"] == [True, True] and r["other_seed"], (phase, r)
        calls = launches  # two steps of launches / 2 calls each (a forward or backward: two launches)
        assert calls - 10 <= r["hits"] <= calls, (phase, r)  # (at most 10 layouts recorded: 5 shapes, fwd and bwd)


def test_the_interpreter_and_wrapped_kernels_bypass_the_cache():
    """Under TRITON_INTERPRET the kernels are not JITFunctions: ``launch`` hands them to ``kernel[grid]``
    unchanged (this process runs the interpreter when CI's suite does)."""
    import torch

    from lora_kernels.triton_ops import launch as L

    calls = []

    class Stand:
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((grid, a, k)) or "launched"

    before = L.stats()
    assert L.launch(Stand(), (3,), (torch.empty(1), 7), {"BLOCK": 32}) == "launched"
    assert calls == [((3,), calls[0][1], {"BLOCK": 32})] and L.stats() == before


def test_a_call_without_launches_replays_in_the_interpreter():
    """A backward that launches no kernel (only the frozen weight's gradient asked for: torch computes it) is kept as
    a call plan with no launches, on any machine. Replayed, it asks for no stream: under TRITON_INTERPRET on a CPU
    the second such call raised "0 active drivers" (found by a random fuzz campaign, session 53)."""
    import torch

    import lora_kernels as lk
    from lora_kernels.triton_ops import launch as L
    from tests._utils import INTERPRET

    if not INTERPRET:
        pytest.skip("the interpreter's case (on a GPU a stream is there to ask for)")
    g = torch.Generator().manual_seed(0)
    x, A, B, dy = (torch.randn(*s, generator=g) for s in ((3, 32), (4, 32), (40, 4), (3, 40)))
    hits = L.stats()["call_hits"]
    for _ in range(3):
        W = torch.randn(40, 32, generator=g, requires_grad=True)
        lk.lora_linear(x, W, A, B, scaling=2.0, backend="triton").backward(dy)
        torch.testing.assert_close(W.grad, dy.t() @ x)
    assert L.stats()["call_hits"] - hits >= 2 or not (L.PLANS and L.CALLS and L.FAST_LAUNCH), L.stats()


_OLDER_TRITON = r"""
import json, sys, types
import triton

layout = sys.argv[1]
# launch.py as it imports under that layout; Triton's own modules (some import later) keep the real knobs.
real = sys.modules["triton.knobs"]
if layout == "3.2":  # no triton.knobs at all (Triton 3.2 and 3.3: torch 2.6 and 2.7)
    del triton.knobs

    class _NoKnobs:
        def find_spec(self, name, path=None, target=None):
            if name == "triton.knobs":
                raise ImportError("no triton.knobs before Triton 3.4")

    sys.meta_path.insert(0, _NoKnobs())
    del sys.modules["triton.knobs"]
else:  # 3.4 and 3.5 (torch 2.8 and 2.9): knobs, but run folds only debug in, and no inspection hook
    rt = types.SimpleNamespace(debug=False, launch_enter_hook=None, launch_exit_hook=None)
    triton.knobs = types.SimpleNamespace(runtime=rt, compilation=types.SimpleNamespace())
from lora_kernels.triton_ops import launch as L

if layout == "3.2":
    sys.meta_path.pop(0)
sys.modules["triton.knobs"] = triton.knobs = real

import torch
import lora_kernels as lk

torch.manual_seed(0)
x = torch.randn(67, 72, requires_grad=True)
W, A, B = torch.randn(40, 72), torch.randn(8, 72, requires_grad=True), torch.randn(40, 8, requires_grad=True)
dy = torch.randn(67, 40)
got = []
for backend in ("triton", "torch"):
    y = lk.lora_linear(x, W, A, B, scaling=2.0, dropout_p=0.1, seed=3, backend=backend)
    y.backward(dy)
    got.append([y.detach(), x.grad, A.grad, B.grad])
    x.grad = A.grad = B.grad = None
err = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(*got)]
print(json.dumps(dict(fast=L.FAST_LAUNCH, names=list(L._KNOB_NAMES), knobs=list(L._run_knobs()),
                      key=L.plan_key("tag", (x, 1), 1) is not None, err=err)))
"""


@pytest.mark.parametrize("layout", ["3.2", "3.4"])
def test_older_tritons_knobs_leave_the_backend_working(layout):
    """The README's torch 2.6–2.9 take Triton 3.2–3.5: 3.2 and 3.3 have no ``triton.knobs`` (importing it stopped the
    whole Triton backend), 3.4 and 3.5 fold only ``debug`` into a launch's options and have no instrumentation mode
    (reading it raised in every call). Here, in the interpreter, with the installed Triton's knobs taken away or cut
    to 3.4's: the Triton backend runs forward and backward against the reference, no launch cache where there are no
    knobs. (Checked by hand under the real Triton 3.2.0, 3.3.1, 3.4.0 and 3.5.1 too: bench/NOTES.md, session 46.)"""
    import json

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _OLDER_TRITON, layout], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(got["err"]) < 1e-5 and got["key"], got
    if layout == "3.2":
        assert got["fast"] is False and got["names"] == [] and got["knobs"] == [], got
    else:
        assert got["names"] == ["runtime.debug"] and got["knobs"] == [False], got


def test_descriptors_without_checks_equal_tritons():
    """``launch.descriptor`` builds what ``TensorDescriptor.from_tensor`` builds, field for field, on this Triton's
    layout of the class (CI runs Triton 3.8's and 3.6's); an empty dimension, or the launch cache switched off,
    goes through ``from_tensor`` (its assertion)."""
    import dataclasses
    from unittest import mock

    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    from lora_kernels.triton_ops import launch as L

    assert L._DESC_REST is not None, "this Triton's TensorDescriptor layout is not the known one: no fast path"
    base = torch.randn(4096, dtype=torch.bfloat16)
    cases = [
        (torch.randn(64, 256, dtype=torch.bfloat16), [64, 64]),
        (base[8 : 8 + 48 * 64].view(48, 64), [16, 64]),  # a 16-byte aligned view
        (torch.randn(300, 40, dtype=torch.float16)[:, :32], [128, 32]),  # rows longer than the tile's columns
        (torch.randn(8, 16, dtype=torch.float32), [8, 16]),
    ]
    for t, block in cases:
        fast, ref = L.descriptor(t, block), TensorDescriptor.from_tensor(t, block)
        assert type(fast) is TensorDescriptor
        for f in dataclasses.fields(TensorDescriptor):
            a, b = getattr(fast, f.name), getattr(ref, f.name)
            assert a is b if f.name == "base" else a == b, (f.name, a, b)
        fast.block_shape = [block[0], block[1] // 2]  # (the launchers' hooks re-point tiles: a plain attribute)
        assert fast.block_shape == [block[0], block[1] // 2]
    with pytest.raises(AssertionError, match="shape must be positive"):
        L.descriptor(torch.empty(0, 64, dtype=torch.bfloat16), [16, 64])
    with mock.patch.object(L, "FAST_LAUNCH", False), mock.patch.object(TensorDescriptor, "__post_init__") as checks:
        L.descriptor(cases[0][0], [64, 64])
    assert checks.call_count == 1  # Triton's constructor, checks included
    with mock.patch.object(TensorDescriptor, "__post_init__") as checks:
        L.descriptor(cases[0][0], [64, 64])
    assert checks.call_count == 0


def test_stand_ins_are_kept_for_eager_calls_only():
    """The backward's zero-element stand-ins: one tensor per (device, dtype) in eager calls; traced calls (a wrap
    other than the identity: the registered ops) allocate theirs through ``_empty``, as every kernel output."""
    from unittest import mock

    import torch

    from lora_kernels.triton_ops import lora_linear as tri

    dev = torch.device("cpu")
    a = tri._stand_in(dev, torch.int32, tri._identity)
    assert a.numel() == 0 and a.dtype == torch.int32 and a.device == dev
    assert tri._stand_in(dev, torch.int32, tri._identity) is a
    assert tri._stand_in(dev, torch.float32, tri._identity) is not a
    with mock.patch.object(tri, "_empty", wraps=tri._empty) as alloc:
        b = tri._stand_in(dev, torch.int32, lambda k: k)
    assert b is not a and b.numel() == 0 and alloc.call_count == 1


def test_tensor_map_check_refuses_what_the_driver_refuses():
    """``encode_tiled`` (what ``record_launches`` and ``compile_only`` put behind Triton's tensor-map encoder)
    accepts what cuTensorMapEncodeTiled accepts and refuses, naming the rule, what its documentation (cuda.h)
    says the driver refuses: the first GPU launch of a bad descriptor would fail there instead."""
    from lora_kernels.triton_ops.compile_only import TensorMap, encode_tiled

    ok = dict(address=0x7F0000001000, swizzle=3, elem_size=2, elem_type=10, block=[128, 64], shape=[300, 4096],
              strides=[4096, 1], padding=0)  # fmt: skip
    assert encode_tiled(**ok) == TensorMap(**{**ok, "block": (128, 64), "shape": (300, 4096), "strides": (4096, 1)})
    assert encode_tiled(**{**ok, "block": [256, 32], "swizzle": 2}).block == (256, 32)  # 64 bytes in a 64-byte span
    assert encode_tiled(**{**ok, "block": [8], "shape": [40], "strides": [1], "swizzle": 0}).shape == (40,)
    bad = {
        "not 16-byte aligned": dict(address=0x7F0000001008),
        "stride 0 is 8200 bytes": dict(strides=[4100, 1]),
        "dimension 0 is 0": dict(shape=[0, 4096]),
        "box dimension 0 is 512": dict(block=[512, 64]),
        "inner dimension is 24 bytes (a multiple of 16)": dict(block=[128, 12], swizzle=0),
        "over the swizzle's 128": dict(block=[128, 128]),
        "over the swizzle's 32": dict(block=[128, 32], swizzle=1),
        "swizzle mode 9": dict(swizzle=9),
        "rank 6": dict(block=[1] * 6, shape=[2] * 6, strides=[8] * 5 + [1]),
    }
    for why, change in bad.items():
        with pytest.raises(RuntimeError, match="Failed to create tensor map descriptor") as err:
            encode_tiled(**{**ok, **change})
        assert why in str(err.value), (why, str(err.value))


_REFUSED = r"""  # (after _LAUNCHES)
import lora_kernels as lk
import triton
import triton.language as tl
from lora_kernels.triton_ops import lora_linear as tri

out = {}
with record_launches(lambda l: None):
    # Rows of 250 bf16 (500 bytes): no TMA descriptor may span them (the launchers take the pointer path). With the
    # launchers' check patched to accept them, the launch stops at the tensor-map check, as the driver would.
    x, W = torch.randn(64, 250, dtype=torch.bfloat16), torch.randn(256, 250, dtype=torch.bfloat16)
    A, B = torch.randn(16, 250), torch.randn(256, 16)
    tri._tma_ok = lambda *tensors, traced=False: True
    try:
        lk.lora_linear(x, W, A, B, None, None, 2.0, 0.0, True, 1, backend="triton")
        out["tma"] = "launched"
    except RuntimeError as e:
        out["tma"] = str(e)


@triton.jit
def _device_desc(X, n):  # an in-kernel descriptor: Triton's launch needs a global scratch allocation
    d = tl.make_tensor_descriptor(X, shape=[n, 64], strides=[64, 1], block_shape=[16, 64])
    d.store([0, 0], d.load([0, 0]) + 1)


seen = []
with record_launches(seen.append):
    x = torch.zeros(16, 64)
    try:
        _device_desc[(1,)](x, 16)
        out["scratch"] = "launched"
    except RuntimeError as e:
        out["scratch"] = str(e)
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    _device_desc[(1,)](x, 16)
    out["with_allocator"] = [l.name for l in seen]
print(json.dumps(out))
"""


def test_recorded_launches_fail_where_the_gpu_launch_would():
    """Two launches that a GPU refuses and the CPU's recorder used to take: a host descriptor over rows that are
    not 16-byte multiples (the launchers never build one, ``_tma_ok``; with that check patched away the launch
    stops at the tensor-map check), and a kernel that needs a global scratch allocation (in-kernel descriptors)
    while no allocator is set (Triton's launcher raises; with one set, it launches)."""
    got = _run(_LAUNCHES + _REFUSED)
    assert "Failed to create tensor map descriptor" in got["tma"] and "stride 0 is 500 bytes" in got["tma"], got
    assert "requires a runtime memory allocation, but no allocator was set" in got["scratch"], got
    assert got["with_allocator"] == ["_device_desc"], got


_SCRATCH = r"""  # (after _LAUNCHES)
import functools, sys, threading
import lora_kernels as lk
from triton.runtime import _allocation
from lora_kernels.triton_ops import lora_linear as tri

out = {}
seen = []
tri.TMA_DESC = "device"
x = torch.randn(64, 256, dtype=torch.bfloat16)
W, A, B = torch.randn(256, 256, dtype=torch.bfloat16), torch.randn(16, 256), torch.randn(256, 16)
with record_launches(seen.append):
    # A tuned launch straight to the launcher (as verify's mask probe calls it), in a fresh process: no allocator set.
    tri.AUTOTUNE = True
    def make(kernel):
        tuner = tri._make_autotuner(kernel, prune=lambda c, n, **kw: tri._prune(c, n, **kw)[:1])
        tuner._bench = lambda *args, config, **meta: [0.0, 0.0, 0.0]
        return tuner
    tri._autotuner = functools.cache(make)
    out["none_before"] = tri._no_allocator_set(_allocation)
    tri.lora_fwd(x, W, None, A, B, None, 2.0, 0.1, 5, True)
    out["tuned"] = [l.name for l in seen]
    tri.AUTOTUNE = False
    # A call plan recorded on this thread, replayed whole on another (Triton's allocator is per thread).
    def call():
        with torch.no_grad():
            lk.lora_linear(x, W, A, B, None, None, 2.0, 0.1, True, 7, backend="triton")
    for _ in range(3):
        call()
    seen.clear()
    hits = L.stats()["call_hits"]
    errors = []
    def other():
        try:
            out["thread_none_before"] = tri._no_allocator_set(_allocation)
            call()
        except Exception as e:
            errors.append(repr(e))
    t = threading.Thread(target=other)
    t.start()
    t.join()
    out["thread"] = [l.name for l in seen]
    out["thread_errors"] = errors
    out["thread_call_hits"] = L.stats()["call_hits"] - hits
print(json.dumps(out))
"""


def test_in_kernel_descriptors_set_the_allocator_on_every_path():
    """``LORA_KERNELS_TMA_DESC=device``: the in-kernel descriptors need Triton's scratch allocator, which Triton keeps
    per thread. It is set for a tuned launch made straight to the launcher (no public call before it), and for a call
    replayed whole from its call plan on a thread that never launched (the recipe skips the launchers)."""
    got = _run(_LAUNCHES + _SCRATCH)
    assert got["none_before"] and got["thread_none_before"], got
    assert got["tuned"] == ["_shrink_kernel", "_fwd_tma_kernel"], got
    assert got["thread_errors"] == [] and got["thread"] == ["_shrink_kernel", "_fwd_tma_kernel"], got
    assert got["thread_call_hits"] == 1, got


_HOOKS = r"""  # (after _LAUNCHES)
import lora_kernels as lk
from triton import knobs
from lora_kernels.triton_ops import compile_only as co
from lora_kernels.triton_ops import lora_linear as tri

out = {}
seen = []
STREAM = [0]
co._Driver.get_current_stream = lambda self, device=None: STREAM[0]  # (the stand-in driver's current stream)
torch.manual_seed(0)
x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
W = torch.randn(256, 256, dtype=torch.bfloat16)
A, B = torch.randn(16, 256, requires_grad=True), torch.randn(256, 16, requires_grad=True)
dy = torch.randn(64, 256, dtype=torch.bfloat16)
metadata = []


def hook(md):
    metadata.append(md.get()["name"])  # (a LazyDict: what a profiler such as proton reads)


def step(stream, seed):
    STREAM[0] = stream
    seen.clear()
    x.grad = A.grad = B.grad = None
    lk.lora_linear(x, W, A, B, None, None, 2.0, 0.1, True, seed, backend="triton").backward(dy)
    INTS.append([[type(a) is Address for a in l.args] for l in seen])  # (addresses given as ints)
    TENSORS.append([[type(a) is torch.Tensor for a in l.args] for l in seen])
    return [[l.name, l.stream, l.hooked] for l in seen], launches(seen)


INTS, TENSORS = [], []


with record_launches(seen.append):
    for path, (fast, plans, calls) in {"triton": (False, False, False), "cache": (True, False, False),
                                       "launch plans": (True, True, False), "call plans": (True, True, True)}.items():
        L.clear()
        L.FAST_LAUNCH, L.PLANS, L.CALLS = fast, plans, calls
        step(0, 1)
        step(0, 1)  # (the cache's misses and the plans' recording step behind)
        before = dict(L.stats())
        quiet = [step(100 + i, 5 + i) for i in range(2)]  # the current stream changes between calls
        mid = dict(L.stats())
        knobs.runtime.launch_enter_hook.add(hook)
        knobs.runtime.launch_exit_hook.add(hook)
        try:
            metadata.clear()
            hooked = step(300, 5)
            names = list(metadata)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
            knobs.runtime.launch_exit_hook.remove(hook)
        after = dict(L.stats())
        # A plain function in place of the chain (Triton's older API): also called on every launch.
        chain, knobs.runtime.launch_enter_hook = knobs.runtime.launch_enter_hook, hook
        try:
            metadata.clear()
            plain = step(350, 5)
            plain_names = list(metadata)
        finally:
            knobs.runtime.launch_enter_hook = chain
        again = step(400, 5)
        # Without POINTER_INTS: the call plans pass tensors again.
        L.POINTER_INTS = False
        try:
            off = step(450, 5)
        finally:
            L.POINTER_INTS = True
        out[path] = dict(off=off[1], ints=INTS[-6:], tensors=TENSORS[-6:],
                         quiet=[q[0] for q in quiet], hooked=hooked[0], names=names, again=again[0],
                         plain=plain[0], plain_names=plain_names,
                         same=[q[1] for q in quiet[:1]] + [hooked[1], again[1]],
                         hits=[mid[k] - before[k] for k in ("hits", "plan_hits", "call_hits")],
                         hooked_hits=[after[k] - mid[k] for k in ("hits", "plan_hits", "call_hits")])
print(json.dumps(out))
"""


def test_direct_launches_take_the_current_stream_and_keep_launch_hooks():
    """``launch.run_compiled``: the launch cache's hits and the plans' replays call the compiled kernel's launcher
    directly, without Triton's runner, while no launch hook is set. Each launch still takes the stream current at
    that call (changed between steps here), and a hook added to Triton's chains (as a profiler adds one) sees every
    launch of every path with its metadata, each once on entry and once on exit, as does a plain function set in
    place of the entry chain (Triton's older API); removed, the launches go direct again. Triton's own path passes
    its (empty) chains to every launch. A call plan's direct launches pass each tensor as its address, an int
    (``launch.POINTER_INTS``: no driver check of the address per launch); through the runner, with that switch off
    and on every other path the tensors themselves, and otherwise the same launches."""
    got = _run(_LAUNCHES + _HOOKS)
    names = ["_shrink_kernel", "_fwd_tma_kernel", "_bwd_dy_kernel", "_bwd_dx_tma_kernel"]
    for path, g in got.items():
        direct = path != "triton"
        for i, launched in enumerate(g["quiet"]):
            assert launched == [[n, 100 + i, not direct] for n in names], (path, launched)
        assert g["hooked"] == [[n, 300, True] for n in names], (path, g["hooked"])
        assert g["names"] == [n for n in names for _ in range(2)], (path, g["names"])
        assert g["plain"] == [[n, 350, True] for n in names] and g["plain_names"] == names, (path, g["plain"])
        assert g["again"] == [[n, 400, not direct] for n in names], (path, g["again"])
        # Apart from the stream, the same launches with and without hooks (and on every path: below).
        assert g["same"][1:] == [[lst[:4] + [s] + lst[5:] for lst in g["same"][0]] for s in (300, 400)], path
    assert got["triton"]["hits"] == [0, 0, 0]
    assert got["cache"]["hits"] == [8, 0, 0] and got["cache"]["hooked_hits"] == [4, 0, 0], got["cache"]
    assert got["launch plans"]["hits"] == [0, 8, 0] and got["launch plans"]["hooked_hits"] == [0, 4, 0]
    assert got["call plans"]["hits"] == [0, 8, 4] and got["call plans"]["hooked_hits"] == [0, 4, 2]
    assert len({json.dumps(g["same"]) for g in got.values()}) == 1, "another path, other launches"
    # Call plans launching directly pass every tensor as its address (launch.POINTER_INTS); through Triton's runner
    # (hooks set), with POINTER_INTS off, and on every other path, the tensors themselves (steps: quiet, quiet,
    # hooked, plain hook, again, off).
    tensors = got["triton"]["tensors"][0]
    assert sum(map(sum, tensors)) >= 20, tensors
    for path, g in got.items():
        for i, (ints, given) in enumerate(zip(g["ints"], g["tensors"], strict=True)):
            expect = path == "call plans" and i in (0, 1, 4)
            assert ints == (tensors if expect else [[False] * len(t) for t in tensors]), (path, i, ints)
            assert given == ([[False] * len(t) for t in tensors] if expect else tensors), (path, i, given)
    off = got["call plans"]["off"]
    assert [lst[:4] + lst[5:] for lst in off] == [lst[:4] + lst[5:] for lst in got["call plans"]["same"][2]], off


def test_the_launchers_modules_are_watched_and_rebind_nothing_behind_it():
    """Call plans compare the launchers' modules' generation (``launch.WatchedModule``), which attribute assignment
    moves on; a write into a module's ``__dict__`` from its own code would not. So both modules are watched, and
    neither holds a ``global`` statement, a ``globals()`` or ``vars()`` call, or a ``__dict__`` access."""
    import ast

    from lora_kernels.triton_ops import launch, lora_linear, single_pass

    for module in (lora_linear, single_pass):
        assert type(module) is launch.WatchedModule, module.__name__
        tree = ast.parse(Path(module.__file__).read_text())
        found = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Global | ast.Nonlocal)]
        found += [
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("globals", "vars")
        ]
        found += [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "__dict__"]
        assert not found, (module.__name__, found)
        before = launch._GENERATION[module]
        module.SOME_SWITCH_FOR_THE_TEST = 1
        del module.SOME_SWITCH_FOR_THE_TEST
        assert launch._GENERATION[module] > before
