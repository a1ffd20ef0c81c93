"""The Horovod front end (cser_hooks.horovod) under real ``horovodrun --gloo`` jobs.

One job per world size (2 and 4 ranks) trains every configuration of
``tests/hvd_scripts/hvd_frontend_job.py`` (all classes, 30 steps of the MLP of tests/ddp_workload.py,
each rank its own batches). Checked here against:

* a per-parameter reference simulation of W workers written in this file from docs/algorithms.md §1-3
  and the team brief's shared-mask definition (it imports nothing from ``cser_hooks``): compressed
  averaging, EF (random_block, top_k, sign), CSER (reset after the step, or one step later without
  the optimizer), AllgatherCSER with top_k, under ``zero_grad(set_to_none=True)``,
  ``backward_passes_per_step=2`` and ``groups=``; final parameters *and* EF residuals;
* the DDP hooks in per-tensor mode (``named_parameters=``) on a real gloo group (tests/harness.py):
  same model, data, seed and configuration -> the same parameters (acceptance: <= 1e-5);
* the bytes each ``compress`` handed to Horovod (observed at the Horovod boundary by the job) against
  the wire size of the shared-mask payload, and against ``stats()``.
"""
from __future__ import annotations

import math

import pytest
import torch

import ddp_workload as W
from hvd_harness import run_horovod
from hvd_scripts import hvd_frontend_job as J
from reference.masks import random_block_mask

pytestmark = [pytest.mark.horovod, pytest.mark.timeout(1200), pytest.mark.usefixtures("one_thread")]

TOL = 1e-5
FLAG_BYTES = 4  # the fp32 non-finite flag that travels with every compressed payload


_JOBS: dict = {}


def job(np_: int) -> list:
    if np_ not in _JOBS:
        _JOBS[np_] = run_horovod("hvd_frontend_job.py", np_, timeout=1000)
    return _JOBS[np_]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"np{n}")
def world(request):
    return request.param, job(request.param)


# --------------------------------------------------------------------------------------------------
# reference simulation (independent of cser_hooks)


def rb_mask(numel, ratio, block, seed, step, key, salt) -> torch.Tensor:
    """The shared mask (tests/reference/masks.py): k = min(nblocks, ceil(ratio*numel/b)) of nblocks blocks."""
    return random_block_mask(numel, ratio, block, seed, step, key, salt)


def parse(spec: str) -> tuple:
    name, _, args = spec.partition(":")
    kv = dict(a.split("=") for a in args.split(",") if a)
    ratio = eval(kv.get("ratio", "1"), {})  # "1/16"
    return name, float(ratio), (1 if name == "random_k" else int(kv.get("block", 256)))


def compress_dense(spec: str, v: torch.Tensor, seed, step, key, salt="c1") -> torch.Tensor:
    """C(v) as a dense tensor of v's shape."""
    name, ratio, block = parse(spec)
    flat = v.reshape(-1)
    if name == "identity":
        return v.clone()
    if name == "zero":
        return torch.zeros_like(v)
    if name in ("random_block", "random_k"):
        return torch.where(rb_mask(flat.numel(), ratio, block, seed, step, key, salt), flat, 0.0).view_as(v)
    if name == "top_k":
        k = min(flat.numel(), max(1, math.ceil(ratio * flat.numel())))
        idx = torch.sort(-flat.abs().double(), stable=True).indices[:k]
        out = torch.zeros_like(flat)
        out[idx] = flat[idx]
        return out.view_as(v)
    if name == "sign_blockwise":  # one block per tensor, ties at 0 -> +1
        return (flat.abs().sum() / flat.numel() * torch.where(flat >= 0, 1.0, -1.0)).view_as(v)
    raise ValueError(spec)


def avg(ts):
    ts = list(ts)
    return torch.stack(ts).sum(0) / len(ts)


