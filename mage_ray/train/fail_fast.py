"""Errors a retry cannot fix end a Ray Train run at once, as one message; crashed workers are still retried.

Ray Train V2 restarts the worker group on *any* worker error, up to ``FailureConfig(max_failures)`` times, and
its failure policy cannot be told which errors are deterministic. A missing model, a bad config value, an
objective that cannot load or data that cannot be read fail the same way on every attempt: each retry costs a
worker-group start and another screen of tracebacks. So every trainer's per-worker loop runs inside
:func:`worker_loop`: an exception of a permanent type (:func:`_permanent`) is caught in the worker and *returned* as
``{PERMANENT_ERROR: "<Type>: <message in one line>"}`` -- the run then ends normally, the driver reads rank 0's
return value (``Result.return_value``) and :func:`raise_if_failed` raises :class:`RunFailed` with that one
line. Anything else (a worker process that dies, a lost collective, an out-of-memory kill, a connection reset)
is raised as before and retried from the last checkpoint.

The backbone worker follows the same pattern for an objective failing mid-training
(``ObjectiveFailure``, reported by every rank together by its failure gate). An error that hits only some
ranks of a multi-worker run leaves the others waiting in their next collective; the deterministic errors
caught here (config, model, objective loading, data) hit every rank alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mage_ray.config import ConfigError

PERMANENT_ERROR = "permanent_error"
"""Key of a worker's return value that carries an error no retry can fix (one line)."""


class RunFailed(RuntimeError):
    """A Ray Train run stopped on an error that a retry cannot fix; the message is one line naming the run."""


def _permanent() -> tuple[type[BaseException], ...]:
    """The exception types no retry can fix (imported when an error is caught: the worker has loaded these modules).
    Other OSErrors (ConnectionError, TimeoutError, ...) and RuntimeErrors (lost collectives, CUDA OOM) are
    retried."""
    from mage_ray.models import ModelLoadError
    from mage_ray.tasks.hf_rewards import RewardModelError
    from mage_ray.tasks.objectives import ObjectiveError
    from mage_ray.tasks.prompts import TaskDataError

    return (
        ConfigError,
        ObjectiveError,
        RewardModelError,
        TaskDataError,
        ModelLoadError,  # wraps from_pretrained's OSError: not found, not cached and no network, ...
        ValueError,  # bad values reaching a trainer (config-type errors of the libraries, too)
        TypeError,
        ImportError,  # a missing optional package
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    )


def one_line(e: BaseException) -> str:
    """``<Type>: <message>`` with the message's lines joined: one line for the driver's ``error:``."""
    text = " ".join(part.strip() for part in str(e).strip().splitlines() if part.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def worker_loop(worker: Callable[[dict], Any], config: dict[str, Any]) -> Any:
    """Ray Train per-worker loop around ``worker(config)``: a permanent error is returned, not raised (see the
    module docstring), so FailureConfig does not restart the workers for it."""
    try:
        return worker(config)
    except _permanent() as e:
        return {PERMANENT_ERROR: one_line(e)}


def raise_if_failed(result: Any, label: str) -> None:
    """Raise RunFailed when rank 0 returned a :func:`worker_loop` failure (``result``: a ``ray.train.Result``)."""
    rv = result.return_value
    if isinstance(rv, dict) and PERMANENT_ERROR in rv:
        raise RunFailed(f"{label}: {rv[PERMANENT_ERROR]} (not retried: the same error would recur)")
