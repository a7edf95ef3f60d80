"""Loading a :class:`Config`: YAML file + ``section.field=value`` overrides -> typed, validated sections.

``--config`` takes a YAML file or the name of a config shipped with the package (:func:`shipped_configs`:
``embedded``, ``smoke``, ...), so every command works from any directory and from an installed wheel. Renamed
fields keep their old spelling working with one deprecation line (:data:`RENAMED`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from mage_ray.config.checks import ConfigError, _fail
from mage_ray.config.sections import Config
from mage_ray.storage import storage_abs

__all__ = [
    "DEFAULT_CONFIG",
    "RENAMED",
    "HelpFormatter",
    "add_config_args",
    "config_from_dict",
    "load_config",
    "resolve_config",
    "save_config",
    "shipped_configs",
]

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs: ``mage_ray/configs/`` (package data of the wheel; in a checkout a link to the repository's
``configs/``, so the two are the same files)."""
DEFAULT_CONFIG = "embedded"
"""``--config`` when none is given: the shipped embedded config (2 CPU cores, the demo's)."""

RENAMED = {"lora.alpha": "lora.lora_alpha"}
"""Old field path -> new one. The old spelling still works, with a deprecation line. ``lora.alpha`` became
``lora.lora_alpha`` (PEFT's name, as ``value.lora_alpha`` and ``arm.lora_alpha``), so that a bare "alpha" means
only Bone Soup's extrapolation (``decode.alpha``, ``sweep.alphas``)."""


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML/CLI value to the annotated type, or raise naming the field."""
    origin = get_origin(tp)
    args = get_args(tp)
    if tp is Any:
        return value
    if origin is None and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(name, value, f"a mapping of {tp.__name__} fields")
        return _build(tp, value, name)
    if origin in (list,):
        if isinstance(value, str):
            value = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
        if not isinstance(value, list):
            _fail(name, value, "a list")
        return [_coerce(f"{name}[]", v, args[0]) for v in value] if args else value
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            _fail(name, value, "a mapping")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0]) if len(inner) == 1 else value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        _fail(name, value, "true or false")
    if tp in (int, float):
        return _number(name, value, tp)
    if tp is str:
        if isinstance(value, (dict, list)):
            _fail(name, value, "a string")
        return str(value)
    return value


def _number(name: str, value: Any, tp: type) -> int | float:
    """An int (also from an integral float or a numeric string) or a float (from an int or a string); never a bool."""
    what = "an integer" if tp is int else "a number"
    if isinstance(value, bool):
        _fail(name, value, what)
    if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
        return tp(value)
    if isinstance(value, str):
        try:
            return tp(value)
        except ValueError:
            pass
    _fail(name, value, what)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown config field(s) {unknown} in {where}; allowed: {sorted(known)}")
    kwargs = {k: _coerce(f"{prefix}.{k}" if prefix else k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(data: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


_warned: set[str] = set()


def _deprecated(old: str, new: str) -> None:
    """One ``deprecated:`` line on stderr per renamed field and process."""
    if old not in _warned:
        _warned.add(old)
        print(
            f"deprecated: config field '{old}' is now '{new}' (the old spelling still works)", file=sys.stderr
        )


def _rename(data: dict[str, Any]) -> None:
    """Move every :data:`RENAMED` field of ``data`` (a nested dict) to its new path, saying so once each."""
    for old, new in RENAMED.items():
        (osec, ofield), (nsec, nfield) = old.split("."), new.split(".")
        section = data.get(osec)
        if isinstance(section, dict) and ofield in section:
            _deprecated(old, new)
            value = section.pop(ofield)
            data.setdefault(nsec, {}).setdefault(nfield, value)


def config_from_dict(data: dict[str, Any] | None, overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a nested dict plus ``key=value`` overrides."""
    data = dict(data or {})
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    _rename(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is malformed: expected section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in RENAMED:
            _deprecated(key, RENAMED[key])
            key = RENAMED[key]
        _set_path(data, key, raw.strip())
    cfg = _build(Config, data, "")
    _cross_validate(cfg)
    return cfg


def shipped_configs() -> dict[str, Path]:
    """The configs shipped with the package, by name (``embedded`` -> .../mage_ray/configs/embedded.yaml)."""
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.yaml"))}


def resolve_config(path_or_name: str | os.PathLike) -> Path:
    """The YAML file ``--config`` means: an existing file (relative to the working directory, or absolute), else
    a shipped config by name (``embedded`` or ``embedded.yaml``); ConfigError naming both when neither."""
    p = Path(path_or_name).expanduser()
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = str(path_or_name).removesuffix(".yaml")
    if os.sep not in str(path_or_name) and "/" not in str(path_or_name) and name in shipped:
        return shipped[name]
    raise ConfigError(
        f"config file {str(path_or_name)!r} not found (from {os.getcwd()}); give a YAML file or the name of a "
        f"shipped config: {', '.join(shipped) or '(none found in ' + str(CONFIGS_DIR) + ')'}"
    )


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (a file or a shipped config's name, :func:`resolve_config`; defaults when ``path`` is None),
    apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = resolve_config(path)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"config file {str(p)!r} must hold a mapping of sections, got {type(data).__name__}"
            )
    cfg = config_from_dict(data, overrides)
    # A relative local storage_path means "relative to where the job was started": fix it now, because Ray
    # Tune trials and Train workers run with another working directory (their trial/session dirs). file:// is a
    # local path: its scheme goes too (mage_ray.storage).
    cfg.storage.storage_path = storage_abs(cfg.storage.storage_path)
    return cfg


def _cross_validate(cfg: Config) -> None:
    n = cfg.n_objectives
    if cfg.eval.ref_point is not None and len(cfg.eval.ref_point) != n:
        _fail("eval.ref_point", cfg.eval.ref_point, f"{n} values, one per objective {cfg.task.objectives}")
    if not (1.0 / n < cfg.backbone.beta <= 1.0):
        _fail(
            "backbone.beta",
            cfg.backbone.beta,
            f"a number in (1/n, 1] = ({1.0 / n:.3f}, 1] for n={n} objectives (the beta of Bone Soup's B(beta); "
            "TRL's KL 'beta' is backbone.kl_coef)",
        )
    for b in cfg.sweep.betas:
        if not (1.0 / n < b <= 1.0):
            _fail("sweep.betas[]", b, f"numbers in (1/n, 1] = ({1.0 / n:.3f}, 1]")
    if cfg.task.reward_device.startswith("cuda") and cfg.decode.num_gpus == 0:
        # Sweep trials and evaluation score their texts where they decode: on a decode worker without a GPU the
        # reward models could not go on cuda (Ray hides the GPUs from processes that did not request one).
        raise ConfigError(
            f"config field 'task.reward_device' = {cfg.task.reward_device!r} needs GPU decode workers, but "
            "decode.num_gpus = 0 (sweep trials and evaluation score on their decode workers): set decode.num_gpus "
            "(e.g. 1) or task.reward_device=cpu"
        )


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML (the exact config a run used, for its manifest)."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The commands' help: descriptions as written, and every option's default shown (unless it is None, False or
    empty, which say nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def add_config_args(parser) -> None:
    """Standard job CLI: ``--config FILE|NAME`` then ``section.field=value`` overrides."""
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE|NAME",
        help=f"YAML config file, or a shipped config by name ({', '.join(shipped_configs())})",
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
