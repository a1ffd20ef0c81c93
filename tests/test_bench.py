"""The benchmark CLI (cser_hooks.bench): a real --quick run on 4 gloo workers, and its pieces.

The byte counts are checked against sizes derived here by hand from the model's layer shapes
(independent of the bench's meters), and PowerSGD's against torch's own PowerSGD counters.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cser_hooks.bench import cli, methods, metrics, plots, report

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
    plots.plots(rows, tmp_path)
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


# -- --model gpt: a byte-level transformer on the stdlib's sources -----------------------------------

TINY_GPT = ("--model", "gpt", "--gpt-layers", "2", "--gpt-dim", "64", "--gpt-heads", "2", "--context", "32")


def _unigram_entropy_nats(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p = counts[counts > 0] / len(data)
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_gpt_two_workers_learn_below_unigram_entropy_and_report_the_corpus(tmp_path):
    from cser_hooks.bench import data

    out = tmp_path / "report"
    proc = run_bench(*TINY_GPT, "--workers", "2", "--steps", "300", "--batch", "16", "--eval-windows", "32",
                     "--methods", "dense,cser-32", "--out", str(out), timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.validate(out, ["dense", "cser-32"], metrics.VAL_LOSS) == []

    # the corpus, re-derived here: the stdlib's files by the stated rule, concatenated, hashed, split 95/5
    root, files = data.stdlib_files()
    assert str(root) == sysconfig.get_paths()["stdlib"] and len(files) > 100
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and not any(
        set(r.split("/")[:-1]) & {"site-packages", "test", "tests", "idlelib"} for r in rel)
    blob = b"".join(p.read_bytes() for p in files)
    train = blob[:len(blob) - round(0.05 * len(blob))]
    res = json.loads((out / "results.json").read_text())
    info = res["meta"]["data_info"]
    assert (info["file_count"], info["bytes"], info["sha256"]) == (len(files), len(blob),
                                                                    hashlib.sha256(blob).hexdigest())
    assert info["train"] == len(train) and (out / "corpus_files.txt").read_text().split() == rel
    text = (out / "report.md").read_text()
    for needle in (f"{len(files):,} files", f"{len(blob):,} bytes", info["sha256"], "untied output head"):
        assert needle in text

    # it learned: below the unigram entropy of the training bytes (a context-free model's best), from ln 256
    bound = _unigram_entropy_nats(train)
    rows = {r["method"]: r for r in res["methods"]}
    for name in ("dense", "cser-32"):
        r = rows[name]
        assert r["status"] == "ok"
        assert abs(r["curve"][0]["val_loss"] - math.log(256)) < 0.3
        assert r["val_loss_final"] < bound, (name, r["val_loss_final"], bound)
        assert r["val_loss_best"] == min(p["val_loss"] for p in r["curve"])
        assert r["bpb_final"] == pytest.approx(r["val_loss_final"] / math.log(2))
    # the target: dense's final validation loss + 0.05 nats, reached by dense itself
    assert res["meta"]["target"] == pytest.approx(rows["dense"]["val_loss_final"] + 0.05)
    assert rows["dense"]["steps_to_target"] is not None
    assert "dense's final validation loss" in text and "Target validation loss" in text
    assert rows["dense"]["bytes_per_step"] == 4 * rows["dense"]["params"]


GPT_BUCKETS_SCRIPT = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from cser_hooks.bench import models, tasks, worker
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d", rank=0, world_size=1)
    torch.set_num_threads(1)
    model = models.build("gpt", [], 0)
    ddp = DDP(model, bucket_cap_mb=25)
    x = torch.randint(0, 256, (1, 9))
    for _ in range(3):
        tasks.loss_fn(ddp(x[:, :-1]), x[:, 1:]).backward()
    print(json.dumps({"params": models.count_parameters(model), "buckets": worker.bucket_count(ddp),
                      "tensors": len(list(model.parameters())),
                      "shapes": len({tuple(p.shape) for p in model.parameters()})}), flush=True)
    dist.destroy_process_group()
    os._exit(0)
""")


