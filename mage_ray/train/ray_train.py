"""Stage 1 backbone runs on the Ray Train shell (:mod:`mage_ray.train.ray_shell`).

Backbones (Eq. 11-12): :func:`train_backbones` trains the n columns of B(beta) concurrently,
:func:`train_morlhf` one model per preference (w = mu). Each run's per-worker code is
:func:`mage_ray.train.backbone.train_backbone`, the plain function, wrapped by :func:`backbone_worker`
(transformers Trainer callbacks: :class:`ReportToRayCallback` reports every logged step to Ray Train and
attaches the Trainer checkpoint; :func:`restore_checkpoint` brings it back in a restarted worker). Results
land in ``<run_dir>/backbones/beta_<beta>/<name>/`` and ``<run_dir>/morlhf/mu_<...>/`` (adapter/,
manifest.json, metrics.jsonl); a directory whose manifest says ``complete`` is not retrained. Ray Train's own
state (checkpoints) lives under ``<run_dir>/ray`` with stable run names, so a relaunched job also resumes an
interrupted backbone from its last checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from mage_ray.config import Config
from mage_ray.manifest import MANIFEST_NAME, is_complete, read_json, read_manifest, scratch_dir
from mage_ray.train.ray_shell import (
    HF_CHECKPOINT,
    Scaling,
    report_checkpoint,
    report_final,
    restore_checkpoint,
    run_and_publish,
    run_pending,
    storage_abs,
    train_run_name,
    worker_device,
)
from mage_ray.train.stage1 import (
    _fmt,
    backbone_dir,
    backbone_plan,
    morlhf_dir,
    prepare_sft_base,
    validate_reward_weights,
)

__all__ = [
    "FailOnceCallback",
    "ReportToRayCallback",
    "backbone_dir",
    "backbone_worker",
    "morlhf_dir",
    "prepare_sft_base",
    "train_backbone_ray",
    "train_backbones",
    "train_morlhf",
]

FAIL_AT_STEP_ENV = "MAGE_RAY_FAIL_AT_STEP"
FAIL_MARKER_ENV = "MAGE_RAY_FAIL_MARKER"


def _numeric(logs: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class ReportToRayCallback(TrainerCallback):
    """Report each logged training step to Ray Train; attach the Trainer checkpoint when it saves one.

    Steps whose checkpoint the Trainer is about to save are reported once, from ``on_save``, together with
    that checkpoint (Ray checkpoint layout: ``checkpoint/`` = the Trainer's ``checkpoint-<step>``: adapter,
    optimizer, scheduler, RNG and trainer state). Only log entries holding ``key`` count as steps (the
    end-of-training summary does not). Every worker reports the same number of times (``ray.train.report``
    is a barrier across workers).
    """

    def __init__(self, max_steps: int, key: str = "reward"):
        self.max_steps = max_steps
        self.key = key
        self._pending: dict[str, float] | None = None
        self._t = time.time()
        self.report_seconds = 0.0
        """Time this worker spent in ``ray.train.report`` (+ checkpoint copy): Ray's share of the loop."""

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        import ray.train

        if not logs or self.key not in logs:
            return
        now = time.time()
        metrics = {
            **_numeric(logs),
            "step": state.global_step,
            "max_steps": self.max_steps,
            "wall_step_s": now - self._t,  # optimizer step + logging, as seen by this worker
        }
        if control.should_save:
            self._pending = metrics
        else:
            t = time.perf_counter()
            ray.train.report(metrics)
            self.report_seconds += time.perf_counter() - t

    def on_save(self, args, state, control, **kwargs):
        import ray.train

        metrics, self._pending = (self._pending or {"step": state.global_step}), None
        src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        t = time.perf_counter()
        if src.is_dir():  # rank 0 attaches it, the others report the metrics
            report_checkpoint(metrics, lambda d: shutil.copytree(src, d / HF_CHECKPOINT))
        else:
            ray.train.report(metrics)
        self.report_seconds += time.perf_counter() - t


class FailOnceCallback(TrainerCallback):
    """Test hook: the rank-0 worker hard-exits (``os._exit(1)``) at the end of ``step``, once.

    ``marker`` (a path every attempt sees) is created just before exiting; when it exists the hook does
    nothing, so the restarted worker group trains on. Before exiting it waits ``delay_s``: the V2 controller
    collects reports by polling workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` = 2 s), and a report
    still queued in a dying worker is lost, so a real crash within ~2 s of a checkpoint resumes from the
    checkpoint before it.
    """

    def __init__(self, step: int, marker: str, delay_s: float = 5.0):
        self.step = int(step)
        self.marker = str(marker)
        self.delay_s = float(delay_s)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero and not os.path.exists(self.marker):
            Path(self.marker).touch()
            time.sleep(self.delay_s)
            os._exit(1)


