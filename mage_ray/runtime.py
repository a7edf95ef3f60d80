"""What every job does first: parse ``--config`` + overrides, connect to (or start) Ray."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
import warnings

from mage_ray.config import Config, ConfigError, add_config_args, load_config
from mage_ray.config.load import HelpFormatter


def parse_job_args(
    description: str, extra=None, argv: list[str] | None = None, prog: str | None = None
) -> tuple[argparse.Namespace, Config]:
    """``--config FILE [section.field=value ...]`` (+ job-specific flags via ``extra(parser)``).

    Overrides may stand anywhere, also after a flag's value (``--bundle DIR a.b=1 --out X c.d=2``):
    the arguments are parsed intermixed. ``argv`` defaults to ``sys.argv[1:]``. A bad config, or anything else
    :mod:`mage_ray.preflight` finds (a missing model or bundle, storage Ray would delete), prints one clear line
    and exits with status 2 (nothing is started).
    """
    from mage_ray.preflight import TRAINING

    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_config_args(parser)
    parser.set_defaults(checks=TRAINING)  # the preflight checks; a command's add_arguments may choose others
    if extra is not None:
        extra(parser)
    args = parser.parse_intermixed_args(argv)
    return args, checked_config(args.config, args.overrides, args)


def checked_config(path: str | None, overrides: list[str], args: argparse.Namespace | None = None) -> Config:
    """:func:`load_config` plus :func:`mage_ray.preflight.check` (the command's ``args.checks``; without ``args``
    the objective names only); on a bad config print ``error: ...`` and exit 2."""
    from mage_ray import preflight
    from mage_ray.tasks.objectives import ObjectiveError

    try:
        cfg = load_config(path, overrides)
        preflight.check(cfg, args)
    except (ConfigError, ObjectiveError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg


def _keep_repeated_log_lines() -> None:
    """Turn off Ray's driver-side log de-duplication unless RAY_DEDUP_LOGS says otherwise.

    Per-backbone progress lines (``[b0] step 3/16 ...``, ``[b1] step 3/16 ...``) differ only in numbers, and the
    de-duplicator folds them into one line "[repeated 2x across cluster]", hiding all but one backbone. Ray reads
    the variable once, when ``ray`` is first imported (usually before a job calls this), so the module flag is
    set as well.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if os.environ["RAY_DEDUP_LOGS"] == "0":
        try:
            import ray._private.ray_logging as ray_logging

            ray_logging.RAY_DEDUP_LOGS = False
        except (ImportError, AttributeError):  # a Ray without this private flag: keep its default
            pass


IGNORED_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # transformers 5 deprecates ``model.is_gradient_checkpointing``; PEFT (PeftModel.__init__) and TRL
    # (unwrap_model_for_generation) read it, mage_ray does not: once per Train worker, nothing to fix on our side.
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
)
"""(start of the message, category) of library warnings that are not caused by a mage_ray call. Deprecations that
mage_ray's own calls caused are fixed where they are made instead. No comma or colon in a message (PYTHONWARNINGS
syntax)."""


LIBRARY_ENV = {
    "PYTHONWARNINGS": ",".join(f"ignore:{msg}:{cat.__name__}" for msg, cat in IGNORED_WARNINGS),
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
"""Environment that quiets library noise mage_ray cannot fix at its own call sites, in every process of a job.

- ``PYTHONWARNINGS``: ignore :data:`IGNORED_WARNINGS` (Python reads it when a worker process starts).
- ``RAY_TRAIN_ENABLE_PRINT_PATCH=0``: Ray Train reroutes ``print`` in its workers to logging and also copies prints
  made while ``sys.stdout`` is redirected; ``datasets`` fingerprints a table by having dill capture a ``dis.dis``
  listing that way, so ~10 lines of bytecode reached the log per backbone run. Without the patch a worker's prints
  go to its stdout, which Ray forwards to the driver as before.
"""


def quiet_libraries() -> dict[str, str]:
    """Give this process, and the processes it starts, :data:`LIBRARY_ENV`; return what was added (for the Ray job's
    ``runtime_env``, which reaches the workers of a cluster too).

    A variable already set (by you, or by ``ray job submit --runtime-env``) is kept: yours win. ``PYTHONWARNINGS``
    acts only when an interpreter starts, so this process gets the same warning filters directly.
    """
    env = {k: v for k, v in LIBRARY_ENV.items() if k not in os.environ}
    if "PYTHONWARNINGS" in env:
        for msg, cat in IGNORED_WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(msg), category=cat)
    os.environ.update(env)
    return env


