"""The `mage-ray` command: every job as a subcommand, plus `config show`, `export` and `doctor`.

    mage-ray --help
    mage-ray doctor                                                       # is the install complete?
    mage-ray config show --config smoke backbone.steps=3                  # the merged, validated config
    mage-ray pipeline --config configs/embedded.yaml                      # = python jobs/pipeline.py ...
    mage-ray serve --bundle runs/embedded/bundle serve.port=8001
    mage-ray plan --config hh_rlhf --gpu-memory 80                         # GPU memory per stage, GPU-hours

Every subcommand takes --config (a YAML file, or a config shipped with the package by name: embedded, the
default, embedded3, smoke, hh_rlhf, summary) and section.field=value overrides, in any position, and the flags of
its job: `mage-ray <verb>` and `jobs/<verb>.py` parse with the same function and run the same body (one module of
mage_ray/commands/ each). A bad config, a missing model or bundle, or storage Ray would delete prints one
"error: ..." line and exits with status 2 before anything starts; a run that fails on one of mage_ray's own
errors prints one "error: ..." line and exits with status 1. Commands that write print their output
location at the start and at the end. `mage-ray <command> --help` shows a command's flags and examples.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from mage_ray.commands import (
    doctor,
    evaluate,
    export,
    grid,
    pipeline,
    plan,
    rehearse,
    rollouts,
    run_command,
    serve,
    sweep,
    train_backbones,
    train_baselines,
    train_values,
)
from mage_ray.config import add_config_args
from mage_ray.config.load import HelpFormatter
from mage_ray.runtime import checked_config, parse_job_args

__all__ = ["COMMANDS", "main"]

COMMANDS = {
    "pipeline": pipeline,
    "sweep": sweep,
    "train-backbones": train_backbones,
    "train-values": train_values,
    "train-baselines": train_baselines,
    "rollouts": rollouts,
    "evaluate": evaluate,
    "grid": grid,
    "serve": serve,
    "export": export,
    "rehearse": rehearse,
    "doctor": doctor,
    "plan": plan,
}
"""Subcommand -> its module in mage_ray.commands (docstring, ``add_arguments(parser)``, ``run(args, cfg)``)."""

CONFIG_HELP = "Print the merged, validated config (YAML file + key=value overrides) as YAML."


def _summary(doc: str | None) -> str:
    """A command's one-line help: the first docstring line, without reST's double backquotes."""
    return (doc or "").strip().splitlines()[0].replace("``", "")


def _version() -> str:
    try:
        return importlib.metadata.version("mage-ray")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _top_parser() -> argparse.ArgumentParser:
    """Only for ``--help``, ``--version`` and a missing or unknown command: each command parses its own args."""
    parser = argparse.ArgumentParser(
        prog="mage-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub.add_parser(name, help=_summary(module.__doc__), add_help=False)
    sub.add_parser("config", help="config show: " + CONFIG_HELP, add_help=False)
    return parser


def config_show(argv: Sequence[str]) -> int:
    """``mage-ray config show --config FILE [key=value ...]``: the config a job would run with, as YAML."""
    import yaml

    parser = argparse.ArgumentParser(
        prog="mage-ray config", description=CONFIG_HELP, formatter_class=HelpFormatter
    )
    parser.add_argument("action", choices=["show"])
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = checked_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mage-ray`` script (``[project.scripts]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "config":
        return config_show(argv[1:])
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        parser.parse_args(argv)  # exits: --help, --version, or an unknown command
        parser.error("a command is required")
    # Each command's own parser, not an argparse subparser: overrides may then follow any flag
    # (parse_intermixed_args refuses parsers that have subparsers).
    name, module = argv[0], COMMANDS[argv[0]]
    args, cfg = parse_job_args(module.__doc__, module.add_arguments, argv=argv[1:], prog=f"mage-ray {name}")
    return run_command(module, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
