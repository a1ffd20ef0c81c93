"""The benchmark CLI (cser_hooks.bench): a real --quick run on 4 gloo workers, and its pieces.

The byte counts are checked against sizes derived here by hand from the model's layer shapes
(independent of the bench's meters), and PowerSGD's against torch's own PowerSGD counters.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cser_hooks.bench import cli, methods, report

REPO = Path(__file__).resolve().parents[1]

# The default 1-D CNN on MNIST-1D (length 40, 10 classes), layer by layer: (shape of weight, bias).
CNN_LAYERS = [((32, 1, 5), 32), ((32, 32, 3), 32), ((32, 32, 3), 32), ((10, 320), 10)]


def cnn_params() -> int:
    return sum(math.prod(w) + b for w, b in CNN_LAYERS)


def powersgd_elements(rank: int, min_rate: float = 2) -> int:
    """Elements powerSGD_hook allreduces per step, from its documented rule, for CNN_LAYERS."""
    total = 0
    for w, b in CNN_LAYERS:
        n, m = w[0], math.prod(w[1:])
        r = min(n, m, rank)
        total += (n + m) * r if (n + m) * r * min_rate < n * m else n * m
        total += b  # biases (n x 1) never pass the rule
    return total


def run_bench(*args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cser_hooks.bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run_dense_fp16_powersgd(tmp_path):
    out = tmp_path / "report"
    proc = run_bench("--quick", "--methods", "dense,fp16,powersgd", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--quick self-check passed" in proc.stderr
    for name in ("dense", "fp16", "powersgd"):
        assert f"| {name} |" in proc.stdout
    assert report.validate(out, ["dense", "fp16", "powersgd"]) == []

    data = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in data["methods"]}
    assert set(rows) == {"dense", "fp16", "powersgd"}
    assert all(r["status"] == "ok" for r in rows.values())
    n = cnn_params()
    assert data["meta"]["params"] == n == 9610
    # bytes per worker per step in the steady-state window, against hand-derived payloads
    assert rows["dense"]["bytes_per_step"] == 4 * n
    assert rows["fp16"]["bytes_per_step"] == 2 * n
    assert rows["powersgd"]["bytes_per_step"] == 4 * powersgd_elements(1)
    # learning happened, and fp16 communication tracks fp32 closely
    assert rows["dense"]["acc_final"] > 0.3
    assert abs(rows["fp16"]["acc_final"] - rows["dense"]["acc_final"]) < 0.05
    for r in rows.values():
        steps = [p["step"] for p in r["curve"]]
        times = [p["time"] for p in r["curve"]]
        assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == r["steps"] == 150
        assert times == sorted(times) and r["train_time"] >= times[-1] > 0
        assert r["time_to_target"] is None or r["time_to_target"] <= r["train_time"]
    assert rows["dense"]["comm_share"] is None  # DDP's C++ allreduce is not timed
    assert 0 < rows["fp16"]["comm_share"] and 0 < rows["powersgd"]["compress_share"] < 1
    for png in report.PLOTS:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def _fake_rank(rank: int, steps: int = 10, acc: float = 0.5) -> dict:
    curve = [{"step": s, "time": 0.1 * s, "acc": acc * s / steps, "loss": None}
             for s in range(0, steps + 1, 5)]
    stats = {"bytes_sent_total": 400 * steps, "dense_bytes_last_step": 800, "compress_seconds": 0.01,
             "comm_seconds": 0.2, "step": steps}
    return {"rank": rank, "steps": steps, "train_time": 1.0, "curve": curve, "acc_final": acc, "acc_avg": acc,
            "stats_window_start": dict(stats, bytes_sent_total=800), "stats_end": stats, "window_start": 2,
            "veth_tx_window": None, "params": 200, "protocol": "allreduce"}


def test_summary_and_self_check_catch_malformed_output(tmp_path):
    rows = [report.summarize(m, "desc", [_fake_rank(0), _fake_rank(1)], 0.3, 2) for m in ("a", "b")]
    assert rows[0]["bytes_per_step"] == (4000 - 800) / 8
    assert rows[0]["steps_to_target"] == 10 and rows[0]["time_to_target"] == 1.0
    meta = {"started": "now", "command": "x", "data": "d",
            "data_info": {"train": 1, "test": 1, "input_shape": [4]}, "model": "m", "params": 200,
            "world": 2, "steps": 10, "batch": 1, "lr": 0.1, "momentum": 0.9,
            "weight_decay": 0, "seed": 0, "network": "lo", "target": 0.3}
    (tmp_path / "report.md").write_text(report.markdown(rows, meta))
    report.plots(rows, tmp_path)
    assert report.validate(tmp_path, ["a", "b"]) == []

    assert any("no row" in p for p in report.validate(tmp_path, ["a", "b", "c"]))
    text = (tmp_path / "report.md").read_text()
    (tmp_path / "report.md").write_text(text.replace("| b | 50.0 |", "| b | nan |"))
    assert any("'final acc %' is 'nan'" in p for p in report.validate(tmp_path, ["a", "b"]))
    broken = [rows[0], report.failed("b", "d", "boom", False)]
    (tmp_path / "report.md").write_text(report.markdown(broken, meta))
    assert any("did not run: failed: boom" in p for p in report.validate(tmp_path, ["a", "b"]))
    (tmp_path / "acc_vs_time.png").write_bytes(b"not a png" * 200)
    assert any("not a PNG" in p for p in report.validate(tmp_path, ["a"]))


def test_time_to_target_comparisons():
    rows = [{"method": "dense", "status": "ok", "time_to_target": 200.0},
            {"method": "powersgd", "status": "ok", "time_to_target": 50.0},
            {"method": "cser-32", "status": "ok", "time_to_target": 40.0},
            {"method": "slow", "status": "ok", "time_to_target": 80.0},
            {"method": "never", "status": "ok", "time_to_target": None},
            report.failed("broken", "d", "boom", False)]
    lines = report.speedups(rows)
    assert lines == ["- `powersgd`: 4.00x shorter than dense",
                     "- `cser-32`: 5.00x shorter than dense; 1.25x shorter than powersgd",
                     "- `slow`: 2.50x shorter than dense; behind powersgd by 1.60x (30.0 s)",
                     "- `never`: target not reached (dense reached it in 200.0 s); target not reached "
                     "(powersgd reached it in 50.0 s)"]
    assert report.speedups([r for r in rows if r["method"] != "dense"])[0].startswith("- `cser-32`: 1.25x")


def test_method_registry():
    for name, m in methods.PRESETS.items():
        assert m.name == name and callable(m.make) and m.summary
    assert set(methods.DEFAULT) <= set(methods.PRESETS)
    c = methods.get("cser@1/32:1/4:8")
    assert c.protocol == "allreduce" and "H=8" in c.summary
    assert "(~1/16 of dense)" in c.summary  # 1/32 + (1/4)/8
    assert methods.get("cser@1/64:1/4:16").summary.endswith("(~1/32 of dense)")
    assert methods.get("ef-topk@1/100").protocol == "allgather"
    assert methods.get("powersgd@2").bucket_cap_mb >= 1024
    with pytest.raises(SystemExit, match="unknown method 'nope'.*Presets: dense"):
        methods.get("nope")
    with pytest.raises(SystemExit, match="twice"):
        methods.parse_list("dense,dense")
    assert not hasattr(methods, "wire_factor")  # one wire model: cser_hooks/wire.py, reported by every state


def test_cli_rejects_bad_input_before_launching(tmp_path):
    bad = tmp_path / "bad.npz"
    import numpy as np

    np.savez(bad, x_train=np.zeros((4, 3)), y_train=np.zeros(4, dtype=int))
    with pytest.raises(SystemExit, match="lacks x_test, y_test"):
        cli.main(["--data", str(bad), "--methods", "dense", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="--delay needs --link"):
        cli.main(["--delay", "1ms"])
    with pytest.raises(SystemExit, match="--stop-at-target needs --target"):
        cli.main(["--data", str(bad), "--stop-at-target"])
    with pytest.raises(SystemExit, match="give a rate like 100mbit"):
        cli.main(["--link", "100mb", "--methods", "dense", "--out", str(tmp_path / "o2")])


POWERSGD_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from cser_hooks.bench import methods, models
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
    torch.manual_seed(0)
    model = models.build("cnn", [40], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    m = methods.get("powersgd-r4")
    ddp = DDP(model, bucket_cap_mb=m.bucket_cap_mb)
    meter, hook = methods.get("powersgd-r4").make(None, opt)
    ddp.register_comm_hook(meter, hook)
    per_step = []
    for step in range(6):
        ddp(torch.randn(8, 40)).sum().backward()
        opt.step(); opt.zero_grad()
        per_step.append(meter.stats()["bytes_sent_last_step"])
    ps = meter.inner_state
    print(json.dumps({"per_step": per_step, "after": ps.total_numel_after_compression,
                      "before": ps.total_numel_before_compression, "buckets": meter.buckets}), flush=True)
    dist.destroy_process_group()
    os._exit(0)  # skip C++ static teardown: gloo's threads once aborted it under load ("terminate called ...")
""")


@pytest.mark.timeout(120)
def test_powersgd_bytes_match_torch_counters():
    from cser_hooks.bench.launch import free_port

    proc = subprocess.run([sys.executable, "-c", POWERSGD_SCRIPT % free_port()], cwd=REPO,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["buckets"] == 1
    # steps 0-1 are plain allreduce (start_powerSGD_iter=2), then torch counts its own compressed sizes
    assert got["per_step"][:2] == [4 * cnn_params()] * 2
    assert sum(got["per_step"][2:]) == 4 * got["after"]
    assert got["per_step"][2:] == [4 * powersgd_elements(4)] * 4
