"""Will compression pay on my cluster? A step-time model per method (``python -m cser_hooks.plan``).

    from cser_hooks import plan
    preds = plan.estimate(model, "1gbit", world_size=16, compute_s=0.120)   # nn.Module, int or buckets
    best, line = plan.recommend(preds)

From the model (its gradient tensors and DDP's buckets of them), the world size W, the link (rate
B per worker, latency α) and the measured compute time T of one step (forward + backward +
optimizer, *without* communication), every method's step is modelled as

    step = T + compress + blocking + max(0, e_last − T_b)          (cser_hooks/plan/timing.py)

* wire bytes by collective from the package's own wire model (:mod:`cser_hooks.wire`: ring
  allreduce ⌊2(W−1)/W·n⌋, ring allgather (W−1)·n, all_to_all Σ_{j≠r} n_j) applied to each method's
  collectives and payload sizes (:mod:`cser_hooks.plan.collectives`; the compressors' ``wire_bytes``);
  the same figures a state's ``stats()`` reports (``wire_bytes_*``), checked on real gloo ranks;
* t_coll = hops·α + wire_bytes·(1 + overhead)/B, hops = 2(W−1) (allreduce) or W−1 (allgather,
  all_to_all);
* e_last: DDP's hook collectives run one after another from the moment their bucket is ready
  (r_i = T_b · share of gradient bytes ready, T_b = backward_share · T), so only what outlasts the
  backward pass is exposed; blocking collectives (model syncs after the optimizer step, CSER's
  reset, dist-EF-SGDM's all_to_all inside the hook) add in full;
* compress: encode + decode passes per bucket at the kernel throughputs of docs/bench-kernels
  (:mod:`cser_hooks.plan.costs`; overridable);
* periodic events (CSER's reset every H, Qsparse / QPRSGD syncs, CompSkip's send rounds) are
  amortised: mean = ((H−1)·step_regular + step_event)/H.

It is a model: no protocol other than the ring / pairwise one, no contention between ranks beyond
the per-worker link, no convergence (a compressed method may need more steps to the same accuracy).
docs/plan.md has the derivation and docs/plan-validation/report.md the comparison with measured
bench step times.
"""
from .api import DEFAULT_METHODS, as_workload, estimate, extrapolate, gain_line, recommend
from .by_method import traffic
from .collectives import Collective, StepPlan, Traffic
from .costs import Costs
from .costs import load as load_costs
from .timing import Link, Prediction, StepTime, parse_duration, predict, step_time
from .workload import Workload, from_bucket_sizes, from_module, from_params

__all__ = ["DEFAULT_METHODS", "Collective", "Costs", "Link", "Prediction", "StepPlan", "StepTime", "Traffic",
           "Workload", "as_workload", "estimate", "extrapolate", "from_bucket_sizes", "from_module",
           "from_params", "gain_line", "load_costs", "parse_duration", "predict", "recommend", "step_time", "traffic"]