class Reference:
    """W replicas of the MLP, torch.optim.SGD's rule re-written, one algorithm per configuration."""

    def __init__(self, cfg: dict, world_size: int):
        self.cfg, self.W = cfg, world_size
        init = W.init_params()
        self.names = list(init)
        self.x = [{n: t.clone() for n, t in init.items()} for _ in range(world_size)]
        self.buf = [{} for _ in range(world_size)]
        self.e = [{n: torch.zeros_like(t) for n, t in init.items()} for _ in range(world_size)]
        self.lr = cfg.get("lr", W.LR)
        self.oracle = W.GradOracle()
        kw = cfg.get("kw", {})
        self.seed = kw.get("seed", 0)
        default_warmup = 0 if cfg["cls"] in ("RandomBlock", "RandomK") else 1
        self.warmup = kw.get("warmup_steps", default_warmup)

    def grads(self, s):
        bpps = self.cfg.get("bpps", 1)
        out = []
        for i in range(self.W):
            g = None
            for m in range(bpps):
                gm = self.oracle(self.x[i], i, s * bpps + m)
                g = {n: gm[n] / bpps for n in gm} if g is None else {n: g[n] + gm[n] / bpps for n in gm}
            out.append(g)
        return out

    def sgd(self, i, g):
        mom = self.cfg["momentum"]
        for n, gn in g.items():
            d = gn
            if mom:
                self.buf[i][n] = gn.clone() if n not in self.buf[i] else mom * self.buf[i][n] + gn
                d = self.buf[i][n]
            self.x[i][n] = self.x[i][n] - self.lr * d

    def reset(self, s):
        """CSER error reset of step s: average the C2-selected entries of every parameter."""
        c2 = self.cfg["kw"]["c2"]
        for n in self.names:
            a = avg(self.x[i][n] for i in range(self.W))
            if c2 == "identity":
                mask = torch.ones_like(a, dtype=torch.bool)
            else:
                _, ratio, block = parse(c2)
                mask = rb_mask(a.numel(), ratio, block, self.seed, s, n, "c2").view_as(a)
            for i in range(self.W):
                self.x[i][n] = torch.where(mask, a, self.x[i][n])

    def reset_due(self, s):
        return s >= self.warmup and (s + 1) % self.cfg["kw"]["period"] == 0

    def step_grads(self, s, g):
        """The gradient each rank's optimizer receives at step s (after warm-up)."""
        cls, kw = self.cfg["cls"], self.cfg.get("kw", {})
        out = [{} for _ in range(self.W)]
        for n in self.names:
            gs = [g[i][n] for i in range(self.W)]
            if gs[0].numel() < kw.get("min_compress_numel", 0):  # small tensors: a plain average
                res = [avg(gs)] * self.W
            elif cls in ("RandomBlock", "RandomK"):
                spec = (f"random_block:ratio={kw['ratio']},block={kw['block']}" if cls == "RandomBlock"
                        else f"random_k:ratio={kw['ratio']}")
                a = avg(compress_dense(spec, v, self.seed, s, n) for v in gs)
                res = [a] * self.W
            elif cls in ("EF", "AllgatherEF"):
                deltas = []
                for i in range(self.W):
                    p = gs[i] + self.e[i][n]
                    d = compress_dense(kw["compressor"], p, self.seed, s, n)
                    self.e[i][n] = p - d
                    deltas.append(d)
                res = [avg(deltas)] * self.W
            elif cls in ("CSER", "AllgatherCSER"):
                cs = [compress_dense(kw["c1"], v, self.seed, s, n) for v in gs]
                a = avg(cs)
                res = [gs[i] - cs[i] + a for i in range(self.W)]
            elif cls in ("none", "FP16"):
                res = [avg(gs)] * self.W
            else:
                raise ValueError(cls)
            for i in range(self.W):
                out[i][n] = res[i]
        return out

    def run(self, steps: int):
        shifted = self.cfg["cls"].endswith("CSER") and self.cfg.get("attach") is None
        for s in range(steps):
            g = self.grads(s)
            if s < self.warmup:
                a = {n: avg(g[i][n] for i in range(self.W)) for n in self.names}
                gi = [a] * self.W
            else:
                gi = self.step_grads(s, g)
            if shifted and s >= 1 and self.reset_due(s - 1):
                self.reset(s - 1)  # without the optimizer: at the next step's compress (one-step shift)
            for i in range(self.W):
                self.sgd(i, gi[i])
            if self.cfg["cls"].endswith("CSER") and not shifted and self.reset_due(s):
                self.reset(s)
        return self


_REFS: dict = {}


def reference(name: str, world_size: int) -> Reference:
    if (name, world_size) not in _REFS:
        cfg = J.CONFIG[name]
        _REFS[name, world_size] = Reference(cfg, world_size).run(cfg.get("steps", J.STEPS))
    return _REFS[name, world_size]


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


# --------------------------------------------------------------------------------------------------
# 1. every class, 2 and 4 ranks, against the reference

