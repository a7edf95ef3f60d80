"""What every job does first: parse ``--config`` + overrides, connect to (or start) Ray."""

from __future__ import annotations

import argparse
import os
import sys

from mage_ray.config import Config, ConfigError, add_config_args, load_config


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

    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit`` sets it), else start a private local Ray.

    A plain ``ray.init()`` would attach to any ``ray start`` instance on the machine; a job run as
    ``python jobs/x.py`` gets its own Ray instead, unless RAY_ADDRESS says otherwise (``auto`` joins).
    """
    import ray

    if ray.is_initialized():
        return
    _keep_repeated_log_lines()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
