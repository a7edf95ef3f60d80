"""Failing fast: every input a job can check before Ray starts is refused in the driver in seconds with
one ``error:`` line naming the field and exit status 2 (mage_ray/preflight.py); storage inside Ray's temporary
copy of a job's working directory is refused; a Ray Train worker error a retry cannot fix ends the run after one
attempt (mage_ray/train/fail_fast.py); commands print their output location and report their own errors in one
line (mage_ray/commands/__init__.py). Only the last test starts Ray."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mage_ray.preflight import RAY_JOB_CONFIG_ENV, PreflightError, check_storage, temporary_working_dir

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
LIMIT_S = 5.0
"""CPU seconds of every preflight refusal: process start, imports, config, checks, the one line (on an idle
machine its wall time too)."""
NO_HUB = "http://127.0.0.1:9"
"""An endpoint nothing listens on (the discard port): the connection is refused at once."""


def fake_bundle(root: Path, objectives=("relevance", "conciseness"), base_model="tiny-random") -> str:
    """A bundle load_bundle accepts (empty adapter files: nothing here loads weights)."""
    for i in range(2):
        adapter = root / f"b{i}" / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text("{}")
        (adapter / "adapter_model.safetensors").write_bytes(b"")
    data = {
        "base_model": base_model,
        "objectives": list(objectives),
        "beta": 0.7,
        "backbones": ["b0", "b1"],
        "default_method": "bs",
    }
    (root / "bundle.json").write_text(json.dumps(data))
    return str(root)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """Paths the table's argv use: bundles, a directory that is no model or bundle, a fake Ray working dir."""
    root = tmp_path_factory.mktemp("preflight")
    runtime_copy = root / "ray" / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    runtime_copy.mkdir(parents=True)
    (root / "empty").mkdir()
    return {
        "bundle": fake_bundle(root / "bundle"),
        "other_bundle": fake_bundle(root / "other", objectives=("conciseness", "readability")),
        "lost_base": fake_bundle(root / "lost", base_model="/no/such/base"),
        "empty": str(root / "empty"),
        "runs": str(root / "runs"),
        "runtime_copy": str(runtime_copy),
    }


def run(argv: list[str], places: dict[str, str], env: dict[str, str] | None = None, cwd: str | None = None):
    """Run ``python -m mage_ray.cli ...`` or ``python jobs/x.py ...`` ({key} in argv: a path of ``places``)."""
    argv = [a.format(**places, smoke=SMOKE, repo=REPO) for a in argv]
    cmd = (
        [sys.executable, *argv] if argv[0].endswith(".py") else [sys.executable, "-m", "mage_ray.cli", *argv]
    )
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # the refusal's CPU time (user + system) rather than wall time: the suite runs tests side by side on 2 cores,
    # and a loaded machine stretches the wall time of the same work
    return proc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


