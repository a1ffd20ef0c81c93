"""Horovod job of tests/test_horovod_frontend.py: every ``cser_hooks.horovod`` class, trained in turn.

One ``horovodrun`` job runs all configurations of :data:`CONFIGS` in sequence (each with a fresh model,
optimizer and compression object) on the MLP of ``tests/ddp_workload.py`` (every rank its own batches)
and saves, per configuration, the final parameters, the bytes each ``compress`` handed to Horovod per
step (observed by :class:`Recorder`, a pass-through around the compression object), the object's
``stats()`` after every step and its ``state_dict()`` at the end. It also collects the error messages
of the misuses the front end must refuse (:func:`misuse_messages`).

Usage (through tests/hvd_harness.run_horovod): hvd_frontend_job.py [config names...]  (default: all)
"""
from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

import ddp_workload as W

STEPS = 30
RB16 = "random_block:ratio=1/16,block=8"
RB4 = "random_block:ratio=1/4,block=8"
TOPK16 = "top_k:ratio=1/16"
WIDE_IN = 256

# cls: class of cser_hooks.horovod (or "none": hvd.DistributedOptimizer without compression)
# attach: "inner" (optimizer= the torch optimizer), "dist" (attach_optimizer(hvd.DistributedOptimizer)), None
# bpps: backward_passes_per_step;  set_to_none: zero_grad(set_to_none=...);  groups: Horovod's groups=
CONFIGS = [
    dict(name="none", cls="none", momentum=0.9),
    dict(name="fp16", cls="FP16", momentum=0.9),
    dict(name="random_block", cls="RandomBlock", kw=dict(ratio=1 / 16, block=8), momentum=0.9),
    dict(name="random_k", cls="RandomK", kw=dict(ratio=1 / 8, warmup_steps=2), momentum=0.0),
    dict(name="ef_rb", cls="EF", kw=dict(compressor=RB16), momentum=0.9, attach="inner"),
    dict(name="ef_rb_noopt", cls="EF", kw=dict(compressor=RB16), momentum=0.9, attach=None),
    # the bias vectors (< 50 elements) go through Horovod's dense average
    dict(name="ef_rb_small_dense", cls="EF", kw=dict(compressor=RB16, min_compress_numel=50), momentum=0.9,
         attach="inner"),
    dict(name="ag_ef_topk_small_dense", cls="AllgatherEF", kw=dict(compressor=TOPK16, min_compress_numel=50),
         momentum=0.9, attach="inner"),
    dict(name="ef_rb_bpps2", cls="EF", kw=dict(compressor=RB16), momentum=0.9, attach="inner", bpps=2,
         set_to_none=True, groups=2),
    dict(name="ef_rb_bpps2_keep", cls="EF", kw=dict(compressor=RB16), momentum=0.9, attach="inner", bpps=2,
         set_to_none=False),
    dict(name="ef_rb_ckpt", cls="EF", kw=dict(compressor=RB16), momentum=0.9, attach="inner", restart_at=13),
    dict(name="cser_part", cls="CSER", kw=dict(c1=RB16, c2=RB4, period=4), momentum=0.9, attach="inner"),
    dict(name="cser_full_dist", cls="CSER", kw=dict(c1=RB16, c2="identity", period=4), momentum=0.0,
         attach="dist", groups=3),
    dict(name="cser_part_noopt", cls="CSER", kw=dict(c1=RB16, c2=RB4, period=4), momentum=0.9, attach=None),
    dict(name="cser_pl", cls="CSER", kw=dict(c1="zero", c2="identity", period=4), momentum=0.9,
         attach="inner"),
    dict(name="ef_fp16", cls="EF", kw=dict(compressor="fp16"), momentum=0.9, attach="inner"),
    dict(name="ag_ef_topk", cls="AllgatherEF", kw=dict(compressor=TOPK16), momentum=0.9, attach="inner"),
    dict(name="ag_ef_sign", cls="AllgatherEF", kw=dict(compressor="sign_blockwise"), momentum=0.0,
         attach="inner", lr=0.02),
    dict(name="ag_ef_qsgd", cls="AllgatherEF", kw=dict(compressor="qsgd:s=15"), momentum=0.9, attach="inner"),
    dict(name="ag_ef_compose", cls="AllgatherEF", kw=dict(compressor="top_k:ratio=1/8 + qsgd:s=15"),
         momentum=0.0, attach="inner"),
    dict(name="ag_cser_topk", cls="AllgatherCSER", kw=dict(c1=TOPK16, c2=RB4, period=4), momentum=0.9,
         attach="inner"),
    dict(name="wide_rb64", cls="RandomBlock", kw=dict(ratio=1 / 64, block=64), momentum=0.0, model="wide",
         steps=3),
    dict(name="wide_ef_rb64_nocheck", cls="EF", kw=dict(compressor="random_block:ratio=1/64,block=64",
                                                        check_finite=False),
         momentum=0.0, model="wide", steps=3, attach="inner"),
]
CONFIG = {c["name"]: c for c in CONFIGS}


