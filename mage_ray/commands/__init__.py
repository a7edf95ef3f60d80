"""The bodies of the jobs and of the ``mage-ray`` command, one module per command.

Every module has a docstring whose first line is the command's one-line help, ``add_arguments(parser)`` (the
command's own flags; ``--config`` and the ``key=value`` overrides are added by
:func:`mage_ray.runtime.parse_job_args`) and ``run(args, cfg)``. ``jobs/<verb>.py`` and ``mage-ray <verb>``
(:mod:`mage_ray.cli`) both parse with ``parse_job_args(..., add_arguments)`` and call ``run``. Modules import
the heavy libraries (torch, Ray, the trainers) inside ``run``, so ``mage-ray --help`` stays fast and Ray's log
settings are made by :func:`mage_ray.runtime.init_ray` before Ray is first imported.
"""

from __future__ import annotations

from mage_ray.bundle import Bundle, BundleError, load_bundle


def open_bundle(path: str) -> Bundle:
    """:func:`load_bundle`, with a bad bundle reported as one ``error:`` line (exit status 1), not a traceback."""
    try:
        return load_bundle(path)
    except BundleError as e:
        raise SystemExit(f"error: {e}") from None