RUNS = "storage.storage_path={runs}"
CASES = [
    # (id, argv, extra env, text the one error line must hold)
    ("objective-name", ["train-backbones", "--config", "{smoke}", "task.objectives=[relevance,nosuchobj]"], {},
     "task.objectives: unknown objective 'nosuchobj'"),
    ("hf-objective-missing", ["train-backbones", "--config", "{smoke}", "task.objectives=[relevance,hf:/no/rm@1]"],
     {}, "task.objectives: 'hf:/no/rm@1': no such directory"),
    ("hf-objective-not-a-model", ["pipeline", "--config", "{smoke}", "task.objectives=[relevance,hf:{empty}]",
                                  "eval.ref_point=[0,-10]"], {},
     "has no config.json"),
    ("model-path", ["{repo}/jobs/train_backbones.py", "--config", "{smoke}", "model.name_or_path=/no/such/model"],
     {}, "model.name_or_path = '/no/such/model': no such directory"),
    ("hub-offline", ["rollouts", "--config", "{smoke}", "model.name_or_path=nosuch-org/nosuch-model"], {},
     "not in the local Hugging Face cache"),
    ("hub-unreachable", ["sweep", "--config", "{smoke}", "model.name_or_path=nosuch-org/nosuch-model"],
     {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": NO_HUB}, f"the hub {NO_HUB} is unreachable (no network?"),
    ("eval-grid-step", ["{repo}/jobs/pipeline.py", "--config", "{smoke}", "eval.grid_step=0.3"], {},
     "'eval.grid_step' = 0.3 is invalid: expected a step that divides 1"),
    ("sweep-grid-step", ["sweep", "--config", "{smoke}", "sweep.grid_step=0.4"], {}, "'sweep.grid_step' = 0.4"),
    ("grid-job-step-0", ["{repo}/jobs/grid.py", "--config", "{smoke}", "--bundle", "{bundle}", "eval.grid_step=0"],
     {}, "'eval.grid_step' = 0.0 is invalid"),
    ("method", ["pipeline", "--config", "{smoke}", "eval.methods=[rs,nosuch]"], {}, "'eval.methods[]' = 'nosuch'"),
    ("grid-methods", ["grid", "--config", "{smoke}", "--bundle", "{bundle}", "--methods", "bs,nosuch"], {},
     "--methods: unknown method 'nosuch'"),
    ("grid-preferences", ["grid", "--config", "{smoke}", "--bundle", "{bundle}", "--preferences", "[[0.5, 0.4]]"],
     {}, "--preferences[0]"),
    ("grid-preference", ["grid", "--config", "{smoke}", "--bundle", "{bundle}", "--preference", "1,0",
                         "--preference", "0.5,0.4"], {}, "--preference[1]"),
    ("bundle-missing", ["{repo}/jobs/evaluate.py", "--config", "{smoke}", "--bundle", "/no/such/bundle"], {},
     "--bundle '/no/such/bundle': bundle directory '/no/such/bundle' does not exist"),
    ("not-a-bundle", ["serve", "--config", "{smoke}", "--bundle", "{empty}", "serve.port=8123"], {},
     "is not a bundle: it has no bundle.json"),
    ("bundle-objectives", ["evaluate", "--config", "{smoke}", "--bundle", "{other_bundle}", RUNS], {},
     "task.objectives = ['relevance', 'conciseness'] differ from the bundle's ['conciseness', 'readability']"),
    ("bundle-base-model", ["serve", "--config", "{smoke}", "--bundle", "{lost_base}"], {},
     "the bundle's base model '/no/such/base'"),
    ("override-after-bundle", ["evaluate", "--config", "{smoke}", "--bundle", "{bundle}", "backbone.steps=-1"], {},
     "'backbone.steps' = -1"),
    ("data-path", ["train-backbones", "--config", "{smoke}", "task.name=parquet", "task.data_path=/no/p.jsonl"], {},
     "task.data_path = '/no/p.jsonl' does not exist"),
    ("ref-point", ["sweep", "--config", "{repo}/configs/hh_rlhf.yaml", "eval.ref_point=null", RUNS], {},
     "eval.ref_point: objectives ['helpful', 'harmless', 'humor'] are unbounded"),
    ("reward-device", ["pipeline", "--config", "{repo}/configs/hh_rlhf.yaml", "decode.num_gpus=0", RUNS], {},
     "'task.reward_device' = 'cuda' needs GPU decode workers, but decode.num_gpus = 0"),
]  # fmt: skip


@pytest.mark.parametrize("argv, env, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_in_seconds(argv, env, needle, places):
    proc, seconds = run(argv, places, env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]
    assert proc.stdout == ""  # refused before anything starts (no output line either)
    assert seconds < LIMIT_S, f"{seconds:.1f} s"


@pytest.mark.parametrize("how", ["cwd", "env"])
def test_relative_storage_in_a_ray_job_working_dir_is_refused(how, places, tmp_path):
    """`ray job submit --working-dir . -- python jobs/rollouts.py --config configs/smoke.yaml`: the driver runs in
    Ray's temporary copy of the working dir, so storage.storage_path=runs (smoke.yaml) would put the run inside it.
    Simulated by the copy's path as cwd, or by the job config Ray's supervisor passes to the driver."""
    if how == "cwd":
        cwd, env = places["runtime_copy"], {}
    else:
        cwd, env = (
            str(tmp_path),
            {RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_a.zip"}})},
        )
    proc, seconds = run(["{repo}/jobs/rollouts.py", "--config", "{smoke}", "--no-ray"], places, env, cwd=cwd)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith(f"error: storage.storage_path = '{cwd}/runs' lies in Ray's temporary copy"), (
        lines[0]
    )
    assert "storage.storage_path=/shared/mage_runs" in lines[0] and seconds < LIMIT_S
    assert not os.path.exists(os.path.join(cwd, "runs"))


def test_temporary_working_dir_detection(tmp_path, monkeypatch):
    """The job config decides when the path does not; an absolute path or a URI outside the copy passes."""
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert temporary_working_dir() is None
    check_storage("storage.storage_path", "runs")  # a plain run: relative is fine
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "local:///repo"}}))
    assert temporary_working_dir() is None  # local:// is used in place, not copied
    monkeypatch.setenv(
        RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}})
    )
    assert temporary_working_dir() == str(tmp_path)
    with pytest.raises(PreflightError, match="--out = .* lies in Ray's temporary copy"):
        check_storage("--out", "grid")
    check_storage("storage.storage_path", "/shared/mage_runs")
    check_storage("storage.storage_path", "s3://bucket/runs")