@pytest.mark.timeout(120)
def test_default_gpt_has_10m_parameters_in_several_ddp_buckets():
    from cser_hooks.bench.launch import free_port

    proc = subprocess.run([sys.executable, "-c", GPT_BUCKETS_SCRIPT % free_port()], cwd=REPO,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    d, L = 384, 6  # 6 blocks: 2 LayerNorms, qkv, proj, 4x MLP (weights + biases); embeddings, final LN, head
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    assert got["params"] == L * block + 256 * d + 128 * d + 2 * d + 256 * d == 10_893_312
    assert got["tensors"] == 12 * L + 5 and got["shapes"] >= 8
    assert got["buckets"] == 2  # 43.6 MB of gradients under the 25 MB cap


def test_gpt_is_causal_and_windows_are_seeded_by_seed_rank_step(tmp_path):
    import torch

    from cser_hooks.bench import data, models, tasks

    torch.manual_seed(0)
    model = models.build("gpt", [], 0, layers=2, dim=32, heads=2, context=16)
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256  # a different future must not change the logits of the past
    with torch.no_grad():
        assert torch.equal(model(x)[:, :10], model(y)[:, :10])
        assert not torch.equal(model(x)[:, 10:], model(y)[:, 10:])

    corpus = np.arange(5000, dtype=np.int64).astype(np.uint8)
    path = tmp_path / "corpus.npz"
    np.savez(path, **data.split_corpus(corpus))
    task = tasks.LanguageModeling({"data": str(path), "gpt": {"context": 16}, "eval_windows": 8})

    def first(seed, rank, n=3):
        it = task.batches(rank, 2, 4, seed)
        return [next(it) for _ in range(n)]

    a, b, c = first(0, 0), first(0, 0), first(0, 1)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # reproducible
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], a[1][0])  # per rank, per step
    xa, ya = a[0]
    assert xa.shape == ya.shape == (4, 16) and xa.dtype == torch.int64
    assert torch.equal(ya[:, :-1], xa[:, 1:])  # targets: the next bytes
    assert torch.equal((xa[:, 1:] - xa[:, :-1]) % 256, torch.ones(4, 15, dtype=torch.int64))  # contiguous
    assert task.eval_starts.tolist() == sorted(task.eval_starts.tolist()) and len(task.eval_starts) == 8
    assert task.eval_starts.max() + 17 <= len(task.val)


