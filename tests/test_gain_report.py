"""``log_gain=``: one line in the user's own job with the predicted gain on their link (cser_hooks/gain.py).

Real 2-rank gloo DDP. The line's per-step wire figures must equal the state's own ``stats()`` totals
over the reported window (warm-up left out), differenced here step by step; its predicted times are
recomputed here by hand from those figures with the formula the docstring states (compute +
compress + wire·(1 + overhead)/B + 2(W−1)·α per collective), so a wrong window or formula fails.
"""
from __future__ import annotations

import re

import pytest
import torch

from harness import run_ranks

STEPS, WINDOW, COMPUTE_MS = 7, 4, 50.0


def _job(rank, world, knobs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from cser_hooks import ddp as D

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    net = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    st = D.EFState(compressor="random_block:ratio=1/8", optimizer=opt,
                   log_gain={"link": "100mbit", "compute_ms": COMPUTE_MS, "steps": WINDOW, **knobs})
    net.register_comm_hook(st, D.ef_hook)
    totals = []
    g = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        opt.zero_grad()
        net(torch.randn(16, 256, generator=g)).pow(2).mean().backward()
        opt.step()
        s = st.stats()
        totals.append({k: s[k] for k in ("wire_bytes_total", "dense_wire_bytes_total", "compress_seconds",
                                         "collectives_total")})
    return {"line": st.gain.line, "totals": totals}


def test_line_reports_the_measured_window_through_the_formula():
    res = run_ranks(_job, 2, {}, timeout=120)
    for r in res:
        line, t = r["line"], r["totals"]
        assert line is not None and "predicted on 100 Mbit" in line, line
        assert "[measured over steps 1..4]" in line, line  # warm-up step 0 left out
        base, end = t[0], t[WINDOW]  # after step 0 (warm-up) and after step 4
        wire = (end["wire_bytes_total"] - base["wire_bytes_total"]) / WINDOW
        dense = (end["dense_wire_bytes_total"] - base["dense_wire_bytes_total"]) / WINDOW
        assert 0 < wire < dense / 4
        m = re.search(r": ([\d.]+) ms/step vs dense ([\d.]+) ms \(([\d.]+)x; "
                      r"wire ([\d.e+-]+) MB vs ([\d.e+-]+) MB", line)
        assert m, line
        # three significant digits in the line
        assert float(m[4]) == pytest.approx(wire / 1e6, rel=6e-3)
        assert float(m[5]) == pytest.approx(dense / 1e6, rel=6e-3)
        bps = 100e6 / 8 / 1.056  # 100 Mbit, +5.6 % protocol bytes (the default overhead)
        hop = 2 * (2 - 1) * 50e-6
        colls = (end["collectives_total"] - base["collectives_total"]) / WINDOW
        fixed = COMPUTE_MS / 1e3 + wire / bps + hop * colls  # all of the method's step but its compress time
        t_dense = COMPUTE_MS / 1e3 + dense / bps + hop
        # the state reads its compress time during step WINDOW (at the last bucket's hook call, before that
        # bucket's decode), so the line's figure lies between the formula on the totals after step WINDOW - 1
        # and after step WINDOW, whatever the machine's speed; ± 0.05: the line's rounding to 0.1 ms
        lo, hi = (1e3 * (fixed + (c["compress_seconds"] - base["compress_seconds"]) / WINDOW)
                  for c in (t[WINDOW - 1], end))
        assert lo - 0.05 <= float(m[1]) <= hi + 0.05, (m[1], lo, hi)
        assert float(m[2]) == pytest.approx(1e3 * t_dense, abs=0.06)
        assert float(m[3]) == pytest.approx(float(m[2]) / float(m[1]), rel=0.01)


BAD = [{"link": "1gbit"}, {"link": "fast", "compute_ms": 10}, {"link": "1gbit", "compute_ms": 0},
       {"link": "1gbit", "compute_ms": 10, "steps": 0}, {"link": "1gbit", "compute_ms": 10, "x": 1}, "1gbit"]


@pytest.mark.parametrize("spec", BAD)
def test_bad_spec_is_refused(spec):
    from cser_hooks.algorithms.ef import ErrorFeedback
    from cser_hooks.comm import Communicator

    with pytest.raises(ValueError, match="log_gain"):
        ErrorFeedback(Communicator(), log_gain=spec)
