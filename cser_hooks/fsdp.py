"""FSDP2 / HSDP front end: run an algorithm as the cross-node (replicate-dimension) all-reduce.

In hybrid sharding (HSDP) the parameters are sharded over the ``shard`` dimension of a 2-D mesh
(inside a node) and replicated over its ``replicate`` dimension (across nodes). FSDP2 reduce-scatters
each parameter group's gradient over the shard dimension, then all-reduces the resulting gradient
*shard* over the replicate dimension: that all-reduce is the slow-link traffic, and the one this
module replaces by EF (docs/algorithms.md §2) or CSER (§3)::

    mesh = init_device_mesh("cuda", (2, 8), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])      # the shard sub-mesh: FSDP2 does only the reduce-scatter
    fully_shard(model, mesh=mesh["shard"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hsdp = cser_hooks.fsdp.register(model, mesh, "cser", c1="random_block:ratio=1/64", c2="identity",
                                    period=16, optimizer=opt)
    ...
    print(hsdp.stats())

Why ``mesh["shard"]`` (torch 2.13, ``_fsdp_collectives.foreach_reduce``): sharded over the 2-D mesh,
FSDP2 runs its own replicate all-reduce *before* ``set_all_reduce_hook``'s hook, and
``set_requires_all_reduce(False)`` skips the hook; on the 1-D shard mesh the hook receives the
reduce-scattered shard itself, before FSDP2 views it into ``.grad``. :func:`register` refuses the former.

The adapter (:class:`FSDPDriver` holds the algorithm state, like ``horovod/driver.py``): each FSDP
module is one key. Its hook gets the group's flat shard (each parameter's dim-0 chunk, padded to
``ceil(dim0/S)`` rows); the algorithm sees the unpadded concatenation (a copy only where padded), the
parameter offsets as ``segments`` and the local shards ``DTensor.to_local()`` for the model-side work
(CSER's reset): the (key, flat, segments, params) of the DDP adapter. Collectives run over the replicate
group only, so each shard position runs the algorithm among its R replicas and every byte in
``stats()`` is replicate-dimension traffic. Keys ``f"{module_fqn or '<root>'}#{s}/{S}"`` (s: this rank's
shard coordinate) are stable across re-wrapping and equal on the replicas that exchange them; masks
(docs/algorithms.md §1) are drawn per (group, shard). A step closes when every group has reduced, or
in the optimizer's step post-hook, which runs ``after_optimizer_step`` (CSER's reset); without
``optimizer=`` the reset runs one step later, from the next hook (as on DDP).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .algorithms.cser import CSER
from .algorithms.ef import ErrorFeedback
from .comm import TorchDistCommunicator
from .exchange import StepContext, launch
from .state import AlgorithmState

__all__ = ["ALGORITHMS", "FSDPDriver", "register"]

# the algorithms tested on this front end (tests/test_fsdp.py)
ALGORITHMS: dict[str, type[AlgorithmState]] = {"ef": ErrorFeedback, "cser": CSER}

_NATIVE_HSDP = (
    "cser_hooks.fsdp: {what} is sharded over the 2-D mesh (native HSDP, placements {pl}). FSDP2 then runs its "
    "own replicate all-reduce before the all-reduce hook (the hook would see the averaged shard, nothing "
    "left to compress), and set_requires_all_reduce(False) skips the hook altogether. Shard over the shard "
    "sub-mesh instead, fully_shard(module, mesh=mesh[{shard!r}]), and pass the 2-D mesh to register(): "
    "this front end then does the replicate all-reduce itself.")


def _fqn_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("cser_hooks.fsdp: an FSDP module given is not a submodule of the model")


class _Group:
    """One FSDP parameter group: its key, parameters (DTensors) and the shard layout."""

    __slots__ = ("key", "fqn", "params", "names", "padded", "local", "segments", "expected", "fsdp_group")

    def __init__(self, key: str, fqn: str, params: list, names: list[str], shards: int, coord: int, fsdp_group):
        self.key, self.fqn, self.params, self.names = key, fqn, params, names
        self.fsdp_group = fsdp_group  # FSDP2's FSDPParamGroup (read for gradient_divide_factor only)
        self.padded, self.local = [], []
        for p in params:
            rows = p.shape[0] if p.dim() else 1
            per_row = p.numel() // rows if rows else 0
            chunk = math.ceil(rows / shards)
            self.padded.append(chunk * per_row)
            self.local.append(max(0, min(chunk, rows - coord * chunk)) * per_row)
        self.segments = [0]
        for n in self.local:
            self.segments.append(self.segments[-1] + n)
        self.expected = sum(self.padded)

    @property
    def has_padding(self) -> bool:
        return self.local != self.padded

    def local_shards(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [p.to_local() for p in self.params]


class FSDPDriver:
    """One algorithm state driven from FSDP2's per-group all-reduce hooks (see the module docstring).

    ``algorithm``: the core state, built with a communicator over the replicate group; ``stats()``,
    ``state_dict()``, ``load_state_dict()`` are its own (per rank) plus, in ``stats()``, the
    shard-dimension reduce-scatter bytes FSDP2 itself moved (computed, not part of the totals).
    """

    def __init__(self, model: torch.nn.Module, mesh, algorithm_cls: type[AlgorithmState], *args,
                 optimizer=None, replicate_dim: str = "replicate", shard_dim: str = "shard",
                 progress_timeout: float | None = None, **kw):
        from torch.distributed.fsdp import FSDPModule  # lazy: torch.distributed may be absent

        _check_mesh(mesh, replicate_dim, shard_dim)
        for knob in ("named_parameters", "process_group"):
            if knob in kw:
                raise ValueError(f"cser_hooks.fsdp: {knob}= is not supported: the keys are the FSDP groups "
                                 f"(module FQN and shard coordinate) and the group is the mesh's "
                                 f"{replicate_dim!r} dimension")
        if kw.get("on_nonfinite") == "auto":
            kw["on_nonfinite"] = "raise"  # no skip on this front end yet: auto resolves to raise
        if kw.get("on_nonfinite", "raise") != "raise":
            raise ValueError("cser_hooks.fsdp: on_nonfinite='skip' (fp16 + GradScaler) is not supported on the "
                             "FSDP front end yet; use bf16 (MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)) "
                             "or fp32 reductions, which need no scaler")
        self.mesh = mesh
        self.shard_mesh = mesh[shard_dim]
        self.shards = self.shard_mesh.size()
        self.coord = self.shard_mesh.get_local_rank()
        self.replicate_group = mesh.get_group(replicate_dim)
        self.algorithm = algorithm_cls(TorchDistCommunicator(self.replicate_group, progress_timeout), *args, **kw)
        self.comm = self.algorithm.comm
        self.groups: dict[str, _Group] = {}
        names = {id(p): n for n, p in model.named_parameters()}
        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not modules:
            raise ValueError(f"cser_hooks.fsdp: the model has no FSDP module: call fully_shard(module, "
                             f"mesh=mesh[{shard_dim!r}]) on its blocks and on the model before register()")
        for m in modules:
            group = self._group_of(model, m, names, shard_dim)
            if group is not None:
                self.groups[group.key] = group
                m.set_all_reduce_hook(self._hook_for(group))
        self._active: set[str] = set()
        self._after_pending = False
        self.rs_bytes = self.rs_wire_bytes = 0
        self.optimizer = None
        self._handle = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    def _group_of(self, model, module, names, shard_dim) -> _Group | None:
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            raise RuntimeError("cser_hooks.fsdp: this torch's FSDP2 has no _fsdp_param_groups (written against "
                               "torch 2.13's torch.distributed.fsdp._fully_shard)")
        if len(groups) > 1:
            raise ValueError("cser_hooks.fsdp: a module with several FSDP parameter groups (per-parameter meshes "
                             "from shard_placement_fn) is not supported: one all-reduce hook per module")
        if not groups:
            return None
        fqn = _fqn_of(model, module)
        what = f"FSDP module {fqn or '<root>'!r}"
        params = []
        for fp in groups[0].fsdp_params:
            p = fp.sharded_param
            if getattr(fp, "offload_to_cpu", False):
                raise ValueError(f"cser_hooks.fsdp: {what}: CPUOffloadPolicy is not supported (the parameters "
                                 f"would live on the host, the gradient shard on the device)")
            if p.device_mesh.ndim != 1:
                raise ValueError(_NATIVE_HSDP.format(what=what, pl=tuple(p.placements), shard=shard_dim))
            if p.device_mesh != self.shard_mesh:
                raise ValueError(f"cser_hooks.fsdp: {what} is sharded over {p.device_mesh}, not over the mesh's "
                                 f"{shard_dim!r} dimension {self.shard_mesh}; fully_shard it with "
                                 f"mesh=mesh[{shard_dim!r}] of the mesh given to register()")
            if tuple(p.placements) != (torch.distributed.tensor.Shard(0),):
                raise ValueError(f"cser_hooks.fsdp: {what}: placement {tuple(p.placements)} is not supported, "
                                 f"only the default Shard(0) (no shard_placement_fn)")
            params.append(p)
        key = f"{fqn or '<root>'}#{self.coord}/{self.shards}"
        return _Group(key, fqn, params, [names.get(id(p), "?") for p in params], self.shards, self.coord,
                      groups[0])

    def _hook_for(self, group: _Group):
        def hook(reduce_output: torch.Tensor) -> None:
            self.reduce(group, reduce_output)
        return hook

    # -- one group's replicate all-reduce -----------------------------------------------------------
    def reduce(self, group: _Group, out: torch.Tensor) -> None:
        """The replicate-dimension reduction of ``group``'s gradient shard ``out`` (in place): the
        algorithm's encode → one collective over the replicate group → decode, before FSDP2 views
        ``out`` into the parameters' ``.grad``."""
        if out.numel() != group.expected or out.dim() != 1:
            raise RuntimeError(f"cser_hooks.fsdp: group {group.key!r}: FSDP2 handed a gradient shard of shape "
                               f"{tuple(out.shape)}, expected ({group.expected},) from the parameters' padded "
                               f"chunks; this FSDP2 version lays shards out differently")
        if out.dtype == torch.float16:
            raise ValueError(f"cser_hooks.fsdp: group {group.key!r}: reduce_dtype=torch.float16 is not supported "
                             f"(FSDP2 pre/post-divides fp16 around the hook and fp16 needs a GradScaler); use "
                             f"MixedPrecisionPolicy(reduce_dtype=torch.bfloat16) or fp32")
        if getattr(group.fsdp_group, "gradient_divide_factor", None) is not None:
            raise ValueError(f"cser_hooks.fsdp: group {group.key!r}: set_gradient_divide_factor is not supported: "
                             f"the shard reduction would be sum/f, which the algorithm's mean over the replicas "
                             f"does not turn into native HSDP's sum over all ranks / f")
        if group.key in self._active:  # back for its next step: the last step was not closed
            self.finish_step()
        self._active.add(group.key)
        es = out.element_size()
        self.rs_bytes += out.numel() * self.shards * es
        self.rs_wire_bytes += out.numel() * (self.shards - 1) * es
        try:
            flat = self._compact(group, out) if group.has_padding else out
            self._run(group, flat)
            if flat is not out:
                self._scatter(group, flat, out)
        finally:
            if len(self._active) == len(self.groups):
                self.finish_step()

    def _run(self, group: _Group, flat: torch.Tensor) -> None:
        alg = self.algorithm
        if not alg.agreed:
            alg.check_agreement()
        where = f"step {alg.step}, FSDP group {group.key!r}"
        self.comm.label = where
        alg.count_dense(flat)
        try:
            if alg.step < alg.warmup_steps:
                self.comm.allreduce_mean_async(flat).wait()
                return
            ctx = StepContext(group.key, alg.step, flat.numel(), list(group.segments), None)
            alg.before_key(group.key)
            alg.before_bucket(ctx, group.local_shards())
            ex = ctx.exchange = alg.encode(flat, ctx)
            received = launch(self.comm, ex).wait()
        except RuntimeError as e:
            raise alg.collective_failure(where, e) from e
        res = alg.decode(flat, received, ctx)
        if res is not flat:
            flat.copy_(res)

    def _compact(self, group: _Group, out: torch.Tensor) -> torch.Tensor:
        parts, o = [], 0
        for n, pad in zip(group.local, group.padded):
            parts.append(out[o:o + n])
            o += pad
        return torch.cat(parts)

    def _scatter(self, group: _Group, flat: torch.Tensor, out: torch.Tensor) -> None:
        o = 0
        for (a, b), pad in zip(zip(group.segments, group.segments[1:]), group.padded):
            out[o:o + b - a].copy_(flat[a:b])
            o += pad

    # -- steps -----------------------------------------------------------------------------------
    def finish_step(self) -> None:
        self._active.clear()
        self.algorithm.finish_step()
        self._after_pending = True

    def after_step(self) -> None:
        """Optimizer step post-hook: close the step if a group did not reduce, then the model-side
        work of the step (CSER's reset over the replicate dimension, on the local shards)."""
        if self._active:
            self.finish_step()
        if not self._after_pending:
            return
        self._after_pending = False
        alg = self.algorithm
        where = f"step {alg.step - 1}, after optimizer.step() (model synchronization)"
        self.comm.label = where
        try:
            alg.after_optimizer_step()
        except RuntimeError as e:
            raise alg.collective_failure(where, e) from e

    def attach_optimizer(self, optimizer):
        """Close each step right after ``optimizer.step()`` and run the algorithm's after-step work
        there; the algorithm reads the optimizer's lr (EF's residual rescale, §2 "Learning-rate
        changes"). Returns the optimizer."""
        if not getattr(optimizer, "param_groups", None):
            raise TypeError(f"cser_hooks.fsdp: attach_optimizer needs a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if self._handle is not None:
            self._handle.remove()
        if isinstance(self.algorithm, CSER) and self.algorithm.momentum:
            from .algorithms.cser import check_mcser_optimizer
            check_mcser_optimizer(optimizer, self.algorithm.momentum)
        self.optimizer = optimizer
        self.algorithm.use_optimizer(optimizer)
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step())
        return optimizer

    # -- what the algorithm reports and saves --------------------------------------------------------
    @property
    def step(self) -> int:
        return self.algorithm.step

    def config(self) -> dict[str, Any]:
        return self.algorithm.config()

    def stats(self) -> dict[str, Any]:
        """The algorithm's ``stats()`` (all of it replicate-dimension traffic, cser_hooks/counters.py)
        plus the shard dimension's reduce-scatter, which FSDP2 runs itself (computed from the shard
        sizes: ``reduce_scatter_bytes_total`` handed, ``reduce_scatter_wire_bytes_total`` = (S−1)/S of
        it on a ring). FSDP2's parameter all-gathers (forward, and backward after a reshard) are not
        counted."""
        return {**self.algorithm.stats(), "replicas": self.comm.world_size, "shards": self.shards,
                "reduce_scatter_bytes_total": self.rs_bytes, "reduce_scatter_wire_bytes_total": self.rs_wire_bytes}

    def state_dict(self) -> dict[str, Any]:
        return self.algorithm.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(sd)
        self._active.clear()
        self._after_pending = False