def test_text_corpus_from_a_directory_is_sorted_split_and_cached(tmp_path, monkeypatch):
    from cser_hooks.bench import data

    monkeypatch.setenv("CSER_HOOKS_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / ".hidden").mkdir()
    (src / "b.txt").write_bytes(b"b" * 300)
    (src / "pkg" / "a.py").write_bytes(b"a" * 700)
    (src / "pkg" / "__pycache__" / "x.py").write_bytes(b"x")
    (src / ".hidden" / "y.txt").write_bytes(b"y")
    (src / "notes.md").write_bytes(b"m")
    arrays, info = data.text_corpus(str(src))
    assert info["files"] == ["b.txt", "pkg/a.py"] and info["bytes"] == 1000
    assert info["sha256"] == hashlib.sha256(b"b" * 300 + b"a" * 700).hexdigest()
    assert len(arrays["train"]) == 950 and len(arrays["val"]) == 50 and bytes(arrays["val"]) == b"a" * 50
    assert info["unigram_entropy_bits"] == pytest.approx(-(0.3 / 0.95) * math.log2(0.3 / 0.95)
                                                         - (0.65 / 0.95) * math.log2(0.65 / 0.95))
    cached = list((tmp_path / "cache").glob(f"corpus-{info['sha256'][:16]}-*.npz"))
    assert len(cached) == 1
    again, _ = data.text_corpus(str(src))
    assert all(np.array_equal(arrays[k], again[k]) for k in ("train", "val"))
    with pytest.raises(SystemExit, match="not 'stdlib', a text file"):
        data.text_corpus(str(tmp_path / "missing"))


def test_metric_direction_for_validation_loss(tmp_path):
    def rank(r):
        losses = [5.5, 4.0, 3.0, 3.1]
        curve = [{"step": 5 * i, "time": 0.5 * i, "val_loss": v, "loss": None} for i, v in enumerate(losses)]
        stats = {"bytes_sent_total": 400 * 15, "dense_bytes_last_step": 800, "compress_seconds": 0.01,
                 "comm_seconds": 0.2, "step": 15}
        return {"rank": r, "steps": 15, "train_time": 2.0, "curve": curve, "metric": "val_loss",
                "val_loss_final": 3.1, "val_loss_avg": 3.05, "stats_window_start": dict(stats, bytes_sent_total=800),
                "stats_end": stats, "window_start": 2, "veth_tx_window": None, "params": 200,
                "protocol": "allreduce", "ddp_buckets": 2}

    target = report.loss_target({"dense": [rank(0)]}, 0.05)
    assert target == pytest.approx(3.15)
    row = report.summarize("dense", "desc", [rank(0), rank(1)], target, 2, metrics.VAL_LOSS)
    assert row["steps_to_target"] == 10 and row["time_to_target"] == 1.0  # the first value <= 3.15
    assert (row["val_loss_best"], row["val_loss_final"]) == (3.0, 3.1)
    assert row["bpb_best"] == pytest.approx(3.0 / math.log(2))
    assert report.summarize("x", "d", [rank(0)], 2.9, 1, metrics.VAL_LOSS)["steps_to_target"] is None
    assert metrics.ACCURACY.reached(0.9, 0.9) and not metrics.ACCURACY.reached(0.89, 0.9)
    assert metrics.VAL_LOSS.reached(3.0, 3.0) and not metrics.VAL_LOSS.reached(3.01, 3.0)
    meta = {"started": "now", "command": "x", "data": "stdlib", "model": "gpt", "params": 200, "world": 2,
            "data_info": {"kind": "text", "file_count": 3, "root": "/r", "rule": "rule", "bytes": 1000,
                          "sha256": "ab" * 32, "train": 950, "test": 50},
            "steps": 15, "batch": 8, "lr": 0.5, "momentum": 0.9, "weight_decay": 0, "seed": 0, "network": "lo",
            "target": target, "metric": "val_loss", "target_rule": "dense's final validation loss 3.100 + 0.05",
            "clip_grad": 1.0, "warmup": 0.1}
    (tmp_path / "report.md").write_text(report.markdown([row], meta))
    plots.plots([row], tmp_path, target, metrics.VAL_LOSS)
    assert report.validate(tmp_path, ["dense"], metrics.VAL_LOSS) == []
    assert report.validate(tmp_path, ["dense"])[0].startswith(f"{tmp_path / 'report.md'}: no results table")
    text = (tmp_path / "report.md").read_text()
    assert "| dense | 3.100 | 4.472 | 3.000 | 3.050 | 10 | 1.0 |" in text
    assert "Target validation loss: 3.150 nats (4.544 bpb) = dense's final" in text
    assert "gradient norm clipped at 1" in text and "DDP buckets per step" in text and "dense 2" in text


def test_cli_rejects_bad_gpt_input_before_launching(tmp_path):
    with pytest.raises(SystemExit, match="--stop-at-target needs --target.*only known after the run"):
        cli.main([*TINY_GPT, "--stop-at-target", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="give a validation loss in nats"):
        cli.main([*TINY_GPT, "--target", "-1", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not 'stdlib', a text file"):
        cli.main([*TINY_GPT, "--data", str(tmp_path / "nope"), "--methods", "dense", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="must exceed --context"):
        (tmp_path / "t.txt").write_text("x" * 100)
        cli.main([*TINY_GPT, "--data", str(tmp_path / "t.txt"), "--methods", "dense", "--out", str(tmp_path / "o")])
    assert cli.resolve(cli.build_parser().parse_args([]))["data"] == "mnist1d"  # the default job is unchanged
    plan = cli.resolve(cli.build_parser().parse_args(["--model", "gpt"]))
    assert (plan["data"], plan["target"], plan["clip_grad"], plan["warmup"]) == ("stdlib", None, 0.25, 0.1)


def test_parametric_cser_spread_builds_the_spread_schedule():
    from cser_hooks.plan.by_method import describe

    kind, kw = describe(methods.get("cser-spread@1/8:1/4:4"), 32)
    assert kind == "CSERState" and kw["reset_schedule"] == "spread" and kw["period"] == 4
    kind, kw = describe(methods.get("cser@1/8:1/4:4"), 32)
    assert "reset_schedule" not in kw
    assert "spread" in methods.get("m-cser-spread@1/8:1/4:4").summary
