"""scripts/time_to_quality.py: the estimate S x T, its bounds and speedups, on constructed bench results."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("time_to_quality", REPO / "scripts" / "time_to_quality.py")
ttq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttq)


def row(method, step_s=None, steps=100, reach=None, final=2.9, first_step_s=None):
    """A bench results.json method row: a curve every 4 steps at step_s per step (the first 4 steps at
    first_step_s), reaching the target (2.87 in results()) at step `reach` (None: never)."""
    step_s = step_s or 1.0
    first = first_step_s or step_s
    curve = [{"step": s, "time": first * min(s, 4) + step_s * max(0, s - 4),
              "val_loss": 2.8 if reach is not None and s >= reach else 3.0} for s in range(0, steps + 1, 4)]
    hit = next((p for p in curve if reach is not None and p["step"] >= reach), None)
    return {"method": method, "status": "ok", "steps": steps, "metric": "val_loss", "val_loss_final": final,
            "curve": curve, "steps_to_target": hit["step"] if hit else None,
            "time_to_target": hit["time"] if hit else None, "wire_ratio": 1.0}


def results(*rows, target=2.87):
    return {"meta": {"command": "bench", "target": target, "metric": "val_loss"}, "methods": list(rows)}


def test_period_and_link_steps_cover_two_reset_periods():
    assert ttq.period_of("cser-32") == 16 and ttq.period_of("m-cser") == 16
    assert ttq.period_of("cser@1/32:1/2:8") == 8 and ttq.period_of("cser-spread@1/8:1/4:40") == 40
    assert ttq.period_of("cser-256-paper") == 32 and ttq.period_of("dense") == 0
    assert ttq.period_of("cser-256") == 512 and ttq.period_of("cser-1024") == 256   # H of the preset, not its name
    assert ttq.period_of("powersgd-r4") == 0 and ttq.period_of("qprsgd@6") == 6 and ttq.period_of("local-sgd") == 16
    assert ttq.period_of("qsparse@1/8:12") == 12 and ttq.period_of("compskip@1/32:3") == 3
    with pytest.raises(SystemExit, match="local-sgd@100000 has a period of 100000"):
        ttq.link_steps(["dense", "local-sgd@100000"], None)
    assert ttq.link_steps(["dense"], None) == ttq.MIN_LINK_STEPS
    assert ttq.link_steps(["dense", "cser-spread@1/8:1/4:40"], None) == 84   # 4 + 2 x 40
    assert ttq.link_steps(["dense", "cser@1/8:1/4:41"], None) == 88          # 86 rounded up to a multiple of 4
    assert ttq.link_steps(["dense"], 50) == 52


def test_step_time_excludes_the_first_steps():
    r = row("dense", step_s=2.0, steps=36, first_step_s=9.0)
    assert ttq.step_time(r) == pytest.approx(2.0)
    assert ttq.step_time({"curve": [{"step": 0, "time": 0.0}]}) is None


def test_estimate_speedups_and_bounds():
    conv = results(row("dense", reach=80), row("powersgd-r1", reach=None), row("powersgd-r4", reach=100),
                   row("cser-32", reach=60))
    link = results(row("dense", 6.0, 36), row("powersgd-r1", 1.0, 36), row("powersgd-r4", 1.5, 36),
                   row("cser-32", 1.2, 36))
    rows = {r["method"]: r for r in ttq.analyse(conv, {"100mbit": link})}
    assert rows["dense"]["ttq_s"] == pytest.approx(80 * 6.0) and not rows["dense"]["bound"]
    assert rows["cser-32"]["ttq_s"] == pytest.approx(60 * 1.2)
    assert rows["cser-32"]["vs_dense"] == pytest.approx(480 / 72) and rows["cser-32"]["vs_dense_kind"] == "="
    # r1 never reached the target: a lower bound 100 x 1.0; r4 reached it: the best PowerSGD is r4, exact
    assert rows["powersgd-r1"]["bound"] and rows["powersgd-r1"]["ttq_s"] == pytest.approx(100.0)
    assert rows["cser-32"]["vs_powersgd"] == pytest.approx(150 / 72)
    assert rows["cser-32"]["vs_powersgd_kind"] == "="
    # dense / a bound is an upper bound on the speedup
    assert rows["powersgd-r1"]["vs_dense"] == pytest.approx(4.8) and rows["powersgd-r1"]["vs_dense_kind"] == "<"
    assert rows["powersgd-r1"]["vs_powersgd"] is None    # PowerSGD rows are not compared with themselves


def test_validate_flags_an_estimate_off_by_more_than_15_percent():
    conv = results(row("dense", reach=40), row("cser-32", reach=20))
    link = results(row("dense", 2.0, 36), row("cser-32", 1.0, 36))
    full = results(row("dense", 2.0, 100, reach=40), row("cser-32", 1.3, 100, reach=20))
    checks = {c["method"]: c for c in ttq.validate(conv, {"100mbit": link}, {"100mbit": full})}
    assert checks["dense"]["within"] and checks["dense"]["error"] == pytest.approx(0.0)
    assert not checks["cser-32"]["within"]
    assert checks["cser-32"]["error"] == pytest.approx(20 / 26 - 1)


def test_from_results_writes_the_report(tmp_path):
    for sub, res in {"converge": results(row("dense", reach=80), row("cser-32", reach=None)),
                     "link-100mbit": results(row("dense", 6.0, 36), row("cser-32", 1.0, 36))}.items():
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "results.json").write_text(json.dumps(res))
    (tmp_path / "discussion.md").write_text("## Why\nbecause")
    out = tmp_path / "out"
    assert ttq.main(["--from-results", str(tmp_path), "--links", "100mbit", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| cser-32 | 1.0 | 2.900 | not in 100 | 1.000 | >100 | < 4.80x | n/a |" in text
    assert "| dense | 1.0 | 2.900 | 80 | 6.000 | 480 | 1.00x | n/a |" in text
    assert text.rstrip().endswith("because")
    with pytest.raises(SystemExit, match="must include dense"):
        ttq.main(["--from-results", str(tmp_path), "--methods", "cser-32", "--out", str(out)])


def test_a_longer_schedule_adds_rows_scored_against_dense_at_its_best(tmp_path):
    """converge-<N>steps*/ runs (merged per N) add "(N-step schedule)" rows that take their method's step
    time; dense's best schedule is the baseline; a run scored against another target is refused."""
    conv = results(row("dense", reach=80), row("powersgd-r4", reach=None), row("cser-32", reach=None))
    link = results(row("dense", 6.0, 36), row("powersgd-r4", 1.5, 36), row("cser-32", 1.2, 36))
    longer = {200: {"meta": conv["meta"], "methods": [row("cser-32", steps=200, reach=120),
                                                      row("dense", steps=200, reach=60),
                                                      row("powersgd-r4", steps=200, reach=100)]}}
    rows = {r["method"]: r for r in ttq.analyse(conv, {"100mbit": link}, longer)}
    long_cser = rows["cser-32 (200-step schedule)"]
    assert long_cser["ttq_s"] == pytest.approx(120 * 1.2) and long_cser["schedule"] == 200
    # dense's best is its 200-step run (60 x 6.0 = 360 s), for every row, itself included
    assert long_cser["vs_dense"] == pytest.approx(360 / 144) and long_cser["vs_dense_kind"] == "="
    assert rows["dense"]["vs_dense"] == pytest.approx(360 / 480)
    assert long_cser["vs_powersgd"] == pytest.approx(150 / 144)   # PowerSGD's best: 100 x 1.5
    assert rows["cser-32"]["bound"] and rows["cser-32"]["vs_dense_kind"] == "<"
    for sub, res in {"converge": conv, "link-100mbit": link, "converge-200steps": longer[200],
                     "converge-200steps-more": results(row("m-cser", steps=200, reach=None))}.items():
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "results.json").write_text(json.dumps(res))
    assert set(ttq.load_schedules(tmp_path)) == {200}
    assert len(ttq.load_schedules(tmp_path)[200]["methods"]) == 4
    out = tmp_path / "out"
    assert ttq.main(["--from-results", str(tmp_path), "--links", "100mbit", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| cser-32 (200-step schedule) | 1.0 | 2.900 | 120 | 1.200 | 144 | 2.50x | 1.04x |" in text
    assert "*(N-step schedule)*" in text
    # a run with another target is rescored from its curve against the main run's target (2.87)
    curve = [{"step": s, "time": float(s), "val_loss": 3.0 - s / 100} for s in range(0, 201, 10)]
    other = {200: {"meta": {**conv["meta"], "target": 2.5},
                   "methods": [{**row("cser-32", steps=200, reach=None), "curve": curve}]}}
    rescored = {r["method"]: r for r in ttq.analyse(conv, {"100mbit": link}, other)}
    assert rescored["cser-32 (200-step schedule)"]["steps_to_target"] == 20     # 3.0 - 0.20 <= 2.87


def test_reuse_converge_runs_only_the_link_runs(tmp_path, monkeypatch):
    (tmp_path / "converge").mkdir()
    (tmp_path / "converge" / "results.json").write_text(json.dumps(results(row("dense", reach=8, steps=8))))
    calls = []

    def fake_bench(args_list, out, timeout):   # records the bench command lines instead of training
        calls.append((out.name, args_list))
        out.mkdir(exist_ok=True)
        (out / "results.json").write_text(json.dumps(results(row("dense", 2.0, 36))))

    monkeypatch.setattr(ttq, "run_bench", fake_bench)
    assert ttq.main(["--methods", "dense", "--links", "100mbit,1gbit", "--out", str(tmp_path),
                     "--reuse-converge"]) == 0
    assert [c[0] for c in calls] == ["link-100mbit", "link-1gbit"]
    assert calls[0][1][-2:] == ["--link", "100mbit"] and "--steps" in calls[0][1]
    calls.clear()
    assert ttq.main(["--methods", "dense", "--links", "100mbit", "--out", str(tmp_path)]) == 0
    assert [c[0] for c in calls] == ["converge", "link-100mbit"]   # without the flag: the run again
    calls.clear()
    assert ttq.main(["--methods", "dense", "--links", "100mbit", "--out", str(tmp_path), "--reuse-converge",
                     "--longer-schedule", "16", "--longer-methods", "cser-32", "--", "--batch", "4"]) == 0
    assert [c[0] for c in calls] == ["converge-16steps", "link-100mbit"]
    longer = calls[0][1]
    assert longer[longer.index("--methods") + 1] == "cser-32" and longer[longer.index("--steps") + 1] == "16"
    assert longer[longer.index("--target") + 1] == "2.87" and "--batch" in longer
