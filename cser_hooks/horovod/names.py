"""Gradient tensor -> parameter name, for Horovod's ``compress(tensor)`` (no name is passed, horovod#3312).

The ``id`` of each parameter's current ``.grad`` is cached and verified (``param.grad is tensor``)
on every call; a miss is resolved among the parameters of that shape. This survives
``zero_grad(set_to_none=True)`` (new tensors every step) and ``sparse_as_dense`` (a dense copy of a
sparse gradient, matched when one sparse gradient has that shape).
"""
from __future__ import annotations

import torch


class NamedParameters:
    """The parameters by name, and the name of a gradient tensor handed to ``compress``."""

    def __init__(self, named_parameters, who: str):
        if named_parameters is None:
            raise ValueError(f"{who} needs named_parameters=model.named_parameters(): Horovod passes no "
                             f"tensor name to compress() (horovod#3312), and each tensor's shared mask and "
                             f"residual are keyed by its parameter name.")
        items = list(named_parameters)
        if not items or any(not (isinstance(i, tuple) and len(i) == 2 and isinstance(i[1], torch.Tensor))
                            for i in items):
            raise ValueError(f"{who}: named_parameters must be (name, parameter) pairs, e.g. "
                             f"model.named_parameters() (a fresh call: Horovod's optimizer consumes its "
                             f"own).")
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"{who}: parameter names must be unique")
        self.items = items
        self.params: dict[str, torch.Tensor] = dict(items)
        self.by_shape: dict[tuple, list[str]] = {}
        for n, p in items:
            self.by_shape.setdefault(tuple(p.shape), []).append(n)
        self._name_of_id: dict[int, str] = {}
        self._id_of_name: dict[str, int] = {}
        self.who = who

    def _remember(self, t: torch.Tensor, name: str) -> str:
        old = self._id_of_name.get(name)
        if old is not None and self._name_of_id.get(old) == name:
            del self._name_of_id[old]
        self._name_of_id[id(t)] = name
        self._id_of_name[name] = id(t)
        return name

    def name_of(self, t: torch.Tensor) -> str:
        name = self._name_of_id.get(id(t))
        if name is not None and self.params[name].grad is t:
            return name
        same_shape = self.by_shape.get(tuple(t.shape), ())
        for n in same_shape:
            if self.params[n].grad is t:
                return self._remember(t, n)
        sparse = [n for n in same_shape if self.params[n].grad is not None and self.params[n].grad.is_sparse]
        if len(sparse) == 1:  # sparse_as_dense=True hands a dense copy of a sparse gradient
            return sparse[0]
        if any(p is t for p in self.params.values()):
            raise ValueError(f"{self.who}: compress() received a parameter, not its gradient: op=hvd.Adasum "
                             f"compresses model deltas, which this compression does not support. Use "
                             f"op=hvd.Average.")
        why = " (several sparse gradients share its shape: sparse_as_dense is ambiguous)" if sparse else ""
        raise ValueError(
            f"{self.who}: compress() received a tensor of shape {tuple(t.shape)} that is not the .grad of "
            f"any parameter given in named_parameters{why}. Use it only as hvd.DistributedOptimizer(..., "
            f"compression=...) over the same model.named_parameters(); for hvd.allreduce of other tensors "
            f"use FP16Compression().")
