"""The one Ray Train shell: every mage_ray trainer runs through these functions.

A trainer is a plain per-worker loop ``worker(config) -> manifest`` that reports steps with
``ray.train.report`` (checkpoints attached every so often) and ends with :func:`report_final` (its artifact as
checkpoint ``final/``). The shell does the rest, the same way for backbones, value models and the offline
baselines:

- :func:`run_and_publish`: skip a complete ``out_dir``; check the workers can be placed (a clear error naming
  the config fields otherwise); fit one Ray Train V2 ``TorchTrainer`` (:func:`run_torch_trainer`: data
  parallel, ``FailureConfig(max_failures)``, a stable run name so a relaunch resumes from the last checkpoint);
  publish the ``final/`` artifact of its last checkpoint to ``out_dir`` atomically. An error a retry cannot fix
  (config, model, objective, data) ends the run at once as one ``RunFailed`` (:mod:`mage_ray.train.fail_fast`).
- :func:`run_pending`: a list of such runs: the complete ones skipped with one line each, one pending run in
  this process, several as concurrent Tune trials (:func:`run_concurrent`: Ray 2.60 runs Train V2 inside Tune
  with a per-trial *driver* that reserves no CPU; ``max_concurrent_trials`` is how many runs' workers fit).
- :func:`progress_printer`: a Train ``UserCallback`` (runs in the Train controller) printing one line per
  reported step in one format for every trainer (:func:`format_progress`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mage_ray.config import Config
from mage_ray.manifest import (
    MANIFEST_NAME,
    is_complete,
    is_uri,
    join,
    publish_dir,
    read_json,
    read_manifest,
    scratch_dir,
)
from mage_ray.train import fail_fast
from mage_ray.train.tune_runs import (  # noqa: F401  (the shell's names, re-exported)
    ConcurrentRunError,
    Scaling,
    max_concurrent_runs,
    run_concurrent,
    storage_abs,
)

FINAL = "final"
"""Subdirectory of the last Ray checkpoint that holds the finished artifact (adapter + manifest)."""
HF_CHECKPOINT = "checkpoint"
"""Subdirectory of a Ray checkpoint that holds a transformers Trainer checkpoint."""


def _quiet_worker(fn: Callable[[dict], Any], config: dict[str, Any]) -> Any:
    """Run a train loop with Ray Train's per-report INFO line (the whole metrics dict) turned off: our own
    progress line per step (:func:`format_progress`) says the same in one line."""
    try:  # Ray names that logger by the module's file path (logging.getLogger(__file__)), not its dotted name
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logs
        pass
    from mage_ray.devices import note_process, ray_gpu_ids, rehearsal_dir

    note_process("Ray Train worker")
    if rehearsal_dir() is not None and ray_gpu_ids():
        # Ray Train told accelerate (and so transformers' Trainer) to use this worker's logical GPU; a rehearsal
        # has no CUDA: the CPU stands in for it (mage_ray.devices)
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    return fn(config)


def worker_device(what: str) -> Any:
    """The torch device of a Ray Train worker's model (``what``, for messages): Ray Train's own choice (the
    worker's GPU when it got one, else cpu), through :func:`mage_ray.devices.place`. In a rehearsal (no CUDA) a
    worker that Ray gave a GPU asks for ``cuda`` and gets the CPU that stands in for it."""
    import ray.train.torch

    from mage_ray.devices import place, ray_gpu_ids, rehearsal_dir

    device = ray.train.torch.get_device()
    if rehearsal_dir() is not None and ray_gpu_ids():
        device = "cuda"
    return place(device, what)


SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record (in ``<storage_path>/<name>/``) of the checkpoints a run registered."""


def drop_unregistered_checkpoints(storage_path: str, name: str) -> list[str]:
    """Remove the ``checkpoint_*`` directories of run ``name`` that Ray's snapshot does not list; return them.

    A worker killed with its driver can finish writing a checkpoint for 2-3 s that the dead controller never
    registers; Ray ignores it on resume but never deletes it (``num_to_keep`` counts registered ones only). Local
    storage only (on a URI this returns []).
    """
    run = Path(storage_abs(storage_path)) / name
    if is_uri(storage_path) or not run.is_dir():
        return []
    keep: set[str] = set()
    if (run / SNAPSHOT).is_file():
        snap = read_json(run / SNAPSHOT)
        results = [*snap.get("checkpoint_results", []), snap.get("latest_checkpoint_result") or {}]
        keep = {r.get("checkpoint_dir_name") for r in results} - {None}
    dropped = sorted(d.name for d in run.glob("checkpoint_*") if d.is_dir() and d.name not in keep)
    for d in dropped:
        shutil.rmtree(run / d, ignore_errors=True)
    return dropped


def run_torch_trainer(
    train_loop_per_worker: Callable[[dict], Any],
    config: dict[str, Any],
    *,
    scaling: Scaling,
    storage_path: str,
    name: str,
    max_failures: int = 0,
    callbacks: Sequence[Any] = (),
    num_to_keep: int | None = 2,
):
    """Fit one Ray Train V2 ``TorchTrainer``; return its ``ray.train.Result``.

    ``name`` must be stable across relaunches (no timestamps): V2 restores a run with the same
    (storage_path, name) from its latest checkpoint. Inside a Tune trial the reported metrics are
    forwarded to Tune (``TuneReportCallback``). Raises ``ray.train.TrainingFailedError`` when workers
    fail more than ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    dropped = drop_unregistered_checkpoints(storage_path, name)
    if dropped:
        print(
            f"[{name}] removed {len(dropped)} checkpoint(s) Ray never registered (a killed run's)", flush=True
        )
    cbs = list(callbacks)
    if _in_tune_session():
        from ray.tune.integration.ray_train import TuneReportCallback

        cbs.append(TuneReportCallback())
    from mage_ray.devices import note_request, rehearsal_dir

    note_request("Ray Train run", scaling.worker_resources(), count=scaling.num_workers, detail=name)
    extra = {}
    if rehearsal_dir() is not None:  # logical GPUs, no CUDA: NCCL cannot start; gloo stands in for it
        from ray.train.torch import TorchConfig

        extra["torch_config"] = TorchConfig(backend="gloo")
    trainer = TorchTrainer(
        functools.partial(_quiet_worker, train_loop_per_worker),
        train_loop_config=config,
        scaling_config=scaling.scaling_config(),
        **extra,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_abs(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            callbacks=cbs,
        ),
    )
    return trainer.fit()


def restore_checkpoint(local_dir: str | Path, state: str = HF_CHECKPOINT) -> tuple[Path | None, Path | None]:
    """Download ``ray.train.get_checkpoint()`` into ``local_dir``.

    Returns ``(state_path, final_dir)``: the checkpoint's ``state`` entry to resume from (a transformers Trainer
    checkpoint directory, or :data:`STATE_FILE` of a :func:`step_worker`), and the finished artifact when the
    run had already completed (both None on a fresh start).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    local = Path(local_dir)
    ckpt.to_directory(str(local))
    final = local / FINAL
    if (final / MANIFEST_NAME).is_file():
        return None, final
    found = local / state
    return (found if found.exists() else None), None


