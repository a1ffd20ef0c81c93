"""Result hand-off of the scripts run by tests/hvd_harness.run_horovod: one file per rank."""
from __future__ import annotations

import os
from pathlib import Path

RESULT_DIR_ENV = "CSER_HVD_RESULT_DIR"


def save_result(rank: int, result: dict) -> Path:
    """``torch.save`` ``result`` (a dict; tensors fine) to ``$CSER_HVD_RESULT_DIR/rank<rank>.pt``."""
    import torch

    out_dir = os.environ.get(RESULT_DIR_ENV)
    if not out_dir:
        raise RuntimeError(f"{RESULT_DIR_ENV} is not set: run this script through "
                           "tests/hvd_harness.run_horovod")
    if not isinstance(result, dict):
        raise TypeError(f"save_result expects a dict, got {type(result).__name__}")
    path = Path(out_dir) / f"rank{rank}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(path)  # a half-written file never looks like a result
    return path
