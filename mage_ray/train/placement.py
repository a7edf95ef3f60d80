"""Pre-flight resource check for Ray Train runs: fail with a clear message instead of waiting forever.

A backbone (or value-model) training run asks Ray for one placement group of ``num_workers`` identical
bundles, each the worker's resources (Ray Train's rule: ``resources_per_worker`` with zero entries
dropped, plus ``GPU: 1`` when ``use_gpu`` and no GPU count is given). Ray Tune runs ``concurrent_runs``
such runs side by side (one trial per backbone). If one run's placement group can never fit on the
cluster, Ray waits for it indefinitely; on a fixed-size cluster that looks like a hang. On an autoscaling
cluster the wait is right: the autoscaler adds nodes for the pending bundles.

:func:`check_resources` reads the live cluster (``ray.nodes()``) and returns how many runs to start at
once (Tune's ``max_concurrent_trials``):

* fixed-size cluster: raises :class:`InsufficientResourcesError` when not even one run fits, e.g.
  ``needs 2 GPU bundles of {GPU: 1, CPU: 1}; the cluster has 1 GPU in total; add GPU nodes or lower
  backbone.num_workers``; when only some of ``concurrent_runs`` fit, logs that the rest will queue and
  returns how many fit;
* autoscaling cluster (``allow_autoscale``): logs what the cluster lacks now (the visible reason for the
  wait) and returns ``concurrent_runs``: every run's placement group is requested, and the pending ones
  are what the autoscaler adds nodes for.

``allow_autoscale`` defaults to the environment variable ``MAGE_RAY_ALLOW_AUTOSCALE`` (``1`` / ``true``),
which the shipped autoscaling cluster configs (cluster/gpu-cluster.yaml, cluster/kuberay/) set on every
node, so the training code needs no flag of its own.

The count is exact for identical bundles: a node with free resources ``R`` holds
``min_k floor(R[k] / b[k])`` bundles ``b``, and PACK / SPREAD placement groups may use any nodes, so the
cluster holds the sum of that over nodes. STRICT_PACK needs every bundle of a run on one node,
STRICT_SPREAD one bundle per distinct node.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

logger = logging.getLogger(__name__)

ALLOW_AUTOSCALE_ENV = "MAGE_RAY_ALLOW_AUTOSCALE"
"""Set to 1 on autoscaling clusters: missing resources are waited for (the autoscaler adds nodes)."""

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

# Node resources that are not schedulable capacities a worker bundle asks for.
_IGNORED_PREFIXES = ("node:", "accelerator_type:")


class InsufficientResourcesError(ValueError):
    """The cluster can never place the requested workers (and no autoscaler will add nodes)."""


def worker_bundle(resources_per_worker: Mapping[str, float] | None, use_gpu: bool) -> dict[str, float]:
    """Resources one Ray Train worker reserves, by Ray Train's own rule (``ScalingConfig``).

    ``None`` means ``{GPU: 1}`` with ``use_gpu`` else ``{CPU: 1}``; zero entries are dropped; ``use_gpu``
    adds ``GPU: 1`` when no GPU count is given.
    """
    if resources_per_worker is None:
        bundle: dict[str, float] = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    else:
        bundle = {str(k): float(v) for k, v in resources_per_worker.items() if v != 0}
    if use_gpu:
        bundle.setdefault("GPU", 1.0)
    for k, v in bundle.items():
        if v < 0 or not math.isfinite(v):
            raise ValueError(f"resources_per_worker[{k!r}] = {v!r} is invalid: expected a number >= 0")
    return bundle


def bundles_that_fit(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` fit on a node with resources ``node``: min_k floor(node[k] / b[k])."""
    counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(counts) if counts else 1_000_000