EXACT = ["none", "random_block", "random_k", "ef_rb", "ef_rb_small_dense", "ag_ef_topk_small_dense",
         "ef_rb_noopt", "ef_rb_bpps2", "ef_rb_bpps2_keep", "ef_rb_ckpt", "cser_part", "cser_full_dist",
         "cser_part_noopt", "cser_pl", "ag_ef_topk", "ag_ef_sign", "ag_cser_topk"]


@pytest.mark.parametrize("name", EXACT)
def test_matches_reference(world, name):
    np_, results = world
    ref = reference(name, np_)
    init = W.init_params()
    for r in results:
        run = r["runs"][name]
        assert max_diff(run["init"], init) == 0.0
        d = max_diff(run["final"], ref.x[r["rank"]])
        assert d <= TOL, f"{name}, np={np_}, rank {r['rank']}: max |horovod - reference| = {d}"
    moved = max_diff(results[0]["runs"][name]["final"], init)
    assert moved > 100 * TOL, f"{name}: parameters hardly moved ({moved}); the comparison is void"


@pytest.mark.parametrize("name", ["ef_rb_small_dense", "ag_ef_topk_small_dense"])
def test_small_tensors_go_dense_and_are_counted(world, name):
    _, results = world
    n_small = sum(p.numel() < 50 for p in W.init_params().values())
    for r in results:
        assert r["runs"][name]["stats"][-1]["uncompressed_keys"] == n_small > 0
    # and the wrong reference (everything compressed) is told apart
    cfg = {**J.CONFIG[name], "kw": {k: v for k, v in J.CONFIG[name]["kw"].items() if k != "min_compress_numel"}}
    wrong = Reference(cfg, len(results)).run(cfg.get("steps", J.STEPS))
    assert max_diff(results[0]["runs"][name]["final"], wrong.x[0]) > 20 * TOL


@pytest.mark.parametrize("name", ["ef_rb", "ef_rb_noopt", "random_block", "random_k", "ag_ef_topk",
                                  "ag_ef_qsgd", "ag_ef_compose", "fp16", "cser_full_dist"])
def test_replicas_identical_where_the_algorithm_says_so(world, name):
    """EF / compressed averaging apply the same average on every rank; CSER after a full reset
    (period 4: the last reset is after step 27, then 2 local steps) is the exception, checked apart."""
    np_, results = world
    finals = [r["runs"][name]["final"] for r in results]
    if name == "cser_full_dist":
        assert max_diff(finals[0], finals[1]) > 0  # local models bifurcate between resets (§3)
        return
    for f in finals[1:]:
        assert max_diff(f, finals[0]) == 0.0, f"{name}: replicas differ"
    for t in finals[0].values():
        assert torch.isfinite(t).all()
    assert max_diff(finals[0], W.init_params()) > 1e-3


@pytest.mark.parametrize("name", ["fp16", "ef_fp16"])
def test_fp16_close_to_fp32_average(world, name):
    """FP16() and EF over the fp16 cast: half the bytes, within fp16 rounding of the fp32 run."""
    np_, results = world
    ref = reference("none", np_)
    for r in results:
        d = max_diff(r["runs"][name]["final"], ref.x[r["rank"]])
        assert d < 2e-3, f"{name} drifted {d} from the fp32 run"
        assert max_diff(r["runs"][name]["final"], results[0]["runs"][name]["final"]) == 0.0
    warmup = 1 if name == "ef_fp16" else 0
    sizes = results[0]["runs"][name]["bytes"][warmup]
    flag = 2 if name == "ef_fp16" else 0  # EF's non-finite flag travels in the payload's dtype
    assert all(dt == "torch.float16" and b == 2 * n + flag for n, b, dt in sizes), sizes


def test_fp16_clips_and_does_not_overflow_in_the_sum(world):
    np_, results = world
    for r in results:
        ex = r["fp16_extremes"]
        inputs = torch.stack([rr["fp16_extremes"]["input"] for rr in results])
        expected = inputs.clamp(-65504, 65504).mean(0)
        assert torch.isfinite(ex["output"]).all()
        torch.testing.assert_close(ex["output"], expected, rtol=2e-3, atol=1e-6)
        assert ex["handed"] == (torch.float16, 8)