LOOPBACK = "127.0.0.1"
"""The only address a private local Ray (no RAY_ADDRESS) listens on."""


def _local_ray_on_loopback() -> None:
    """Make the local Ray that ``ray.init`` is about to start listen on 127.0.0.1 only.

    On Linux Ray takes the machine's network address as the node address, and its servers (GCS, raylet, object
    manager, core workers, dashboard and runtime-env agents, metrics exporters) bind to it or to every
    interface; ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into that address. Ray uses 127.0.0.1
    instead when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is 0 (what it does on macOS and Windows: "no multi-node
    cluster"), and every server then binds to loopback. Ray reads the variable when it is first imported (often
    before this runs), so its module constant is set as well; the processes Ray starts inherit the variable. Set
    it to 1 yourself to keep the old all-interfaces behaviour.
    """
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def init_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a private local Ray.

    A plain ``ray.init()`` would attach to any ``ray start`` instance on the machine; a job run as
    ``python jobs/x.py`` gets its own Ray instead, unless RAY_ADDRESS says otherwise (``auto`` joins).

    The private local Ray listens on 127.0.0.1 only (:func:`_local_ray_on_loopback`; the dashboard included) and
    runs the dashboard's API server, because Ray Train's placement-group cleaner asks the State API (served
    there) every second whether the Train controller is alive, and logs a warning each time it cannot. The
    dashboard gets a free port, and the job's workers get its URL as RAY_API_SERVER_ADDRESS: without it a State
    API client in a worker looks for "the" Ray on the machine by listing running GCS processes, and fails (a
    traceback from every cleaner) when other Ray instances run beside this one. A cluster (RAY_ADDRESS set) keeps
    the addresses and dashboard it was started with. Either way every process of the job gets
    :data:`LIBRARY_ENV` (:func:`quiet_libraries`, through the job's ``runtime_env``), and the rehearsal's variables
    (:mod:`mage_ray.devices`) when this process has them. ``num_cpus`` / ``num_gpus`` declare the private Ray's
    logical resources (a rehearsal declares GPUs the machine does not have).
    """
    import ray

    if ray.is_initialized():
        return
    _keep_repeated_log_lines()
    env = quiet_libraries()
    from mage_ray.devices import HUB_MAP_ENV, REHEARSAL_ENV

    env.update({k: os.environ[k] for k in (REHEARSAL_ENV, HUB_MAP_ENV) if os.environ.get(k)})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(
            address=os.environ["RAY_ADDRESS"],
            log_to_driver=True,
            runtime_env={"env_vars": env} if env else None,
        )
    else:
        _local_ray_on_loopback()
        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://{LOOPBACK}:{port}"
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            dashboard_port=port,
            log_to_driver=True,
            runtime_env={"env_vars": env},
        )


def data_progress() -> None:
    """How a Ray Data run on this driver reports progress (call before it executes).

    On a terminal: Ray Data's own progress bars (rows done, rows per second, and the time left once Ray Data has
    estimated the output size from the first finished tasks), and none of its INFO lines on the console (execution
    plans, "execution finished", sink summaries; they still go to ``ray-data.log`` in the session's log
    directory). Off a terminal (a log file, ``| tee``) Ray Data cannot draw bars and logs the same progress as
    INFO lines instead, every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds (10): those stay.
    """
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = True
    if sys.stdout.isatty():  # the test Ray Data itself makes to choose bars over log lines
        for handler in logging.getLogger("ray.data").handlers:
            # the console handler is a stream; the session's log files are not
            if isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.WARNING)