def runs_that_fit(
    nodes: Sequence[Mapping[str, float]],
    bundle: Mapping[str, float],
    num_workers: int,
    strategy: str = "PACK",
    driver: Mapping[str, float] | None = None,
) -> int:
    """How many runs of ``num_workers`` bundles (plus an optional per-run ``driver`` bundle) fit at once.

    Greedy and exact for PACK / SPREAD (identical bundles may go anywhere); STRICT_PACK counts runs whose
    bundles all fit on one node; STRICT_SPREAD counts runs with one bundle on each of ``num_workers``
    distinct nodes. The driver bundle (e.g. a Tune trial's own CPU) is placed first, on the node where it
    costs fewest worker bundles.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"placement strategy {strategy!r} is invalid: expected one of {list(STRATEGIES)}")
    free = [dict(n) for n in nodes]
    runs = 0
    while True:
        if driver:
            fits = [i for i, n in enumerate(free) if bundles_that_fit(n, driver) >= 1]
            if not fits:
                return runs
            # Take the driver from the node that loses the fewest worker bundles by it.
            i = min(fits, key=lambda j: _driver_cost(free[j], driver, bundle))
            for k, v in driver.items():
                free[i][k] = free[i].get(k, 0.0) - v
        if not _take_run(free, bundle, num_workers, strategy):
            return runs
        runs += 1
        if runs >= 100_000:  # zero-resource bundles: unbounded
            return runs


def _driver_cost(node: Mapping[str, float], driver: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """Worker bundles a node can no longer hold once the driver bundle is taken from it."""
    after = {k: node.get(k, 0.0) - driver.get(k, 0.0) for k in set(node) | set(driver)}
    return bundles_that_fit(node, bundle) - bundles_that_fit(after, bundle)


def _take_run(free: list[dict[str, float]], bundle: Mapping[str, float], n: int, strategy: str) -> bool:
    """Subtract one run's bundles from ``free`` (in place) if they fit; else leave it and return False."""
    caps = [bundles_that_fit(node, bundle) for node in free]
    if strategy == "STRICT_PACK":
        picks = [(i, n) for i, c in enumerate(caps) if c >= n][:1]
    elif strategy == "STRICT_SPREAD":
        order = sorted((i for i, c in enumerate(caps) if c >= 1), key=lambda i: -caps[i])
        picks = [(i, 1) for i in order[:n]] if len(order) >= n else []
    else:
        picks, left = [], n
        for i in sorted(range(len(free)), key=lambda i: -caps[i]):
            if left == 0:
                break
            take = min(caps[i], left)
            if take:
                picks.append((i, take))
                left -= take
        if left:
            picks = []
    if not picks:
        return False
    for i, count in picks:
        for k, v in bundle.items():
            free[i][k] = free[i].get(k, 0.0) - count * v
    return True


def _fmt(res: Mapping[str, float]) -> str:
    items = sorted(res.items(), key=lambda kv: (kv[0] != "GPU", kv[0] != "CPU", kv[0]))
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in items) + "}"


def cluster_nodes() -> list[dict[str, float]]:
    """Total schedulable resources of each alive node of the connected Ray cluster."""
    import ray

    out = []
    for node in ray.nodes():
        if not node.get("Alive", False):
            continue
        res = {
            k: float(v) for k, v in node.get("Resources", {}).items() if not k.startswith(_IGNORED_PREFIXES)
        }
        out.append(res)
    return out


