"""What the measuring scripts (scripts/plan_validate.py, time_to_quality.py, step_times.py) write beside
their report: the machine it ran on, the committed discussion it ends with, and the JSON it can be
re-analysed from (``--from-results``)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> str:
    """CPU model, core count, OS and the Python / torch versions of this process."""
    cpu = "?"
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "?")
    except OSError:
        pass
    import torch

    return (f"{platform.machine()}, {cpu}, {os.cpu_count()} logical cores, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}")


def discussion(src: Path) -> list[str]:
    """The lines of ``src/discussion.md`` (written by hand after a run; the report ends with it), or []."""
    p = Path(src) / "discussion.md"
    return p.read_text().splitlines() if p.exists() else []


def load_meta(src: Path, name: str) -> dict:
    """The ``meta`` of an earlier ``write(..., name)`` in ``src``, or {}."""
    p = Path(src) / name
    return json.loads(p.read_text())["meta"] if p.exists() else {}


def write(out: Path, report: str, name: str, meta: dict, **payload) -> None:
    """``out/report.md`` and ``out/<name>``: {"meta": meta without its discussion, **payload}."""
    out = Path(out)
    (out / "report.md").write_text(report)
    body = {"meta": {k: v for k, v in meta.items() if k != "discussion"}, **payload}
    (out / name).write_text(json.dumps(body, indent=1))
