"""Where a model goes and where it comes from: the one rule every model placement follows, and the rehearsal's
ledger of who asked Ray for what and what each process then did with it.

**Placement** (:func:`place`): every model mage_ray loads (the policy, reward models, the sentence encoder, value
heads, the decode engine, a training worker's model) asks ``place(device, what)`` for its torch device. ``cpu``
stays ``cpu``. ``cuda`` (or ``cuda:k``) is returned only when this process can use a GPU; otherwise it raises
:class:`PlacementError` naming the model and the process, instead of silently decoding a 7B model on a CPU or
crashing deep inside torch. On a Ray cluster a process can use a GPU only when Ray assigned it one (a task, actor,
Train worker or Serve replica that requested ``GPU``): Ray hides every GPU from the others (it sets
``CUDA_VISIBLE_DEVICES`` to the assigned ids), so the check is the same one the cluster makes, made early.

**Rehearsal** (``MAGE_RAY_REHEARSAL`` = a ledger directory; set by ``mage-ray rehearse``, see
:mod:`mage_ray.rehearse`): a config written for GPUs runs on a CPU machine whose local Ray declares logical GPUs.
There ``place("cuda", ...)`` returns ``cpu`` **only in a process to which Ray assigned a GPU**, and raises
:class:`PlacementError` (after writing the violation to the ledger) anywhere else, e.g. in a Tune trial that
reserved only a CPU, or in the job's driver. Every placement, every resource request the code makes
(:func:`note_request`) and every process Ray started with resources (:func:`note_process`) is appended to the
ledger, stamped with the pipeline stage the driver is in (:func:`set_stage`); :mod:`mage_ray.rehearse` turns it
into the per-stage table of what was requested, what was assigned and which models went on which GPU.

**Hub map** (``MAGE_RAY_HUB_MAP`` = JSON ``{hub id: local directory}``): hub ids of models and datasets that
resolve to local directories instead (:func:`hub_source`). The rehearsal uses it to put tiny random stand-ins
behind the config's own hub ids, so the config itself is unchanged; a cluster can use it for a local mirror.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = [
    "HUB_MAP_ENV",
    "REHEARSAL_ENV",
    "PlacementError",
    "assigned_resources",
    "hub_source",
    "note_process",
    "note_request",
    "place",
    "process_name",
    "ray_gpu_ids",
    "rehearsal_dir",
    "set_stage",
]

REHEARSAL_ENV = "MAGE_RAY_REHEARSAL"
"""Directory of the rehearsal ledger; when set, this process takes part in a rehearsal."""
HUB_MAP_ENV = "MAGE_RAY_HUB_MAP"
"""JSON object mapping hub ids (models, datasets) to local directories."""
STAGE_FILE = "stage"
"""File in the ledger directory holding the stage the driver is in."""


class PlacementError(RuntimeError):
    """A model is placed on a device this process cannot use (a GPU that Ray did not assign to it)."""


# ---------------------------------------------------------------------------------------------
# This process


def _ray_worker() -> bool:
    """True in a process Ray started (task, actor, Train worker, Serve replica); False in a driver or plain process."""
    try:
        import ray

        if not ray.is_initialized():
            return False
        from ray._private.worker import WORKER_MODE, global_worker

        return global_worker.mode == WORKER_MODE
    except Exception:  # noqa: BLE001 - no Ray, or a Ray without these internals: not a worker
        return False


def ray_gpu_ids() -> list[str]:
    """The GPU ids Ray assigned to this process ([] in a driver, a plain process, or a process given none)."""
    if not _ray_worker():
        return []
    import ray

    return [str(i) for i in ray.get_gpu_ids()]


def assigned_resources() -> dict[str, float]:
    """The resources Ray assigned to this process ({} outside a Ray worker)."""
    if not _ray_worker():
        return {}
    import ray

    res = ray.get_runtime_context().get_assigned_resources()
    return {k: round(float(v), 4) for k, v in res.items() if not k.startswith(("node:", "bundle_group"))}


def process_name() -> str:
    """What this process is, for messages: ``the driver (pid 12)`` or ``Ray worker pid 34 (<task or actor>)``."""
    pid = os.getpid()
    if not _ray_worker():
        return f"the driver (pid {pid})"
    import ray

    ctx = ray.get_runtime_context()
    who = None
    try:
        actor = ctx.get_actor_name() or (ctx.current_actor and type(ctx.current_actor).__name__)
    except Exception:  # noqa: BLE001 - not an actor
        actor = None
    if ctx.get_actor_id():
        who = f"actor {actor}" if actor else "actor"
    try:
        task = ctx.get_task_function_name() or ctx.get_task_name()
    except Exception:  # noqa: BLE001
        task = None
    if task:
        who = f"{who}, task {task}" if who else f"task {task}"
    return f"Ray worker pid {pid}" + (f" ({who})" if who else "")


# ---------------------------------------------------------------------------------------------
# Placement


def place(device: Any, what: str) -> str:
    """The torch device a model (``what``: e.g. ``"reward model 'Ray2333/gpt2-large-helpful-reward_model'"``) goes
    on when the config puts it on ``device``: ``device`` itself, or ``cpu`` for a GPU in a rehearsal.

    Raises PlacementError for a GPU device in a process that cannot use one (module docstring)."""
    dev = str(device)
    if not dev.startswith("cuda"):
        return dev
    ledger = rehearsal_dir()
    if ledger is not None:
        gpus = ray_gpu_ids()
        _append(ledger, {"kind": "place", "what": what, "device": dev, "gpu_ids": gpus, "ok": bool(gpus)})
        if not gpus:
            raise PlacementError(
                f"rehearsal: stage {current_stage()!r}: {what} is placed on {dev} in {process_name()}, to which "
                f"Ray assigned no GPU (assigned: {_fmt(assigned_resources())})"
            )
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return dev
    why = (
        f"Ray assigned it {_fmt(assigned_resources())}: request a GPU for this work"
        if _ray_worker()
        else "it has no usable GPU (CUDA build of torch, a driver, a visible device)"
    )
    raise PlacementError(f"{what} is configured for {dev}, but {process_name()} cannot use a GPU: {why}")


def _fmt(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}" if res else "nothing"


# ---------------------------------------------------------------------------------------------
# Hub map


def hub_source(name: str) -> str:
    """The local directory ``MAGE_RAY_HUB_MAP`` maps hub id ``name`` to, else ``name`` unchanged."""
    raw = os.environ.get(HUB_MAP_ENV)
    if not raw:
        return name
    try:
        table = json.loads(raw)
    except json.JSONDecodeError:
        raise PlacementError(f"{HUB_MAP_ENV} is not a JSON object of hub id -> local directory") from None
    return str(table.get(name, name)) if isinstance(table, dict) else name


# ---------------------------------------------------------------------------------------------
# The rehearsal ledger


def rehearsal_dir() -> Path | None:
    """The ledger directory of the rehearsal this process takes part in, or None."""
    raw = os.environ.get(REHEARSAL_ENV)
    return Path(raw) if raw else None


def set_stage(stage: str) -> None:
    """The driver enters ``stage``: later ledger entries (of every process) are stamped with it."""
    ledger = rehearsal_dir()
    if ledger is None:
        return
    ledger.mkdir(parents=True, exist_ok=True)
    tmp = ledger / f".{STAGE_FILE}.{os.getpid()}"
    tmp.write_text(stage)
    os.replace(tmp, ledger / STAGE_FILE)
    _append(ledger, {"kind": "stage", "stage_started": stage})


def current_stage() -> str:
    ledger = rehearsal_dir()
    try:
        return (ledger / STAGE_FILE).read_text().strip() if ledger is not None else ""
    except OSError:
        return ""


def note_request(who: str, resources: dict[str, Any], count: int = 1, detail: str = "") -> None:
    """Record that the code asks Ray for ``count`` x ``resources`` for ``who`` (a Train run's workers, a Tune
    trial, a Data actor, a Serve replica; ``detail``: which one, e.g. the run's name). No-op outside a rehearsal."""
    ledger = rehearsal_dir()
    if ledger is None:
        return
    res = {k: float(v) for k, v in (resources or {}).items() if v}
    _append(ledger, {"kind": "request", "who": who, "detail": detail, "resources": res, "count": int(count)})


def note_process(role: str) -> None:
    """Record this process's role and what Ray assigned it (called where Ray starts work that asked for
    resources). No-op outside a rehearsal."""
    ledger = rehearsal_dir()
    if ledger is None:
        return
    _append(ledger, {"kind": "process", "role": role, "gpu_ids": ray_gpu_ids()})


def _append(ledger: Path, event: dict[str, Any]) -> None:
    """One JSON line in this process's own ledger file (no two processes write the same file)."""
    event = {
        "t": time.time(),
        "stage": event.pop("stage", None) or current_stage(),
        "pid": os.getpid(),
        "process": process_name(),
        "assigned": assigned_resources(),
        **event,
    }
    events = ledger / "events"
    events.mkdir(parents=True, exist_ok=True)
    with open(events / f"{os.getpid()}.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")