def report_checkpoint(metrics: dict[str, Any], fill: Callable[[Path], Any]) -> None:
    """Rank 0 reports ``metrics`` with a checkpoint: a temporary directory that ``fill(directory)`` writes;
    other ranks report the metrics only (every worker must call ``ray.train.report`` the same number of times).

    Metrics never use the key ``done``: Tune reads it as "trial finished" and drops later results.
    """
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with scratch_dir("mage-ckpt") as tmp:
        fill(tmp)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))


def report_final(artifact_dir: str | Path, metrics: dict[str, Any]) -> None:
    """Report ``artifact_dir`` (its files, not ``checkpoints/``) as checkpoint ``final/`` (:func:`report_checkpoint`)."""
    ignore = shutil.ignore_patterns("checkpoints", ".*")
    report_checkpoint(metrics, lambda d: shutil.copytree(artifact_dir, d / FINAL, ignore=ignore))


# ---------------------------------------------------------------------------------------------
# The per-worker loop of every plain step trainer


STATE_FILE = "state.pt"
"""Ray checkpoint file of an unfinished :func:`step_worker` run: a snapshot {"step", "trainable", "optimizer",
"extra"}."""


@dataclass
class TrainContext:
    """What a plain step trainer needs from its runner. The defaults are a plain single process."""

    rank: int = 0
    world_size: int = 1
    device: Any = "cpu"
    wrap: Callable[[Any], Any] | None = None
    """Wraps the trainable model for data parallelism (Ray: ``ray.train.torch.prepare_model``)."""
    on_step: Callable[[int, dict[str, float], Callable[[], dict]], None] | None = None
    """Called after every optimizer step with (step (1-based), metrics, snapshot); ``snapshot()`` returns the
    resumable state {"step", "trainable", "optimizer", "extra"}."""
    resume: dict | None = None
    """A snapshot to continue from."""
    quiet: bool = False


