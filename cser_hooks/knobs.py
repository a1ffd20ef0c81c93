"""Validation of knobs and checkpoints shared by every state (a bad value gets an error naming the fix).

``int(2.5)`` is 2: a ``period=2.5`` used to reset every 2 steps without a word. Integer knobs take
ints (or integral floats such as ``4.0``, and NumPy integers); anything else is a ``ValueError``
that names the state, the knob, the value and the valid range.
"""
from __future__ import annotations

import numbers

import torch

from .compressors.base import is_real
from .nonfinite import POLICIES


def momentum_knobs(who: str, momentum, nesterov, nesterov_fix: str, label: str = "momentum") -> tuple[float, bool]:
    """(β, nesterov) of a state's own momentum: β in [0, 1), nesterov a bool that needs β > 0."""
    if not (is_real(momentum) and 0.0 <= momentum < 1.0):
        raise ValueError(f"{who}: {label} must be in [0, 1), got {momentum!r}")
    if nesterov not in (True, False):  # bool("no") is True
        raise ValueError(f"{who}: nesterov must be True or False, got {nesterov!r}")
    if nesterov and float(momentum) == 0.0:
        raise ValueError(f"{who}: nesterov=True needs momentum > 0; {nesterov_fix}")
    return float(momentum), bool(nesterov)


def integer_knob(who: str, name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int, or a ValueError naming ``who``'s knob ``name`` and its valid range."""
    valid = f"an integer >= {minimum}" if minimum is not None else "an integer"
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{who}: {name} must be {valid}, got {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{who}: {name} must be {valid}, got {value!r}")
    return v


def resolve_policy(on_nonfinite, check_finite):
    """``"auto"`` → ``"skip"`` when the finite checks are on (the flags decide the skip), else ``"raise"``;
    any other value unchanged (checked by :func:`check_common_knobs`)."""
    if on_nonfinite == "auto":
        return "skip" if check_finite is True else "raise"
    return on_nonfinite


def check_common_knobs(who: str, check_finite, on_nonfinite, optimizer, named_parameters):
    """The base state's flags, policy (already resolved), optimizer and named_parameters; returns
    named_parameters as a list."""
    if check_finite not in (True, False):  # bool("no") is True
        raise ValueError(f"{who}: check_finite must be True or False, got {check_finite!r}")
    if on_nonfinite not in POLICIES:
        raise ValueError(f"{who}: on_nonfinite must be 'raise', 'skip' (fp16 autocast with a GradScaler) or "
                         f"'auto' (skip when check_finite=True), got {on_nonfinite!r}")
    if on_nonfinite == "skip" and not check_finite:
        raise ValueError(f"{who}: on_nonfinite='skip' needs check_finite=True (the flags decide the skip)")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{who}: optimizer must be a torch.optim.Optimizer (the one whose step() follows the "
                        f"backward) or None, got {type(optimizer).__name__}")
    if named_parameters is None:
        return None
    named_parameters = list(named_parameters)
    if not all(isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
               and isinstance(item[1], torch.Tensor) for item in named_parameters):
        raise ValueError(f"{who}: named_parameters must be model.named_parameters() ((name, parameter) "
                         f"pairs), not model.parameters()")
    return named_parameters


WORLD_SIZE_POLICIES = ("raise", "reset")
_LOAD_ONLY = ("world_size", "on_world_size_change")  # settings a checkpoint may differ in (see below)


def check_world_size_policy(who: str, policy) -> None:
    if policy not in WORLD_SIZE_POLICIES:
        raise ValueError(f"{who}: on_world_size_change must be 'raise' or 'reset' (drop the per-rank state "
                         f"when a checkpoint's world size differs, e.g. torchrun elastic), got {policy!r}")


def check_checkpoint(sd, mine: dict, rank: int, policy: str = "raise") -> bool:
    """``sd`` is a state_dict() of this algorithm, these settings and this rank, or a ValueError saying which
    not. Returns True when the checkpoint's world size differs and ``policy`` is "reset" (the caller drops
    the per-rank tensors; any rank's state_dict is then accepted)."""
    if not isinstance(sd, dict) or "config" not in sd or "buffers" not in sd:
        raise ValueError("cser_hooks: load_state_dict expects the dict returned by state_dict()")
    theirs = sd["config"]
    if theirs.get("algorithm") != mine["algorithm"]:
        raise ValueError(f"cser_hooks: checkpoint is for algorithm {theirs.get('algorithm')!r}, this state is "
                         f"{mine['algorithm']!r}; load it into the matching state class.")
    saved_w, w = theirs.get("world_size"), mine.get("world_size")
    changed = saved_w != w
    if changed and policy != "reset":
        raise ValueError(
            f"cser_hooks: checkpoint was saved by a job of world size {saved_w}, this job has {w} ranks. Residuals, "
            f"momenta and reserves are per rank and cannot be redistributed. Resume with {saved_w} ranks, or "
            f"construct the state with on_world_size_change='reset' (torchrun elastic): it drops them with a "
            f"warning and continues from the checkpoint's step.")
    for k in sorted(set(mine) | set(theirs)):
        if k in _LOAD_ONLY:
            continue
        if mine.get(k) != theirs.get(k):
            raise ValueError(f"cser_hooks: checkpoint setting {k!r} = {theirs.get(k)!r} differs from this "
                             f"state's {mine.get(k)!r}; construct the state with the checkpoint's settings.")
    if not changed and sd.get("rank") != rank:
        raise ValueError(f"cser_hooks: checkpoint was saved by rank {sd.get('rank')}, this is rank "
                         f"{rank}; each rank must load its own state_dict.")
    return changed
