"""The command line as a newcomer meets it: run from a folder outside the repository, once from the source tree
and once from a wheel built from it and installed on its own (the configs ship as package data, ``--config``
takes a shipped config's name, every ``--help`` works and shows the defaults, ``doctor`` agrees with
``config show``).

One subprocess per install runs every command in-process (:data:`DRIVER`), so the module takes about 40 s,
most of it ``doctor`` importing torch and Ray twice; the wheel's own ``mage-ray`` script is run once.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mage_ray.cli import COMMANDS
from mage_ray.config.load import shipped_configs

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import contextlib, io, json, sys
import mage_ray
from mage_ray.cli import COMMANDS, main

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

print(json.dumps({
    "file": mage_ray.__file__,
    "help": {name: run([name, "--help"]) for name in [*COMMANDS, "config"]},
    "show": run(["config", "show", "--config", "embedded", "decode.max_new_tokens=7"]),
    "show_default": run(["config", "show"]),
    "show_path": run(["config", "show", "--config", sys.argv[1]]),
    "missing": run(["config", "show", "--config", "configs/embedded.yaml"]),
    "doctor": run(["doctor"]),
}))
"""
"""Runs in the install under test, with a folder outside the repository as its working directory."""


def _env(pythonpath: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": pythonpath, "PYTHONWARNINGS": "ignore"}


def _run_driver(cwd: Path, pythonpath: str) -> dict:
    (cwd / "mine.yaml").write_text("decode:\n  max_new_tokens: 9\n")
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, "mine.yaml"],
        cwd=cwd,
        env=_env(pythonpath),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _check(r: dict, where: Path) -> None:
    """What a newcomer sees from a folder outside the repository, with mage_ray imported from ``where``."""
    assert Path(r["file"]).resolve().is_relative_to(where.resolve()), r["file"]
    for name, h in r["help"].items():
        assert h["code"] == 0, (name, h["err"])
        assert h["out"].startswith(f"usage: mage-ray {name}"), name
        if name != "doctor":  # doctor reads no config unless given one (its run and cache directories)
            assert "(default: embedded)" in " ".join(h["out"].split()), (name, h["out"])
    assert r["show"]["code"] == 0, r["show"]["err"]
    assert "max_new_tokens: 7" in r["show"]["out"] and "run_name: embedded" in r["show"]["out"]
    assert r["show_default"]["code"] == 0 and "run_name: embedded" in r["show_default"]["out"]
    assert (
        r["show_path"]["code"] == 0 and "max_new_tokens: 9" in r["show_path"]["out"]
    )  # a file: relative path
    # a path that does not exist here: exit 2, one line naming the shipped configs (not a traceback)
    assert r["missing"]["code"] == 2
    err = r["missing"]["err"].strip()
    assert err.startswith("error: config file 'configs/embedded.yaml' not found") and "\n" not in err
    assert ", ".join(shipped_configs()) in err
    doctor = r["doctor"]["out"].splitlines()
    configs = next(line for line in doctor if line.split()[1:2] == ["configs"])
    assert configs.startswith("ok") and str(where.resolve()) in configs, configs
    assert r["doctor"]["code"] == 0, r["doctor"]["out"]  # and doctor agrees: all is well, as config show says


def test_cli_from_a_folder_outside_the_repository(tmp_path):
    """The source tree (as an editable install or PYTHONPATH runs it), with the working directory elsewhere."""
    _check(_run_driver(tmp_path, str(REPO)), REPO / "mage_ray")


def _wheel(tmp: Path) -> Path:
    """A wheel of this source tree (the package, its configs link, pyproject.toml), built outside the repository
    so no build/ directory of an earlier build can leak stale files into it."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "configs", src / "configs")
    shutil.copytree(
        REPO / "mage_ray", src / "mage_ray", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "w"),
            ".",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    (whl,) = (tmp / "w").glob("mage_ray-*.whl")
    return whl


@pytest.mark.slow
def test_cli_from_an_installed_wheel(tmp_path):
    """A wheel of the worktree installed into a directory of its own (its dependencies are the running venv's):
    the configs are in the wheel as files, and every command works from another folder."""
    whl = _wheel(tmp_path)
    names = zipfile.ZipFile(whl).namelist()
    assert sorted(n for n in names if n.startswith("mage_ray/configs/")) == [
        f"mage_ray/configs/{name}.yaml" for name in shipped_configs()
    ]
    target = tmp_path / "site"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(whl),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (
        target / "mage_ray" / "configs"
    ).is_symlink()  # real files, not a link back into the repository
    work = tmp_path / "elsewhere"
    work.mkdir()
    _check(_run_driver(work, str(target)), target / "mage_ray")
    script = subprocess.run(
        [str(target / "bin" / "mage-ray"), "--help"],
        cwd=work,
        env=_env(str(target)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 0 and all(name in script.stdout for name in COMMANDS), script.stderr


def test_shipped_configs_are_the_repository_configs(repo_root):
    """One copy of the YAML: the package's configs directory is the repository's configs/."""
    assert (repo_root / "mage_ray" / "configs").resolve() == (repo_root / "configs").resolve()
    assert {p.name for p in (repo_root / "configs").glob("*.yaml")} == {
        p.name for p in shipped_configs().values()
    }
