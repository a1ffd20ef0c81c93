"""scripts/plan_validate.py: σ, the cost of meeting once per communicating step, on constructed inputs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cser_hooks import plan

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("plan_validate", REPO / "scripts" / "plan_validate.py")
pv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pv)

WORK = plan.Workload(((1 << 20,),), 0.050)   # one 4 MiB bucket, 50 ms of compute
LINK = plan.Link(1e9, 50e-6, 0.0)


def test_sigma_is_what_the_sync_floor_has_beyond_its_own_prediction():
    costs = plan.costs.load()
    own, _wire, comp = pv.window_prediction(pv.SYNC_FLOOR, WORK, LINK, costs)
    # the sync floor's prediction holds the floor, its tiny allreduce and its EF passes over the bucket
    assert comp > 0 and own > WORK.compute_s + comp * 0.99
    assert pv.sync_cost(own + 0.012, WORK, LINK, costs) == pytest.approx(0.012, abs=1e-9)
    assert pv.sync_cost(own - 0.005, WORK, LINK, costs) == 0.0        # never negative
    assert pv.sync_cost(None, WORK, LINK, costs) == 0.0                # the sync floor did not run
    # a σ already on the link is not part of the sync floor's own prediction
    assert pv.sync_cost(own + 0.012, WORK, plan.Link(1e9, 50e-6, 0.0, 0.5), costs) == pytest.approx(0.012, abs=1e-9)
    # the EF passes are subtracted: σ is smaller than measured − floor − allreduce by the compression time
    tr = plan.traffic(pv.SYNC_FLOOR, WORK, pv.WORKERS)
    allreduce = sum(LINK.seconds(c, pv.WORKERS) for c in tr.regular.collectives)
    naive = own + 0.012 - WORK.compute_s - allreduce
    assert naive - pv.sync_cost(own + 0.012, WORK, LINK, costs) == pytest.approx(comp, rel=0.05)