def build_model(cfg: dict) -> nn.Module:
    if cfg.get("model") == "wide":
        torch.manual_seed(7)
        return nn.Sequential(nn.Linear(WIDE_IN, 128), nn.Tanh(), nn.Linear(128, W.CLASSES))
    return W.build_model()


def batch(cfg: dict, rank: int, index: int):
    """Rank's batch number ``index`` (``step * bpps + micro``)."""
    if cfg.get("model") == "wide":
        gen = torch.Generator().manual_seed(99_991 * (rank + 1) + index)
        x = torch.randn(W.BATCH, WIDE_IN, generator=gen)
        return x, torch.randint(0, W.CLASSES, (W.BATCH,), generator=gen)
    return W.make_batch(rank, index)


class Recorder:
    """Pass-through compression that records the bytes of every tensor ``compress`` hands to Horovod."""

    def __init__(self, inner):
        self.inner = inner
        self.sizes: list = []   # per call: (numel of the gradient, bytes handed, dtype)

    def compress(self, tensor):
        out, ctx = self.inner.compress(tensor)
        self.sizes.append((tensor.numel(), out.numel() * out.element_size(), str(out.dtype)))
        return out, ctx

    def decompress(self, tensor, ctx):
        return self.inner.decompress(tensor, ctx)


def make_compression(cfg: dict, model: nn.Module, opt):
    from cser_hooks import horovod as H

    # a configuration's "cls" is the algorithm's label (the reference simulation in the test reads it)
    CLASS_OF = {"FP16": H.FP16Compression, "BF16": H.BF16Compression, "RandomBlock": H.RandomBlockCompression,
                "RandomK": H.RandomKCompression, "EF": H.EFCompression, "CSER": H.CSERCompression,
                "AllgatherEF": H.AllgatherEF, "AllgatherCSER": H.AllgatherCSER}

    cls, kw = cfg["cls"], dict(cfg.get("kw", {}))
    public = CLASS_OF[cls]
    if cls in ("FP16", "BF16"):
        return public()
    if cls in ("RandomBlock", "RandomK"):
        return public(named_parameters=model.named_parameters(), **kw)
    if cfg.get("attach") == "inner" or cls.startswith("Allgather"):
        kw["optimizer"] = opt
    return public(model.named_parameters(), **kw)


def snapshot(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Run:
    """Model, optimizer, compression and Horovod optimizer of one configuration."""

    def __init__(self, hvd, cfg: dict):
        self.cfg = cfg
        self.model = build_model(cfg)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.get("lr", W.LR), momentum=cfg["momentum"])
        self.comp = None if cfg["cls"] == "none" else make_compression(cfg, self.model, self.opt)
        self.recorder = None
        if cfg["cls"].startswith("Allgather"):
            self.step_opt = self.opt
        else:
            kwargs = {}
            if self.comp is not None:
                self.recorder = kwargs["compression"] = Recorder(self.comp)
            self.step_opt = hvd.DistributedOptimizer(
                self.opt, named_parameters=self.model.named_parameters(),
                backward_passes_per_step=cfg.get("bpps", 1), groups=cfg.get("groups"), **kwargs)
            if cfg.get("attach") == "dist":
                self.comp.attach_optimizer(self.step_opt)

    def train_step(self, rank: int, s: int) -> None:
        bpps = self.cfg.get("bpps", 1)
        if self.cfg.get("set_to_none", True):
            self.step_opt.zero_grad()  # Horovod's zero_grad() -> torch's default set_to_none=True
        else:
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        for m in range(bpps):
            x, y = batch(self.cfg, rank, s * bpps + m)
            (W.loss_fn(self.model(x), y) / bpps).backward()
        self.step_opt.step()