# ----- the commands layer: output location, one-line run failures (in-process) -----


def _command(run_fn) -> types.ModuleType:
    module = types.ModuleType("fake_command")
    module.run = run_fn
    return module


def test_run_command_prints_the_output_location_and_one_line_failures(tmp_path, capsys):
    from mage_ray.commands import run_command
    from mage_ray.config import load_config
    from mage_ray.train.fail_fast import RunFailed

    cfg = load_config(SMOKE, [f"storage.storage_path={tmp_path}"])
    args = types.SimpleNamespace(checks=("storage",))
    assert run_command(_command(lambda a, c: None), args, cfg) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"output: {tmp_path}/smoke", f"output: {tmp_path}/smoke"]

    def fails(a, c):
        raise RunFailed("b0: ConfigError: bad\nsecond line")

    assert run_command(_command(fails), args, cfg) == 1
    captured = capsys.readouterr()
    assert captured.err == "error: b0: ConfigError: bad second line\n"
    assert captured.out.splitlines()[-1] == f"output (incomplete): {tmp_path}/smoke"

    def bug(a, c):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        run_command(_command(bug), types.SimpleNamespace(checks=()), cfg)  # writes nothing: no output line
    assert capsys.readouterr().out == ""


# ----- Ray Train: an error no retry can fix is not retried -----


@pytest.fixture(scope="module")
def ray_2cpu():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def misconfigured_objectives(marker: str) -> list:
    """[length, misconfigured]: nested, so cloudpickle ships them to the workers by value. Reading the second's
    name (train_backbone's first use of it, in the worker) appends the worker's pid to ``marker`` (one line per
    attempt) and raises ConfigError, as an objective with a bad setting would."""
    import numpy as np

    from mage_ray.config import ConfigError

    def length(prompts, responses):
        return np.array([len(r) / 10.0 for r in responses])

    class Misconfigured:
        @property
        def name(self) -> str:
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            raise ConfigError("objective 'misconfigured': threshold = -1 is invalid: expected a number >= 0")

    length.name = "length"
    return [length, Misconfigured()]


def test_config_error_in_a_ray_train_worker_fails_once(ray_2cpu, tmp_path):
    """backbone.max_failures = 2, but the worker's ConfigError is returned as a failure, not raised: one attempt
    (one marker line), the driver raises RunFailed with one line naming the run and the error, nothing is
    published."""
    from mage_ray.config import load_config
    from mage_ray.train.fail_fast import RunFailed
    from mage_ray.train.ray_train import train_backbone_ray

    cfg = load_config(
        SMOKE,
        [
            "backbone.max_failures=2",
            "backbone.steps=1",
            f"storage.storage_path={tmp_path}",
            "storage.run_name=t",
        ],
    )
    marker = tmp_path / "attempts.txt"
    out = f"{tmp_path}/t/backbones/beta_0.7/b0"
    objectives = misconfigured_objectives(str(marker))
    with pytest.raises(RunFailed) as info:
        train_backbone_ray(cfg, [0.5, 0.5], name="b0", out_dir=out, objectives=objectives, prompts=["Hi."])
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("b0: ConfigError: objective 'misconfigured': threshold = -1")
    assert "not retried" in msg
    assert len(marker.read_text().splitlines()) == 1  # attempted once, not 1 + max_failures times
    assert not os.path.exists(f"{out}/manifest.json")