def step_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train per-worker loop around a plain trainer ``train_fn(cfg, out_dir=..., ctx=TrainContext, **kwargs)
    -> manifest``: step reports, a checkpoint (:data:`STATE_FILE`) every ``checkpoint_every`` steps, resume from
    ``ray.train.get_checkpoint()``, the artifact reported as ``final/``.

    ``config`` keys: train_fn, cfg, kwargs, max_steps, checkpoint_every. A run that had already finished
    reports its artifact again. Every worker reports the same number of times (``ray.train.report`` is a
    barrier). The finished report says "finished", not "done": inside a Tune trial that key would end the
    trial before the driver publishes.
    """
    import ray.train
    import ray.train.torch
    import torch

    max_steps, every = int(config["max_steps"]), int(config["checkpoint_every"])
    finished = {"finished": 1.0, "step": float(max_steps)}
    tc = ray.train.get_context()
    world = tc.get_world_size()
    with scratch_dir("mage-step") as work:
        state, final = restore_checkpoint(work / "restored", STATE_FILE)
        if final is not None:
            report_final(final, finished)
            return read_json(final / MANIFEST_NAME)

        def on_step(step: int, m: dict[str, float], snapshot: Callable[[], dict]) -> None:
            if step == max_steps:  # the final report carries the artifact
                return
            metrics = {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}
            metrics["max_steps"] = max_steps
            if step % every == 0:
                report_checkpoint(metrics, lambda d: torch.save(snapshot(), d / STATE_FILE))
            else:
                ray.train.report(metrics)

        ctx = TrainContext(
            rank=tc.get_world_rank(),
            world_size=world,
            device=worker_device(f"model of {config['train_fn'].__name__}"),
            wrap=_wrap_ddp if world > 1 else None,
            on_step=on_step,
            resume=torch.load(state, weights_only=True) if state is not None else None,
            quiet=True,
        )
        out = work / "out"
        manifest = config["train_fn"](config["cfg"], out_dir=str(out), ctx=ctx, **config["kwargs"])
        report_final(out, finished)
        return manifest


def _wrap_ddp(model):
    """Data-parallel wrapper of a step trainer's model: Ray Train's ``prepare_model`` (DDP on the worker's device);
    in a rehearsal, where the worker's logical GPU is the CPU, plain CPU DDP over the gloo group."""
    from mage_ray.devices import rehearsal_dir

    if rehearsal_dir() is not None:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


def train_run_name(cfg: Config, out_dir: str) -> str:
    """Stable Ray Train run name for an artifact dir: its path below run_dir, '/' -> '--'."""
    root = storage_abs(cfg.storage.run_dir).rstrip("/")
    rel = (
        out_dir[len(root) :].strip("/")
        if out_dir.startswith(root + "/")
        else out_dir.rstrip("/").rsplit("/", 1)[-1]
    )
    return rel.replace("/", "--")


def progress_printer(label: str):
    """A Train ``UserCallback`` printing one line per reported step (:func:`format_progress`). It runs in the
    Train controller actor; Ray forwards its output to the driver's console. (Built on call: importing this
    module does not import Ray, so jobs can import trainers before ``init_ray`` sets Ray's log settings.)"""
    from ray.train.v2.api.callback import UserCallback

    class ProgressPrinter(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                print(format_progress(label, metrics[0], saved=checkpoint is not None), flush=True)

    return ProgressPrinter()


def format_progress(label: str, m: dict[str, Any], saved: bool = False) -> str:
    """One progress line from a reported metrics dict, for every trainer:
    ``[label] step k/K | reward .. | <objective> .. | kl .. | loss .. | margin .. | 4.3 s/step [ckpt]``."""
    if m.get("failed"):
        return f"[{label}] FAILED: {m.get('error', '')}"
    if m.get("complete") or m.get("finished"):
        return f"[{label}] done: {int(m.get('step', 0))} steps, artifact ready"
    parts = [f"[{label}] step {int(m.get('step', 0))}/{int(m.get('max_steps', 0))}"]
    if "reward" in m:
        parts.append(f"reward {m['reward']:.4f}")
    objs = [
        (k[len("rewards/") : -len("/mean")], v)
        for k, v in m.items()
        if k.startswith("rewards/") and k.endswith("/mean")
    ]
    if objs:
        parts.append(" ".join(f"{k} {v:.4f}" for k, v in objs))
    if "kl" in m:
        parts.append(f"kl {m['kl']:.2e}")
    if "loss" in m and "reward" not in m:
        parts.append(f"loss {m['loss']:.4f}")
    for k in ("train_token_mse", "margin", "accuracy", "alpha", "round"):
        if k in m:
            parts.append(f"{k} {m[k]:.4g}")
    secs = m.get("wall_step_s", m.get("step_time_s"))
    if secs is not None:
        parts.append(f"{secs:.1f} s/step")
    return " | ".join(parts) + (" [ckpt]" if saved else "")


# ---------------------------------------------------------------------------------------------
# One run, published


def run_and_publish(
    worker: Callable[[dict], Any],
    config: dict[str, Any],
    out_dir: str,
    *,
    cfg: Config,
    scaling: Scaling,
    run_name: str,
    label: str,
    field_prefix: str = "backbone",
    progress: bool = True,
    check_result: Callable[[Any], None] | None = None,
    manifest_extra: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run ``worker`` as one Ray Train run and publish its ``final/`` artifact to ``out_dir``; return the manifest.

    A complete ``out_dir`` is returned as is. Ray Train state lives under ``<run_dir>/ray/<run_name>``
    (``run_name`` must be stable: a relaunch resumes from its last checkpoint). ``check_result(result)`` may
    raise on a result the trainer flags as failed; ``manifest_extra(result)`` adds fields to the manifest.
    """
    out_dir = storage_abs(out_dir)
    if is_complete(out_dir):
        return read_manifest(out_dir) or {}
    max_concurrent_runs(
        scaling, 1, field_prefix
    )  # fail fast (clear message) when workers can never be placed
    # An error a retry cannot fix is returned by the workers, not raised (not retried): raise_if_failed below.
    result = run_torch_trainer(
        functools.partial(fail_fast.worker_loop, worker),
        config,
        scaling=scaling,
        storage_path=join(storage_abs(cfg.storage.run_dir), "ray"),
        name=run_name,
        max_failures=cfg.backbone.max_failures,
        callbacks=[progress_printer(label)] if progress else [],
    )
    if check_result is not None:
        check_result(result)
    fail_fast.raise_if_failed(result, label)
    if result.checkpoint is None:
        raise RuntimeError(f"{label}: the Ray Train run {result.path} finished without a final checkpoint")
    with scratch_dir("mage-publish") as tmp:
        result.checkpoint.to_directory(str(tmp))
        final = tmp / FINAL
        if not (final / MANIFEST_NAME).is_file():
            raise RuntimeError(f"{label}: the latest checkpoint of {result.path} holds no finished artifact")
        manifest = read_json(final / MANIFEST_NAME)
        manifest["ray_train_run"] = result.path
        manifest.update(manifest_extra(result) if manifest_extra is not None else {})
        (final / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        publish_dir(final, out_dir)
    return manifest


def run_pending(
    run_one: Callable[..., dict],
    jobs: Sequence[dict[str, Any]],
    *,
    cfg: Config,
    scaling: Scaling,
    experiment: str,
    labels: Sequence[str],
    max_concurrent: int | None = None,
    field_prefix: str = "backbone",
) -> list[dict[str, Any]]:
    """Run ``run_one(**job)`` for every job whose ``out_dir`` is not complete: one in this process, several as
    concurrent Tune trials (:func:`run_concurrent`); complete ones are skipped with one line each. Returns
    every job's manifest, in job order."""
    jobs, labels = list(jobs), list(labels)
    pending = [i for i, j in enumerate(jobs) if not is_complete(j["out_dir"])]
    for i, j in enumerate(jobs):
        if i not in pending:
            print(f"[{labels[i]}] complete, skipping ({j['out_dir']})", flush=True)
    if len(pending) == 1:
        run_one(**jobs[pending[0]])
    elif pending:
        run_concurrent(
            functools.partial(_summary_of, run_one),
            [jobs[i] for i in pending],
            scaling=scaling,
            storage_path=join(storage_abs(cfg.storage.run_dir), "ray"),
            name=experiment,
            labels=[labels[i] for i in pending],
            max_concurrent=max_concurrent,
            field_prefix=field_prefix,
        )
    return [read_manifest(j["out_dir"]) or {} for j in jobs]


def _summary_of(run_one: Callable[..., dict], **job: Any) -> dict[str, Any]:
    """A Tune trial's small JSON result: the manifest's name, steps and status (the artifact is on disk)."""
    m = run_one(**job)
    return {k: m.get(k) for k in ("name", "objective", "steps_done", "steps", "status")}