def check_resources(
    num_workers: int,
    resources_per_worker: Mapping[str, float] | None,
    use_gpu: bool,
    *,
    concurrent_runs: int = 1,
    allow_autoscale: bool | None = None,
    placement_strategy: str = "PACK",
    driver_resources: Mapping[str, float] | None = None,
    field_prefix: str = "backbone",
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> int:
    """Check that the cluster can place the training workers; return how many runs to start at once.

    Args:
        num_workers: Ray Train workers per run (``backbone.num_workers``).
        resources_per_worker: per-worker resources (``backbone.resources_per_worker``), Ray Train semantics.
        use_gpu: ``backbone.use_gpu``.
        concurrent_runs: runs Tune would like to run side by side (n backbones -> n).
        allow_autoscale: the cluster has an autoscaler; log the shortfall and let Ray wait for new nodes
            instead of raising. None: the ``MAGE_RAY_ALLOW_AUTOSCALE`` environment variable (default off).
        placement_strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD.
        driver_resources: resources each run needs besides its workers (e.g. a Tune trial's ``{CPU: 1}``).
        field_prefix: config section named in messages (``backbone`` or ``value``).
        nodes: per-node total resources; default: the connected cluster (:func:`cluster_nodes`).

    Returns:
        ``min(concurrent_runs, runs that fit now)`` on a fixed-size cluster (>= 1), ``concurrent_runs``
        with ``allow_autoscale``.

    Raises:
        InsufficientResourcesError: not even one run fits and ``allow_autoscale`` is False.
        ValueError: a bad argument.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"{field_prefix}.num_workers = {num_workers!r} is invalid: expected an integer >= 1")
    if isinstance(concurrent_runs, bool) or not isinstance(concurrent_runs, int) or concurrent_runs < 1:
        raise ValueError(f"concurrent_runs = {concurrent_runs!r} is invalid: expected an integer >= 1")
    bundle = worker_bundle(resources_per_worker, use_gpu)
    driver = {k: float(v) for k, v in (driver_resources or {}).items() if v}
    if allow_autoscale is None:
        allow_autoscale = os.environ.get(ALLOW_AUTOSCALE_ENV, "").strip().lower() in (
            "1",
            "true",
            "yes",
            "on",
        )
    nodes = cluster_nodes() if nodes is None else [dict(n) for n in nodes]
    fit = runs_that_fit(nodes, bundle, num_workers, placement_strategy, driver or None)
    if fit >= concurrent_runs:
        return concurrent_runs

    need = _fmt({k: bundle.get(k, 0.0) * num_workers + driver.get(k, 0.0) for k in {**driver, **bundle}})
    if allow_autoscale:
        logger.warning(
            "%d of %d %s runs (each %s) fit on the cluster now; requesting all %d and waiting for the "
            "autoscaler to add nodes%s",
            fit,
            concurrent_runs,
            field_prefix,
            need,
            concurrent_runs,
            ""
            if fit
            else f" ({_shortfall(nodes, bundle, num_workers, placement_strategy, driver, field_prefix)})",
        )
        return concurrent_runs
    if fit >= 1:
        logger.warning(
            "only %d of %d concurrent runs fit on the cluster (each needs %s); the others will queue",
            fit,
            concurrent_runs,
            need,
        )
        return fit
    raise InsufficientResourcesError(
        _shortfall(nodes, bundle, num_workers, placement_strategy, driver, field_prefix)
    )


def _shortfall(
    nodes: Sequence[Mapping[str, float]],
    bundle: Mapping[str, float],
    num_workers: int,
    strategy: str,
    driver: Mapping[str, float],
    prefix: str,
) -> str:
    """The message for a run that cannot be placed: what it needs, what the cluster has, what to change."""
    kind = "GPU" if bundle.get("GPU", 0) > 0 else "CPU" if bundle.get("CPU", 0) > 0 else "worker"
    head = f"needs {num_workers} {kind} bundle{'s' if num_workers != 1 else ''} of {_fmt(bundle)}"
    if strategy != "PACK":
        head += f" ({strategy})"
    if driver:
        head += f" plus {_fmt(driver)} for the run's driver"
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            totals[k] = totals.get(k, 0.0) + v
    need = {k: bundle.get(k, 0.0) * num_workers + driver.get(k, 0.0) for k in {**bundle, **driver}}
    short = [k for k, v in need.items() if totals.get(k, 0.0) + 1e-9 < v]
    if short:
        have = ", ".join(f"{totals.get(k, 0.0):g} {k}" for k in short)
        where = f"the cluster has {have} in total"
    elif not any(bundles_that_fit(n, bundle) >= 1 for n in nodes):
        shapes = sorted({_fmt(n) for n in nodes})
        where = f"no single node holds one bundle (nodes: {', '.join(shapes[:4]) or 'none'})"
    else:
        where = f"the cluster's {len(nodes)} node(s) cannot hold them under {strategy} placement"
    hint = f"add {'GPU ' if kind == 'GPU' else ''}nodes or lower {prefix}.num_workers"
    if kind == "GPU" or len(bundle) > 1:
        hint += f" / {prefix}.resources_per_worker"
    return f"{prefix} training {head}; {where}; {hint}"
