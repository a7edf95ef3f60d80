"""Ray Tune sweeps of beta (trains backbones), then alpha and gamma (decode only), by hypervolume.

MAGE Sec 5.2.1: beta in {0.6, 0.7, 0.8} is chosen by the hypervolume of the Bone Soup front after
~20% of the training steps; alpha in {0.1..0.5} (Eq. 13) and gamma (Eq. 25) are chosen on validation
prompts. Tune's ``param_space`` keys are config field paths (``backbone.beta``, ``decode.alpha``,
``decode.gamma``): a trial is the job's own config with those fields overridden (STYLE.md #4).

Every Tune run keeps its state under ``<run_dir>/tune/<stage>``; a sweep that is killed and resubmitted
restores it with ``Tuner.restore`` and does not re-run finished trials. A trial that fails is reported
with its error and does not sink the sweep (the best of the successful trials wins).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.config import Config, config_from_dict

log = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """Every trial of a sweep stage failed, or the sweep cannot start."""


def trial_config(base: dict, params: dict[str, Any]) -> Config:
    """The job config with a trial's ``section.field`` values applied (validated)."""
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in params.items() if "." in k]
    return config_from_dict(base, overrides)


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def storage_uri(cfg: Config) -> str:
    """Tune wants an absolute local path or a URI."""
    p = cfg.storage.storage_path
    return p if "://" in p else str(Path(p).resolve())


def run_tune_stage(
    cfg: Config,
    stage: str,
    trainable: Callable,
    param_space: dict,
    *,
    metric: str = "hv",
    resources: dict[str, float] | None = None,
    max_concurrent: int | None = None,
):
    """Run (or restore) one Tune stage; return (best_params, rows) where rows are per-trial dicts.

    ``trainable(trial_params: dict) -> None`` must call ``ray.tune.report({metric: ...})``.
    """
    from ray import tune

    storage = f"{storage_uri(cfg).rstrip('/')}/{cfg.storage.run_name}/tune"
    name = stage
    path = f"{storage}/{name}"
    fn = tune.with_resources(trainable, resources or {"cpu": 1})
    if tune.Tuner.can_restore(path):
        log.warning("resuming Tune stage %r from %s (finished trials are not re-run)", stage, path)
        print(f"[sweep] resuming stage {stage!r} from {path}; finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            fn,
            param_space=param_space,
            # No metric here: Train-inside-Tune trials also forward every training step to Tune, and only
            # the trial's last report carries the HV; the best trial is picked below from the final results.
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent or cfg.sweep.max_concurrent_trials or None
            ),
            run_config=tune.RunConfig(
                storage_path=storage, name=name, verbose=1, failure_config=tune.FailureConfig(max_failures=0)
            ),
        )
    grid = tuner.fit()
    rows = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items()}
        row = {
            **params,
            metric: (r.metrics or {}).get(metric),
            "error": None
            if r.error is None
            else f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else ''}",
        }
        for k, v in (r.metrics or {}).items():
            if k.startswith("hv_") or k in ("controllability", "inner_product", "train_seconds"):
                row[k] = v
        rows.append(row)
    ok = [r for r in rows if r["error"] is None and r.get(metric) is not None and np.isfinite(r[metric])]
    for r in rows:
        if r["error"] is not None:
            print(f"[sweep] stage {stage!r}: trial {_params(r)} FAILED: {r['error']}", flush=True)
    if not ok:
        raise SweepError(
            f"every trial of sweep stage {stage!r} failed; first error: {rows[0]['error'] if rows else 'no trials'}"
        )
    best = max(ok, key=lambda r: r[metric])
    return {k: best[k] for k in param_space}, rows


def _params(row: dict) -> dict:
    return {k: v for k, v in row.items() if "." in k}


def plot_sweep(rows: list[dict], param: str, path: str | Path, metric: str = "hv") -> None:
    """HV vs one swept parameter (failed trials marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted([r for r in rows if r.get(metric) is not None and r["error"] is None], key=lambda r: r[param])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r[param] for r in ok], [r[metric] for r in ok], "o-")
    for r in rows:
        if r["error"] is not None:
            ax.axvline(r[param], color="red", alpha=0.3, ls="--")
    ax.set_xlabel(param)
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def rows_markdown(rows: list[dict], params: list[str], metric: str = "hv") -> str:
    head = "| " + " | ".join(params) + f" | validation {metric} | error |"
    lines = [head, "|" + "---|" * (len(params) + 2)]
    for r in sorted(rows, key=lambda r: tuple(r[p] for p in params)):
        v = r.get(metric)
        lines.append(
            "| "
            + " | ".join(str(r[p]) for p in params)
            + f" | {'' if v is None else f'{v:.5g}'} | "
            + (r["error"] or "")
            + " |"
        )
    return "\n".join(lines) + "\n"