def train(hvd, cfg: dict, rank: int) -> dict:
    start = time.perf_counter()
    run = Run(hvd, cfg)
    out = {"init": snapshot(run.model), "bytes": [], "stats": [], "new_grads": []}
    steps = cfg.get("steps", STEPS)
    for s in range(steps):
        if s == cfg.get("restart_at"):
            run = restart(hvd, cfg, run)
        mark = len(run.recorder.sizes) if run.recorder is not None else 0
        run.train_step(rank, s)
        # gradient tensors that are new objects since the last step (zero_grad(set_to_none=True) -> all)
        out["new_grads"].append(sum(not getattr(p.grad, "_seen_by_job", False)
                                    for p in run.model.parameters()))
        for p in run.model.parameters():
            p.grad._seen_by_job = True
        if run.recorder is not None:
            out["bytes"].append(run.recorder.sizes[mark:])
        if hasattr(run.comp, "stats"):
            out["stats"].append(run.comp.stats())
    out["final"] = snapshot(run.model)
    out["state"] = run.comp.state_dict() if hasattr(run.comp, "state_dict") else None
    out["names"] = [n for n, _ in run.model.named_parameters()]
    out["seconds"] = time.perf_counter() - start
    return out


def restart(hvd, cfg: dict, old: Run) -> Run:
    """Checkpoint (model, optimizer, compression state_dict), rebuild everything, restore, continue."""
    saved = {"model": {k: v.clone() for k, v in old.model.state_dict().items()},
             "opt": old.step_opt.state_dict(), "comp": old.comp.state_dict()}
    new = Run(hvd, cfg)
    new.model.load_state_dict(saved["model"])
    new.step_opt.load_state_dict(saved["opt"])  # momentum lives in the optimizer that steps
    new.comp.load_state_dict(saved["comp"])
    return new


