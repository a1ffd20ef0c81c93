"""The FSDP2 / HSDP front end (cser_hooks/fsdp.py) on 4 real gloo ranks as a (2 replicas × 2 shards) mesh.

One spawn runs every job (start-up dominates on 2 cores); the tests check its results:
  * EF (random_block, top_k) and CSER (partial reset) over the replicate all-reduce match the
    single-process reference of tests/reference/fsdp.py on the unsharded model to 1e-5 after 30 steps,
    and a reference with the wrong mask keys (no shard coordinate) is detected;
  * a full CSER reset (c2="identity") leaves the replicas bitwise equal, which they are not mid-period;
  * native HSDP (2-D mesh, no hook) and ours with the identity compressor train to the same parameters,
    in fp32 and with MixedPrecisionPolicy(reduce_dtype=torch.bfloat16);
  * stats(): the replicate-dimension bytes are exactly the payloads of the masks, below dense; the
    shard-dimension reduce-scatter is reported apart;
  * a run resumed mid-period from a per-rank checkpoint (local shards, optimizer, driver) ends bitwise
    where the uninterrupted one does (EF top-k, CSER partial reset);
  * the unsupported set-ups fail with their clear errors.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness import run_ranks
from reference.fsdp import group_key, simulate
from reference.masks import random_block_mask

REPLICAS, SHARDS, STEPS, LR = 2, 2, 30, 0.1
GROUPS = [("0", ["0.weight", "0.bias"]), ("2", ["2.weight", "2.bias"]), ("", ["4.weight", "4.bias"])]
RB = "random_block:ratio=1/4,block=8"
CONFIGS = {
    "ef_rb": dict(algorithm="ef", compressor=RB),
    "ef_topk": dict(algorithm="ef", compressor="top_k:ratio=1/4"),
    "cser_partial": dict(algorithm="cser", c1=RB, c2="random_block:ratio=1/2,block=8", period=4),
    "cser_full": dict(algorithm="cser", c1=RB, c2="identity", period=5),
}
SNAPSHOT = 27  # mid-period of cser_full (resets after steps 4, 9, ..., 29)
RESUMED, RESUME_AT = ("ef_topk", "cser_partial"), 13  # mid-period of cser_partial (resets after 3, 7, 11, 15, ...)


def build():
    torch.manual_seed(0)
    # dims chosen so that some shards are padded (5 and 3 rows over 2 shards)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def data(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def loss_fn(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


# -- the job (every rank) ------------------------------------------------------------------------------

def _shard(model, mesh, **kw):
    from torch.distributed.fsdp import fully_shard
    fully_shard(model[0], mesh=mesh, **kw)
    fully_shard(model[2], mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def _train(rank, model, steps, driver_factory=None, snapshot=None):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    driver = driver_factory(model, opt) if driver_factory else None
    snap = None
    for step in range(steps):
        loss_fn(model, data(step, rank)).backward()
        opt.step()
        opt.zero_grad()
        if step == snapshot:
            snap = _full(model)
    return _full(model), snap, (driver.stats() if driver else None)


def _resume(rank, mesh, name):
    """CONFIGS[name] for RESUME_AT steps, a checkpoint of this rank (the local parameter shards, the
    optimizer and the driver through torch.save), a new model / optimizer / driver loaded from it, and
    the remaining steps: must end bitwise where the uninterrupted run does."""
    import io

    from cser_hooks import fsdp

    cfg = dict(CONFIGS[name])
    alg = cfg.pop("algorithm")

    def fresh():
        model = _shard(build(), mesh["shard"])
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        return model, opt, fsdp.register(model, mesh, alg, optimizer=opt, **cfg)

    def train(model, opt, steps):
        for step in steps:
            loss_fn(model, data(step, rank)).backward()
            opt.step()
            opt.zero_grad()

    model, opt, driver = fresh()
    train(model, opt, range(RESUME_AT))
    buf = io.BytesIO()
    torch.save({"model": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
                "optimizer": opt.state_dict(), "driver": driver.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model, opt, driver = fresh()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.to_local().copy_(saved["model"][n])
    opt.load_state_dict(saved["optimizer"])
    driver.load_state_dict(saved["driver"])
    train(model, opt, range(RESUME_AT, STEPS))
    return _full(model), driver.step


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from cser_hooks import fsdp

    mesh = init_device_mesh("cpu", (REPLICAS, SHARDS), mesh_dim_names=("replicate", "shard"))
    out = {}
    for name, cfg in CONFIGS.items():
        cfg = dict(cfg)
        alg = cfg.pop("algorithm")
        out[name] = _train(rank, _shard(build(), mesh["shard"]), STEPS,
                           lambda m, opt, alg=alg, cfg=cfg: fsdp.register(m, mesh, alg, optimizer=opt, **cfg),
                           snapshot=SNAPSHOT if name == "cser_full" else None)
    for tag, mp in (("fp32", {}), ("bf16", {"mp_policy": MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)})):
        out[f"native_{tag}"] = _train(rank, _shard(build(), mesh, **mp), 10)
        out[f"ours_{tag}"] = _train(rank, _shard(build(), mesh["shard"], **mp), 10,
                                    lambda m, opt: fsdp.register(m, mesh, "ef", compressor="identity", optimizer=opt))
    for name in RESUMED:
        out[f"resume_{name}"] = _resume(rank, mesh, name)
    errors = {
        "1d_mesh": _error(lambda: fsdp.register(_shard(build(), mesh["shard"]), mesh["shard"], "ef")),
        "native_hsdp": _error(lambda: fsdp.register(_shard(build(), mesh), mesh, "ef")),
        "algorithm": _error(lambda: fsdp.register(_shard(build(), mesh["shard"]), mesh, "qsparse")),
        "unsharded": _error(lambda: fsdp.register(build(), mesh, "ef")),
        "skip": _error(lambda: fsdp.register(_shard(build(), mesh["shard"]), mesh, "ef", on_nonfinite="skip")),
    }

    def fp16():
        m = _shard(build(), mesh["shard"], mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float16))
        fsdp.register(m, mesh, "ef", compressor=RB)
        loss_fn(m, data(0, rank)).backward()
    errors["fp16"] = _error(fp16)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_job, REPLICAS * SHARDS, timeout=240)


def _reference(name, **kw):
    cfg = dict(CONFIGS[name])
    return simulate(build, GROUPS, data, loss_fn, replicas=REPLICAS, shards=SHARDS, steps=STEPS, lr=LR, **cfg, **kw)


def _max_diff(a, b):
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _replica(rank):
    return rank // SHARDS


# -- the tests ----------------------------------------------------------------------------------------

@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["ef_rb", "ef_topk", "cser_partial", "cser_full"])
def test_matches_reference(results, name):
    ref, _ = _reference(name)
    for rank, res in enumerate(results):
        d = _max_diff(res[name][0], ref[_replica(rank)])
        assert d < 1e-5, f"{name}: rank {rank} differs from the reference by {d}"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", ["ef_rb", "cser_partial"])
def test_wrong_reference_is_detected(results, name):
    """Masks drawn per group without the shard coordinate (another key): the comparison must fail."""
    wrong, _ = _reference(name, key_fn=lambda fqn, s, shards: fqn or "<root>")
    assert _max_diff(results[0][name][0], wrong[0]) > 1e-4


@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", RESUMED)
def test_resume_from_a_checkpoint_is_bitwise(results, name):
    for rank, res in enumerate(results):
        resumed, step = res[f"resume_{name}"]
        assert step == STEPS
        assert all(torch.equal(resumed[n], res[name][0][n]) for n in resumed), f"{name}: rank {rank} differs"


@pytest.mark.timeout(400)
def test_full_reset_makes_replicas_bitwise_equal(results):
    final = [r["cser_full"][0] for r in results]
    mid = [r["cser_full"][1] for r in results]
    for a, b in ((0, 2), (1, 3)):  # the same shard coordinate on the two replicas
        assert all(torch.equal(final[a][n], final[b][n]) for n in final[a]), "replicas differ after a full reset"
        assert _max_diff(mid[a], mid[b]) > 1e-6, "replicas equal mid-period: the test could not fail"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("tag,tol", [("fp32", 1e-6), ("bf16", 2e-3)])
def test_identity_matches_native_hsdp(results, tag, tol):
    for rank, res in enumerate(results):
        d = _max_diff(res[f"ours_{tag}"][0], res[f"native_{tag}"][0])
        assert d <= tol, f"{tag}: rank {rank}: ours vs native HSDP differ by {d}"
        moved = _max_diff(res[f"ours_{tag}"][0], {n: p.detach() for n, p in build().named_parameters()})
        assert moved > 1e-3  # it trained
        if tag == "bf16":  # the policy took effect: bf16 reductions round differently from fp32 ones
            assert _max_diff(res["ours_bf16"][0], res["ours_fp32"][0]) > 1e-6


def _numels(s):
    out = []
    for _, names in GROUPS:
        model = dict(build().named_parameters())
        n = 0
        for name in names:
            t = model[name]
            c = math.ceil(t.shape[0] / SHARDS)
            rows = max(0, min(c, t.shape[0] - s * c))
            n += rows * (t.numel() // t.shape[0])
        out.append(n)
    return out


def _padded_numels():
    model = dict(build().named_parameters())
    return [sum(math.ceil(model[n].shape[0] / SHARDS) * (model[n].numel() // model[n].shape[0]) for n in names)
            for _, names in GROUPS]


@pytest.mark.timeout(400)
def test_replicate_bytes_exact_and_below_dense(results):
    for rank, res in enumerate(results):
        st = res["ef_rb"][2]
        s = rank % SHARDS
        numels = _numels(s)
        dense = 4 * sum(numels) * STEPS
        expected = 4 * sum(numels)  # warm-up step 0: the dense average
        for step in range(1, STEPS):
            for (fqn, _), n in zip(GROUPS, numels):
                k = int(random_block_mask(n, 0.25, 8, 0, step, group_key(fqn, s, SHARDS), "c1").sum())
                k = math.ceil(k / 8) * 8  # the payload pads a selected short tail block
                expected += 4 * (k + 1)   # + the non-finite flag
        assert st["bytes_sent_total"] == expected
        assert st["dense_bytes_total"] == dense
        assert st["wire_bytes_total"] == expected  # ring allreduce at W = 2: 2(W−1)/W · n = n
        # below dense; on shards of 5..35 elements the 8-element blocks and the flag give ≈ 0.55 of dense
        assert st["wire_bytes_total"] < 0.6 * st["dense_wire_bytes_total"]
        assert st["replicas"] == REPLICAS and st["shards"] == SHARDS
        rs = 4 * sum(_padded_numels()) * STEPS  # per group: the padded shard × S, fp32
        assert st["reduce_scatter_bytes_total"] == rs * SHARDS
        assert st["reduce_scatter_wire_bytes_total"] == rs * (SHARDS - 1)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case,text", [
    ("1d_mesh", "needs the 2-D DeviceMesh"),
    ("native_hsdp", "mesh=mesh['shard']"),
    ("algorithm", "not supported on the FSDP front end"),
    ("unsharded", "has no FSDP module"),
    ("skip", "on_nonfinite='skip'"),
    ("fp16", "reduce_dtype=torch.float16 is not supported"),
])
def test_clear_errors(results, case, text):
    for res in results:
        assert text in res["errors"][case], res["errors"][case]
