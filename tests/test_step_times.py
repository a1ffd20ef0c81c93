"""scripts/step_times.py: step time per method against the floor and dense, and issue 15's bars, on
constructed bench results."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("step_times", REPO / "scripts" / "step_times.py")
st = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(st)


def row(method, step_s, first_s=1.0):
    """A results.json row whose clock runs first_s per step for the first W0 steps, then step_s."""
    curve = [{"step": s, "time": first_s * min(s, st.W0) + step_s * max(0, s - st.W0)}
             for s in range(0, st.STEPS + 1, st.EVAL_EVERY)]
    return {"method": method, "status": "ok", "curve": curve, "wire_ratio": 32.0}


def test_ratios_and_bars():
    res = {"100mbit": {"methods": [row(st.FLOOR, 0.100), row(st.SYNC_FLOOR, 0.120), row("cser-32", 0.139),
                                   row("cser-256-paper", 0.116), row("dense", 2.0)]},
           "none": {"methods": [row(st.FLOOR, 0.1), row("dense", 0.16), row("cser-32", 0.13),
                                row("qprsgd", 0.2), row("fp16", 0.16)]}}
    rows = {(r["link"], r["method"]): r for r in st.analyse(res)}
    assert rows["100mbit", "cser-32"]["vs_floor"] == pytest.approx(1.39) and rows["100mbit", "cser-32"]["pass"]
    assert rows["100mbit", "cser-256-paper"]["vs_floor"] == pytest.approx(1.16)
    assert rows["100mbit", "cser-256-paper"]["pass"] is False                  # 1.16 > 1.15
    assert rows["100mbit", "dense"]["pass"] is None                            # no bar for dense
    assert rows["100mbit", st.SYNC_FLOOR]["vs_dense"] is None
    assert rows["none", "cser-32"]["vs_dense"] == pytest.approx(0.13 / 0.16) and rows["none", "cser-32"]["pass"]
    assert rows["none", "qprsgd"]["pass"] is False and rows["none", "fp16"]["pass"]   # 1.0x dense is within
    assert rows["none", "dense"]["pass"] is None


def test_from_results_report(tmp_path):
    (tmp_path / "bench-none").mkdir()
    (tmp_path / "bench-none" / "results.json").write_text(json.dumps(
        {"methods": [row(st.FLOOR, 0.1), row("dense", 0.2), row("qprsgd", 0.3)]}))
    out = tmp_path / "out"
    assert st.main(["--from-results", str(tmp_path), "--links", "none", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| qprsgd | 32 | 300.0 | 3.00x | 1.50x | <= 1.0x dense | **no** |" in text
    assert f"| {st.FLOOR} | 32 | 100.0 | 1.00x | n/a |  |  |" in text


def test_the_window_holds_whole_periods_of_every_method():
    # a mean over part of a period leaves out (or doubles) its reset: every periodic method's period divides
    # the window, and the window holds at least two of them
    from cser_hooks.bench import methods

    window = st.STEPS - st.W0
    for link, names in st.METHODS.items():
        for name in names:
            h = methods.get(name).period
            assert h == 0 or (window % h == 0 and window >= 2 * h), (link, name, h)
