"""Several Ray Train runs side by side as Tune trials, and what one run's workers are (:class:`Scaling`).

Ray 2.60 runs Train V2 inside Tune with a per-trial *driver* that reserves no CPU (only
:data:`DRIVER_MEMORY`); ``max_concurrent_trials`` is how many runs' workers fit in the cluster
(:func:`max_concurrent_runs`, which fails fast with a message naming the config fields when not even one fits).
:func:`mage_ray.train.ray_shell.run_pending` calls :func:`run_concurrent` for more than one pending run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mage_ray.config import BackboneConfig, ValueConfig
from mage_ray.manifest import storage_abs

__all__ = [
    "DRIVER_MEMORY",
    "ConcurrentRunError",
    "Scaling",
    "max_concurrent_runs",
    "run_concurrent",
    "storage_abs",
]

DRIVER_MEMORY = 64 * 2**20
"""Logical memory (bytes) a Tune trial reserves for a Train driver; it reserves no CPU."""


class ConcurrentRunError(RuntimeError):
    """One or more of the concurrently launched runs failed; the message lists each."""


@dataclass(frozen=True)
class Scaling:
    """Workers of one Ray Train run (``ray.train.ScalingConfig``)."""

    num_workers: int = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    placement_strategy: str = "PACK"

    @classmethod
    def from_backbone(cls, b: BackboneConfig) -> Scaling:
        return cls(b.num_workers, b.use_gpu, dict(b.resources_per_worker), b.placement_strategy)

    @classmethod
    def from_value(cls, v: ValueConfig) -> Scaling:
        return cls(v.num_workers, v.use_gpu, dict(v.resources_per_worker), "PACK")

    def worker_resources(self) -> dict[str, float]:
        """What each worker reserves, by Ray Train's rule (``use_gpu`` adds GPU: 1 when no GPU count is given)."""
        from mage_ray.train.placement import worker_bundle

        return worker_bundle(self.resources_per_worker or None, self.use_gpu)

    def scaling_config(self):
        import ray.train

        return ray.train.ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=dict(self.resources_per_worker) or None,
            placement_strategy=self.placement_strategy,
        )


# ---------------------------------------------------------------------------------------------
# Concurrency via Tune


def max_concurrent_runs(scaling: Scaling, n_runs: int, field_prefix: str = "backbone") -> int:
    """How many runs of ``scaling`` fit in the cluster at once (1..n_runs).

    Pre-flight check (``mage_ray.train.placement.check_resources``): raises InsufficientResourcesError
    naming ``<field_prefix>.num_workers`` / ``resources_per_worker`` when not even one run fits, instead of
    letting Ray wait forever for a placement group.
    """
    from mage_ray.train.placement import check_resources

    fit = check_resources(
        scaling.num_workers,
        scaling.resources_per_worker,
        scaling.use_gpu,
        concurrent_runs=n_runs,
        placement_strategy=scaling.placement_strategy,
        field_prefix=field_prefix,
    )
    return max(1, fit)


def _tune_driver(
    trial_config: dict[str, Any], *, fn: Callable[..., dict], jobs: list[dict]
) -> dict[str, Any]:
    """Tune trial body: run job ``index`` and return its result (errors are returned, not raised, so every
    job runs and the caller gets one clean report)."""
    i = trial_config["index"]
    try:
        out = fn(**jobs[i])
        return {"index": i, "ok": 1, "result_json": json.dumps(out, default=str)}
    except Exception as e:  # noqa: BLE001 - reported back to the caller by run_concurrent
        return {"index": i, "ok": 0, "error": f"{type(e).__name__}: {e}"}


def run_concurrent(
    fn: Callable[..., dict],
    jobs: Sequence[dict[str, Any]],
    *,
    scaling: Scaling,
    storage_path: str,
    name: str,
    labels: Sequence[str] | None = None,
    max_concurrent: int | None = None,
    field_prefix: str = "backbone",
) -> list[dict]:
    """Run ``fn(**job)`` for every job as concurrent Tune trials; return the results in job order.

    ``fn`` is a driver (it typically calls :func:`run_torch_trainer`) and returns a JSON-able dict.
    ``scaling`` is one job's Train workers; at most ``max_concurrent`` (default: as many as the cluster
    holds, :func:`max_concurrent_runs`) run at once. Raises ConcurrentRunError listing every failed job after all finished.
    """
    from ray import tune

    jobs = list(jobs)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(jobs))]
    k = max_concurrent or max_concurrent_runs(scaling, len(jobs), field_prefix)
    from mage_ray.devices import note_request

    note_request("Tune trial driving a Train run", {"memory": DRIVER_MEMORY}, count=len(jobs), detail=name)
    trainable = tune.with_resources(
        tune.with_parameters(_tune_driver, fn=fn, jobs=jobs), {"CPU": 0, "memory": DRIVER_MEMORY}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(list(range(len(jobs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=k, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=storage_abs(storage_path), verbose=0),
    )
    grid = tuner.fit()
    results: dict[int, dict] = {}
    errors: list[str] = []
    for r in grid:
        m = r.metrics or {}
        i = r.config["index"] if r.config else m.get("index")
        if r.error is not None:
            errors.append(f"{labels[i]}: {str(r.error).strip().splitlines()[-1]}")
        elif not m.get("ok"):
            errors.append(f"{labels[i]}: {m.get('error', 'no result reported')}")
        else:
            results[i] = json.loads(m["result_json"])
    if errors or len(results) != len(jobs):
        missing = [
            labels[i]
            for i in range(len(jobs))
            if i not in results and not any(e.startswith(labels[i] + ":") for e in errors)
        ]
        errors += [f"{lab}: no result" for lab in missing]
        raise ConcurrentRunError(f"{len(errors)} of {len(jobs)} runs failed:\n  " + "\n  ".join(errors))
    return [results[i] for i in range(len(jobs))]