def _fault_injection_from_env() -> dict[str, Any] | None:
    """``MAGE_RAY_FAIL_AT_STEP=k`` (+ ``MAGE_RAY_FAIL_MARKER=path``) on the job driver: kill a worker once."""
    step = os.environ.get(FAIL_AT_STEP_ENV)
    if not step:
        return None
    marker = os.environ.get(FAIL_MARKER_ENV) or os.path.join(tempfile.gettempdir(), "mage_ray_fail_once")
    return {"step": int(step), "marker": marker}


# ---------------------------------------------------------------------------------------------
# Backbones


def backbone_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train per-worker loop: :func:`train_backbone` with step reports, checkpoints and resume.

    ``config`` keys: cfg (Config), w, name, steps, and optionally objectives, prompts, extra_manifest,
    fault_injection ({step, marker[, delay_s]}, see :class:`FailOnceCallback`). Resumes from ``ray.train.get_checkpoint()``
    (adapter + optimizer + scheduler + step) after a worker failure; an objective failure is reported as
    ``{"failed": 1, "error": ...}`` and returned as ``{"failed": True, "error": ...}`` (the driver reads the
    rank-0 return value: ``Result.metrics`` only holds metrics attached to checkpoints); it is not raised
    because retrying a deterministic error is pointless.
    """
    import ray.train

    from mage_ray.train.backbone import ObjectiveFailure, train_backbone

    # TRL moves the policy to the device accelerate picks (this worker's GPU); recorded and checked here
    worker_device(f"policy (TRL {config['cfg'].backbone.trainer} trainer)")
    with scratch_dir("mage-backbone") as work:
        resume, final = restore_checkpoint(work / "restored")
        if final is not None:  # the run had finished: report the artifact again
            report_final(
                final, {"complete": 1.0, "step": float(read_json(final / MANIFEST_NAME)["steps_done"])}
            )
            return read_json(final / MANIFEST_NAME)
        reporter = ReportToRayCallback(config["steps"])
        callbacks: list[TrainerCallback] = [reporter]
        if config.get("fault_injection"):
            callbacks.append(FailOnceCallback(**config["fault_injection"]))
        out = work / "out"
        try:
            manifest = train_backbone(
                config["cfg"],
                config["w"],
                out,
                name=config["name"],
                steps=config["steps"],
                objectives=config.get("objectives"),
                prompts=config.get("prompts"),
                callbacks=callbacks,
                resume_checkpoint=resume,
                quiet=True,
                extra_manifest=config.get("extra_manifest"),
                init_adapter=config.get("init_adapter"),
            )
        except ObjectiveFailure as e:
            error = str(e).split("; last checkpoint:")[
                0
            ]  # the worker's local checkpoint path means nothing here
            ray.train.report({"failed": 1.0, "error": error})  # every rank fails at the same step (gate)
            return {"failed": True, "error": error}
        final_metrics = {"complete": 1.0, "step": float(manifest["steps_done"])}
        report_final(out, {**final_metrics, "ray_report_s": reporter.report_seconds})
        return manifest


def train_backbone_ray(
    cfg: Config,
    w: Sequence[float],
    *,
    name: str,
    out_dir: str,
    steps: int | None = None,
    objectives: Sequence[Callable] | None = None,
    prompts: Sequence[str] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    fault_injection: dict[str, Any] | None = None,
    progress: bool = True,
    init_adapter: str | None = None,
) -> dict[str, Any]:
    """Train one backbone as a Ray Train run and publish it to ``out_dir``; return its manifest.

    ``init_adapter``: an adapter directory to start from (see :func:`mage_ray.train.backbone.train_backbone`).

    Skips training when ``out_dir`` already holds a complete manifest. Raises ObjectiveFailure (with the
    last Ray checkpoint's path) when an objective fails, TrainingFailedError past ``max_failures``.
    """
    from mage_ray.train.backbone import ObjectiveFailure

    out_dir = storage_abs(out_dir)
    if is_complete(out_dir):
        return read_manifest(out_dir) or {}
    n = len(objectives) if objectives is not None else cfg.n_objectives
    w_arr = validate_reward_weights(w, n)
    steps = cfg.backbone.steps if steps is None else int(steps)
    loop_config = {
        "cfg": cfg,
        "w": w_arr.tolist(),
        "name": name,
        "steps": steps,
        "objectives": list(objectives) if objectives is not None else None,
        "prompts": list(prompts) if prompts is not None else None,
        "extra_manifest": extra_manifest,
        "fault_injection": fault_injection,
        "init_adapter": init_adapter,
    }

    def check(
        result,
    ) -> None:  # an objective that failed inside the worker: not retried, named with its checkpoint
        rv = result.return_value if isinstance(result.return_value, dict) else {}
        if rv.get("failed"):
            last = result.checkpoint.path if result.checkpoint is not None else None
            raise ObjectiveFailure(
                f"{rv.get('error')}; last checkpoint: {last or 'none saved yet'}", checkpoint=last
            )

    return run_and_publish(
        backbone_worker,
        loop_config,
        out_dir,
        cfg=cfg,
        scaling=Scaling.from_backbone(cfg.backbone),
        run_name=train_run_name(cfg, out_dir),
        label=name,
        progress=progress,
        check_result=check,
        # rank 0's time in ray.train.report, this attempt
        manifest_extra=lambda result: {"ray_report_s": (result.metrics or {}).get("ray_report_s")},
    )


def _train_many(
    cfg: Config, jobs: list[dict[str, Any]], experiment: str, max_concurrent: int | None
) -> list[dict]:
    """Train every job not complete yet (concurrently when more than one), then read all manifests."""
    labels = [j["name"] for j in jobs]
    scaling = Scaling.from_backbone(cfg.backbone)
    return run_pending(
        train_backbone_ray,
        jobs,
        cfg=cfg,
        scaling=scaling,
        experiment=experiment,
        labels=labels,
        max_concurrent=max_concurrent,
    )


def train_backbones(
    cfg: Config,
    *,
    beta: float | None = None,
    steps: int | None = None,
    weights: Sequence[Sequence[float]] | None = None,
    names: Sequence[str] | None = None,
    objectives: Sequence[Callable] | None = None,
    prompts: Sequence[str] | None = None,
    max_concurrent: int | None = None,
    progress: bool = True,
    fault_injection: dict[str, Any] | None = None,
    init_adapters: Sequence[str] | None = None,
) -> list[dict]:
    """Train the n backbones of B(beta) (Eq. 12; backbone i on w_i = column i) concurrently; return manifests.

    ``weights`` overrides the columns (one reward-weight vector per backbone); ``names`` default to
    ``b0..b{n-1}``; ``init_adapters`` (one adapter directory per backbone) warm-starts them. Results go to ``<run_dir>/backbones/beta_<beta>/<name>/``; complete ones are skipped.
    ``backbone.trainer = 'wrpo'`` dispatches to :func:`mage_ray.train.wrpo.train_wrpo_backbones` (offline,
    from scored rollouts and source models; same output layout).
    """

    if cfg.backbone.trainer == "wrpo":  # offline preference trainer: same layout, same manifests
        from mage_ray.train.wrpo import train_wrpo_backbones

        if prompts is not None or fault_injection is not None:
            raise ValueError(
                "backbone.trainer = 'wrpo' trains on the scored rollouts: prompts= and fault_injection= "
                "apply to the GRPO/RLOO trainers only"
            )
        return train_wrpo_backbones(
            cfg,
            beta=beta,
            steps=steps,
            names=names,
            weights=weights,
            objectives=objectives,
            max_concurrent=max_concurrent,
            progress=progress,
        )
    cfg = prepare_sft_base(cfg)
    beta, ws, names = backbone_plan(cfg, beta, weights, names, objectives)
    fault = fault_injection if fault_injection is not None else _fault_injection_from_env()
    if init_adapters is not None and len(init_adapters) != len(ws):
        raise ValueError(f"init_adapters must hold {len(ws)} adapter directories, got {len(init_adapters)}")
    common = dict(
        steps=steps, objectives=objectives, prompts=prompts, fault_injection=fault, progress=progress
    )
    jobs = [
        dict(
            cfg=cfg,
            w=w.tolist(),
            name=nm,
            out_dir=backbone_dir(cfg, beta, nm),
            extra_manifest={"kind": "backbone", "beta": beta, "index": i},
            init_adapter=None if init_adapters is None else init_adapters[i],
            **common,
        )
        for i, (w, nm) in enumerate(zip(ws, names))
    ]
    return _train_many(cfg, jobs, experiment=f"backbones-beta_{_fmt(beta)}", max_concurrent=max_concurrent)


def train_morlhf(
    cfg: Config,
    grid: Sequence[Sequence[float]] | np.ndarray,
    *,
    steps: int | None = None,
    objectives: Sequence[Callable] | None = None,
    prompts: Sequence[str] | None = None,
    max_concurrent: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """MORLHF baseline: one model per preference mu of ``grid`` trained on w = mu (same trainer as backbones)."""
    from mage_ray.soup import validate_preference

    cfg = prepare_sft_base(cfg)
    n = len(objectives) if objectives is not None else cfg.n_objectives
    mus = [validate_preference(mu, n, name="grid[]") for mu in np.asarray(grid, dtype=float)]
    common = dict(steps=steps, objectives=objectives, prompts=prompts, progress=progress)
    jobs = [
        dict(
            cfg=cfg,
            w=mu.tolist(),
            name=morlhf_dir(cfg, mu).rsplit("/", 1)[-1],
            out_dir=morlhf_dir(cfg, mu),
            extra_manifest={"kind": "morlhf", "mu": mu.tolist(), "beta": None},
            **common,
        )
        for mu in mus
    ]
    return _train_many(cfg, jobs, experiment="morlhf", max_concurrent=max_concurrent)