def _check_mesh(mesh, replicate_dim: str, shard_dim: str) -> None:
    names = getattr(mesh, "mesh_dim_names", None)
    if getattr(mesh, "ndim", None) != 2 or not names or set(names) != {replicate_dim, shard_dim}:
        raise ValueError(
            f"cser_hooks.fsdp: register() needs the 2-D DeviceMesh of hybrid sharding with dimensions "
            f"({replicate_dim!r}, {shard_dim!r}), e.g. init_device_mesh('cuda', (nodes, gpus_per_node), "
            f"mesh_dim_names=({replicate_dim!r}, {shard_dim!r})); got "
            f"{getattr(mesh, 'ndim', type(mesh).__name__)}-D dims {names}. Plain FSDP (1-D mesh) has no "
            f"replicate all-reduce to compress; pure replication (no shard dimension) is DDP: use "
            f"cser_hooks.ddp's hooks.")


def register(model: torch.nn.Module, mesh, algorithm: str | type[AlgorithmState] = "ef", *args,
             optimizer=None, replicate_dim: str = "replicate", shard_dim: str = "shard", **knobs) -> FSDPDriver:
    """Run ``algorithm`` as the replicate-dimension all-reduce of every FSDP group of ``model``.

    model: the root module, already sharded with ``fully_shard(m, mesh=mesh[shard_dim])`` (its blocks,
        then itself); every FSDP module inside is registered, each one key.
    mesh: the 2-D ``DeviceMesh`` (replicate, shard); its ``replicate_dim`` group carries our collectives.
    algorithm: ``"ef"`` (error feedback, docs/algorithms.md §2: knobs ``compressor``, ``error_feedback``)
        or ``"cser"`` (§3: ``c1``, ``c2``, ``period``, ``momentum``, ``nesterov``), or the class itself;
        common knobs (``seed``, ``warmup_steps``, ``check_finite``) as on DDP (README table). On FSDP
        ``warmup_steps=0`` is fine (no bucket rebuild); the default 1 keeps DDP's dense first step.
    optimizer: closes each step right after ``optimizer.step()`` and runs CSER's reset there
        (recommended; without it the reset runs from the next step's hooks, one step late).
    Returns the :class:`FSDPDriver` (``stats()``, ``state_dict()``, ``load_state_dict()``).
    """
    cls = ALGORITHMS.get(algorithm) if isinstance(algorithm, str) else algorithm
    if cls is None or not (isinstance(cls, type) and issubclass(cls, tuple(ALGORITHMS.values()))):
        raise ValueError(f"cser_hooks.fsdp: algorithm {algorithm!r} is not supported on the FSDP front end; "
                         f"choose one of {sorted(ALGORITHMS)}")
    return FSDPDriver(model, mesh, cls, *args, optimizer=optimizer, replicate_dim=replicate_dim,
                      shard_dim=shard_dim, **knobs)