def test_checkpoint_restart_continues_exactly(world):
    """state_dict() at step 13, everything rebuilt and restored: the same parameters as without restart
    (up to the summation order of Horovod's fused allreduce, which may differ between two runs)."""
    np_, results = world
    for r in results:
        assert max_diff(r["runs"]["ef_rb_ckpt"]["final"], r["runs"]["ef_rb"]["final"]) <= 1e-6


def test_communicator_collectives(world):
    np_, results = world
    size = lambda src, dst: (src + 2 * dst) % 3 + 1
    for r in results:
        c, me = r["comm"], r["rank"]
        assert [t.tolist() for t in c["a2a"]] == [[100.0 * j + me] * size(j, me) for j in range(np_)]
        assert [t.tolist() for t in c["agv"]] == [[float(j)] * j for j in range(np_)]
        assert [t.tolist() for t in c["ag"]] == [[j, j + 1, j + 2] for j in range(np_)]
        assert c["max"].tolist() == [np_ - 1.0, 0.0]
        assert c["mean"].tolist() == [(np_ - 1) / 2]
        assert c["objects"] == list(range(np_))
        sent = 4 * sum(size(me, j) for j in range(np_)) + 4 * me + 3 + 8 + 4
        assert c["bytes"] == sent


# --------------------------------------------------------------------------------------------------
# 3. residual state under zero_grad(set_to_none=True), backward_passes_per_step=2 and groups=


@pytest.mark.parametrize("name", ["ef_rb_bpps2", "ef_rb_bpps2_keep", "ef_rb"])
def test_residuals_match_reference(world, name):
    np_, results = world
    ref = reference(name, np_)
    for r in results:
        run = r["runs"][name]
        bufs = run["state"]["buffers"]
        assert sorted(bufs) == sorted(ref.names), "residuals must be keyed by parameter name"
        for n in ref.names:
            e = bufs[n]["e"].view_as(ref.e[r["rank"]][n])
            d = (e - ref.e[r["rank"]][n]).abs().max().item()
            assert d <= TOL, f"{name} rank {r['rank']} residual {n}: {d}"
            assert e.abs().max() > 0
        assert run["state"]["step"] == J.STEPS
        assert run["state"]["key_steps"] == {n: J.STEPS for n in ref.names}


def test_set_to_none_really_made_new_gradient_tensors(world):
    _, results = world
    n_params = len(W.init_params())
    new = results[0]["runs"]["ef_rb_bpps2"]["new_grads"]
    assert new == [n_params] * J.STEPS, "zero_grad(set_to_none=True) must create new .grad tensors every step"
    kept = results[0]["runs"]["ef_rb_bpps2_keep"]["new_grads"]
    assert kept[0] == n_params and set(kept[1:]) == {0}
    a, b = (results[0]["runs"][k]["final"] for k in ("ef_rb_bpps2", "ef_rb_bpps2_keep"))
    assert max_diff(a, b) <= 1e-6


# --------------------------------------------------------------------------------------------------
# 4. bytes handed to Horovod


def shared_mask_bytes(numel: int, ratio: float, block: int) -> int:
    nblocks = math.ceil(numel / block)
    return 4 * block * min(nblocks, math.ceil(ratio * numel / block))


@pytest.mark.parametrize("name", ["wide_rb64", "wide_ef_rb64_nocheck", "random_block", "ef_rb", "cser_part"])
def test_bytes_handed_to_horovod_equal_wire_bytes(world, name):
    _, results = world
    cfg = J.CONFIG[name]
    kw = cfg["kw"]
    spec = kw.get("compressor") or kw.get("c1") or f"random_block:ratio={kw['ratio']},block={kw['block']}"
    _, ratio, block = parse(spec)
    flag = 0 if kw.get("check_finite") is False else FLAG_BYTES
    warmup = kw.get("warmup_steps", 0 if cfg["cls"] == "RandomBlock" else 1)
    for r in results:
        run = r["runs"][name]
        for s, sizes in enumerate(run["bytes"]):
            assert len(sizes) == len(run["names"]), "one compress per parameter per step"
            for numel, handed, dtype in sizes:
                assert dtype == "torch.float32"
                expected = 4 * numel if s < warmup else shared_mask_bytes(numel, ratio, block) + flag
                assert handed == expected, (name, s, numel, handed, expected)
            if cfg.get("attach") or s + 1 < len(run["bytes"]):
                # stats close a step in the post-hook (attached) or at the next step's first compress;
                # CSER's reset after step s-1 runs after that close, so it counts in step s
                st = run["stats"][s] if cfg.get("attach") else run["stats"][s + 1]
                reset = 0
                if cfg["cls"] == "CSER" and s >= 1 and s - 1 >= warmup and s % kw["period"] == 0:
                    _, r2, b2 = parse(kw["c2"])
                    reset = sum(shared_mask_bytes(numel, r2, b2) for numel, _, _ in sizes)
                assert st["bytes_sent_last_step"] == sum(h for _, h, _ in sizes) + reset, (name, s)


