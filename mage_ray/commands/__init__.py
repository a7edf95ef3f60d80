"""The bodies of the jobs and of the ``mage-ray`` command, one module per command.

Every module has a docstring whose first line is the command's one-line help, ``add_arguments(parser)`` (the
command's own flags; ``--config`` and the ``key=value`` overrides are added by
:func:`mage_ray.runtime.parse_job_args`, and the command may choose its :mod:`mage_ray.preflight` checks with
``parser.set_defaults(checks=...)``) and ``run(args, cfg)``. ``jobs/<verb>.py`` and ``mage-ray <verb>``
(:mod:`mage_ray.cli`) both parse with ``parse_job_args(..., add_arguments)`` and call :func:`run_command`. Modules
import the heavy libraries (torch, Ray, the trainers) inside ``run``, so ``mage-ray --help`` stays fast and Ray's
log settings are made by :func:`mage_ray.runtime.init_ray` before Ray is first imported.

Exit status: 0 done; 2 a bad config or anything else found before the run starts (:mod:`mage_ray.preflight`,
one ``error:`` line); 1 the run failed (one ``error:`` line for mage_ray's own errors, e.g. a Ray Train run
stopped on an error a retry cannot fix; a traceback for anything unexpected).
"""

from __future__ import annotations

import sys
from types import ModuleType

from mage_ray.bundle import Bundle, BundleError, load_bundle


def open_bundle(path: str) -> Bundle:
    """:func:`load_bundle`, with a bad bundle reported as one ``error:`` line (exit status 1), not a traceback."""
    try:
        return load_bundle(path)
    except BundleError as e:
        raise SystemExit(f"error: {e}") from None


def run_command(module: ModuleType, args, cfg) -> int:
    """``module.run(args, cfg)`` with the output location printed at the start and the end (one line each, for
    commands that write: :func:`mage_ray.preflight.output_dir`), and mage_ray's own errors as one ``error:`` line;
    returns the exit status."""
    from mage_ray.preflight import output_dir

    out = output_dir(args, cfg)
    if out is not None:
        print(f"output: {out}", flush=True)
    try:
        status = module.run(args, cfg) or 0
    except Exception as e:
        if type(e).__module__.split(".")[0] != "mage_ray":
            raise  # a library's error or a bug: keep the traceback
        text = " ".join(
            line.strip() for line in str(e).splitlines() if line.strip()
        )  # our messages name the fix
        if out is not None:
            print(f"output (incomplete): {out}", flush=True)
        print(f"error: {text or type(e).__name__}", file=sys.stderr, flush=True)
        return 1
    if out is not None:
        print(f"output: {out}", flush=True)
    return status