def misuse_messages(hvd) -> dict:
    """The error message (``Type: text``) of each misuse the front end must refuse, or 'no error'."""
    from cser_hooks import horovod as H

    model = W.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def catch(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the message is the result
            return f"{type(e).__name__}: {e}"
        return "no error"

    def elastic():
        os.environ["HOROVOD_ELASTIC"] = "1"
        try:
            H.EFCompression(model.named_parameters())
        finally:
            del os.environ["HOROVOD_ELASTIC"]

    def allgather_wrapped():
        dopt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters())
        H.AllgatherEF(model.named_parameters(), optimizer=dopt)

    def unknown_tensor():
        comp = H.EFCompression(model.named_parameters(), "random_block:ratio=1/4,block=8")
        comp.compress(torch.zeros(3, 3))

    def skipped_step():
        """The attached optimizer skips a step (as GradScaler does on inf): a RuntimeWarning, no hang."""
        import warnings

        m = W.build_model()
        inner = torch.optim.SGD(m.parameters(), lr=0.1)
        comp = H.EFCompression(m.named_parameters(), "random_block:ratio=1/4,block=8", optimizer=inner)
        dopt = hvd.DistributedOptimizer(inner, named_parameters=m.named_parameters(), compression=comp)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in range(3):
                dopt.zero_grad()
                x, y = W.make_batch(hvd.rank(), s)
                W.loss_fn(m(x), y).backward()
                if s == 1:
                    dopt.synchronize()  # gradients exchanged, but no optimizer.step()
                else:
                    dopt.step()
        if comp.step != 3:
            return f"step counter {comp.step}, expected 3"
        return "; ".join(f"{w.category.__name__}: {w.message}" for w in caught) or "no warning"

    def config_mismatch():
        """Ranks built with different seeds: the first compress fails on every rank, naming the field."""
        m = W.build_model()
        inner = torch.optim.SGD(m.parameters(), lr=0.1)
        comp = H.EFCompression(m.named_parameters(), "random_block:ratio=1/4,block=8", seed=hvd.rank(), optimizer=inner)
        dopt = hvd.DistributedOptimizer(inner, named_parameters=m.named_parameters(), compression=comp)
        x, y = W.make_batch(hvd.rank(), 0)
        W.loss_fn(m(x), y).backward()
        dopt.step()

    return {
        "skipped_step": skipped_step(),
        "config_mismatch": catch(config_mismatch),
        "ef_top_k": catch(lambda: H.EFCompression(model.named_parameters(), "top_k:ratio=1/64")),
        "ef_sign": catch(lambda: H.EFCompression(model.named_parameters(), "sign_blockwise")),
        "ef_qsgd": catch(lambda: H.EFCompression(model.named_parameters(), "qsgd:s=15")),
        "ef_compose": catch(lambda: H.EFCompression(model.named_parameters(), "top_k:ratio=1/8 + qsgd:s=15")),
        "cser_top_k": catch(lambda: H.CSERCompression(model.named_parameters(), c1="top_k:ratio=1/64")),
        "bf16": catch(H.BF16Compression),
        "random_block_no_names": catch(lambda: H.RandomBlockCompression(1 / 64)),
        "elastic": catch(elastic),
        "allgather_wrapped": catch(allgather_wrapped),
        "allgather_as_compression": catch(
            lambda: H.AllgatherEF(model.named_parameters(), optimizer=opt).compress(torch.zeros(1))),
        "unknown_tensor": catch(unknown_tensor),
    }


def fp16_extremes(hvd) -> dict:
    """FP16 on values beyond fp16's range and across ranks: finite, clipped, averaged."""
    from cser_hooks import horovod as H

    comp = H.FP16Compression()
    t = torch.tensor([1e6, -1e6, 3.0, 1e-3]) * (hvd.rank() + 1)
    payload, ctx = comp.compress(t)
    handed = (payload.dtype, payload.numel() * payload.element_size())
    out = comp.decompress(hvd.allreduce(payload, name="fp16_extremes", op=hvd.Average), ctx)
    return {"input": t, "output": out, "handed": handed}


def comm_checks(hvd) -> dict:
    """HorovodCommunicator's collectives on known data (each rank reports what it received)."""
    from cser_hooks.horovod.comm import HorovodCommunicator

    comm = HorovodCommunicator()
    r, n = comm.rank, comm.world_size
    size = lambda src, dst: (src + 2 * dst) % 3 + 1  # elements rank src sends to rank dst
    inputs = [torch.full((size(r, j),), 100.0 * r + j) for j in range(n)]
    a2a = comm.all_to_all_async(inputs, [size(j, r) for j in range(n)]).wait()
    agv = comm.allgather_v_async(torch.full((r,), float(r)), list(range(n))).wait()
    ag = comm.allgather_async(torch.arange(3, dtype=torch.uint8) + r).wait()
    mx = comm.allreduce_max(torch.tensor([float(r), -float(r)]))
    mean = comm.allreduce_mean(torch.tensor([float(r)]))
    return {"a2a": a2a, "agv": agv, "ag": ag, "max": mx, "mean": mean, "objects": comm.all_gather_object(r),
            "bytes": comm.bytes_sent}


def main(names) -> None:
    import horovod.torch as hvd
    from hvd_result import save_result

    hvd.init()
    torch.set_num_threads(1)
    rank = hvd.rank()
    result = {"rank": rank, "size": hvd.size(), "runs": {}}
    for name in names or [c["name"] for c in CONFIGS]:
        result["runs"][name] = train(hvd, CONFIG[name], rank)
    result["misuse"] = misuse_messages(hvd)
    result["fp16_extremes"] = fp16_extremes(hvd)
    result["comm"] = comm_checks(hvd)
    save_result(rank, result)


if __name__ == "__main__":
    main(sys.argv[1:])