def test_random_block_1_64_sends_a_64th(world):
    """RandomBlock(1/64, 64) on a 128x256 weight: the allreduced tensor is 1/64 of it (+ the flag)."""
    _, results = world
    sizes = results[0]["runs"]["wide_rb64"]["bytes"][1]
    for numel, handed, _ in sizes:
        payload = handed - FLAG_BYTES
        assert payload >= 4 * numel / 64
        assert payload <= 4 * (numel / 64 + 64), "more than one block of rounding"
    big = [h for n, h, _ in sizes if n == 128 * 256]
    assert big == [4 * 128 * 256 // 64 + FLAG_BYTES]


def test_cser_pl_sends_nothing_but_the_resets(world):
    """CSER with C1 = zero (CSER-PL): compress hands Horovod an empty tensor, except on a step a reset
    follows, where it is the 4-byte non-finite flag (on_nonfinite='raise': every rank raises together);
    only the full resets (every 4 steps, after the step, counted in the next one) move the model."""
    _, results = world
    total = sum(t.numel() for t in W.init_params().values())
    for r in results:
        run = r["runs"]["cser_pl"]
        for s, sizes in enumerate(run["bytes"]):
            handed = 4 * 1 if s >= 1 and (s + 1) % 4 == 0 else 0
            assert [h for _, h, _ in sizes] == [4 * n if s == 0 else handed for n, _, _ in sizes], s
            reset = 4 * total if s >= 2 and s % 4 == 0 else 0
            assert run["stats"][s]["bytes_sent_last_step"] == sum(h for _, h, _ in sizes) + reset, s
            # a reset is one grouped allreduce of every parameter, not one per tensor
            assert run["stats"][s]["collectives_last_step"] == len(sizes) + (1 if reset else 0), s


@pytest.mark.parametrize("name", ["ag_ef_topk", "ag_ef_sign", "ag_ef_qsgd", "ag_ef_compose"])
def test_allgather_path_bytes_equal_wire_bytes(world, name):
    from cser_hooks.compressors import get_compressor

    _, results = world
    comp = get_compressor(J.CONFIG[name]["kw"]["compressor"])
    shapes = [t.numel() for t in W.init_params().values()]
    expected = sum(comp.wire_bytes(n, torch.float32, [0, n]) + FLAG_BYTES for n in shapes)
    for r in results:
        stats = r["runs"][name]["stats"]
        assert stats[0]["bytes_sent_last_step"] == sum(4 * n for n in shapes)  # dense warm-up step
        assert {s["bytes_sent_last_step"] for s in stats[1:]} == {expected}


# --------------------------------------------------------------------------------------------------
# misuse: clear errors


def test_misuse_is_refused_with_the_fix_in_the_message(world):
    _, results = world
    m = results[0]["misuse"]
    for k in ("ef_top_k", "ef_sign", "ef_qsgd", "ef_compose", "cser_top_k"):
        assert m[k].startswith("ValueError") and "not a shared-mask compressor" in m[k], m[k]
        assert "Allgather" in m[k] and "hvd.allgather" in m[k]
    assert m["bf16"].startswith("NotImplementedError") and "FP16Compression()" in m["bf16"]
    assert "named_parameters=model.named_parameters()" in m["random_block_no_names"]
    assert m["elastic"].startswith("RuntimeError") and "elastic is not supported" in m["elastic"]
    assert "plain torch optimizer" in m["allgather_wrapped"]
    assert m["allgather_as_compression"].startswith("TypeError")
    assert "not the .grad of any parameter" in m["unknown_tensor"]
    assert m["skipped_step"].startswith("RuntimeWarning") and "ended without a step" in m["skipped_step"]
    for r in results:  # every rank fails, none hangs
        assert r["misuse"]["config_mismatch"].startswith("ConfigMismatchError") and "'seed'" in \
            r["misuse"]["config_mismatch"], r["misuse"]["config_mismatch"]


# --------------------------------------------------------------------------------------------------
# 2. cross-front-end: DDP hooks in per-tensor mode == Horovod classes

DDP_EQUIV = {
    # Horovod config name -> DDP state settings
    "ef_rb": dict(algo="ef", bucket_cap_mb=None),
    "cser_part": dict(algo="cser", give_optimizer=True, bucket_cap_mb=W.TINY_BUCKETS),
    "cser_part_noopt": dict(algo="cser", give_optimizer=False, bucket_cap_mb=None),
    "cser_full_dist": dict(algo="cser", give_optimizer=True, bucket_cap_mb=None),
}


def ddp_per_tensor_rank(rank: int, world_size: int, items: list, steps: int) -> dict:
    """Rank function (tests/harness.run_ranks): the DDP hooks in per-tensor mode, one config at a time."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    torch.set_num_threads(1)
    out = {}
    for name, hcfg, dcfg in items:
        model = W.build_model()
        cap = dcfg["bucket_cap_mb"]
        ddp = DDP(model, **({} if cap is None else {"bucket_cap_mb": cap}))
        opt = torch.optim.SGD(model.parameters(), lr=hcfg.get("lr", W.LR), momentum=hcfg["momentum"])
        kw = hcfg["kw"]
        common = dict(seed=0, warmup_steps=1, named_parameters=model.named_parameters())
        if dcfg["algo"] == "ef":
            state, hook = D.EFState(compressor=kw["compressor"], **common), D.ef_hook
        else:
            state = D.CSERState(c1=kw["c1"], c2=kw["c2"], period=kw["period"],
                                optimizer=opt if dcfg["give_optimizer"] else None, **common)
            hook = D.cser_hook
        ddp.register_comm_hook(state, hook)
        for s in range(steps):
            x, y = W.make_batch(rank, s)
            opt.zero_grad()
            W.loss_fn(ddp(x), y).backward()
            opt.step()
        out[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


_DDP: dict = {}


def ddp_runs(world_size: int) -> list:
    if world_size not in _DDP:
        from harness import run_ranks

        items = [(name, J.CONFIG[name], d) for name, d in DDP_EQUIV.items()]
        _DDP[world_size] = run_ranks(ddp_per_tensor_rank, world_size, items, J.STEPS, timeout=400)
    return _DDP[world_size]


@pytest.mark.parametrize("name", list(DDP_EQUIV))
def test_same_parameters_as_the_ddp_hook_per_tensor(name):
    np_ = 2  # one DDP world keeps the run short; the Horovod side is checked on 2 and 4 ranks above
    results = job(np_)
    ddp = ddp_runs(np_)
    for r in results:
        d = max_diff(r["runs"][name]["final"], ddp[r["rank"]][name])
        assert d <= TOL, f"{name}, np={np_}, rank {r['rank']}: max |horovod - ddp| = {d}"
    assert max_diff(results[0]["runs"][name]["final"], W.init_params()) > 100 * TOL


# --------------------------------------------------------------------------------------------------
# gradient tensor -> parameter name (in-process: the mapping needs no collective)


def test_gradient_to_name_mapping_survives_new_and_swapped_tensors():
    from cser_hooks.horovod.names import NamedParameters

    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2, 3))
    c = torch.nn.Parameter(torch.zeros(4))
    m = NamedParameters([("a", a), ("b", b), ("c", c)], "T")
    ga, gb = torch.ones(2, 3), torch.ones(2, 3)
    a.grad, b.grad = ga, gb
    assert (m.name_of(ga), m.name_of(gb)) == ("a", "b")
    a.grad, b.grad = gb, ga  # the cached ids now belong to the other parameter's gradient
    assert (m.name_of(ga), m.name_of(gb)) == ("b", "a")
    a.grad = torch.ones(2, 3)  # zero_grad(set_to_none=True): a new tensor object
    assert m.name_of(a.grad) == "a"
    c.grad = torch.zeros(4).to_sparse()  # sparse_as_dense=True hands compress() a dense copy
    assert m.name_of(c.grad.to_dense()) == "c"
    with pytest.raises(ValueError, match="Adasum"):
        m.name_of(a)
    with pytest.raises(ValueError, match="not the .grad of any parameter"):
        m.name_of(torch.ones(2, 3))
    with pytest.raises(ValueError, match="named_parameters=model.named_parameters"):
        NamedParameters(None, "T")
