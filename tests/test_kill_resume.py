"""SIGKILL a smoke pipeline's driver in the middle of the backbone stage, run it again, and check what is left:
the resumed run finishes with the report of an uninterrupted run, no checkpoint directory Ray did not register,
and no scratch directory of a killed process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mage_ray.manifest import SCRATCH_ROOT
from mage_ray.train.ray_shell import SNAPSHOT

OVERRIDES = [
    "eval.methods=[bs]",
    # mage-i-m's guide is the backbones themselves: no rollouts or value models to train here, the stages a
    # crash can hit are the backbone stage and the ones after it
    "sweep.gamma_method=mage-i-m",
    "sweep.alphas=[0.0]",
    "sweep.gammas=[0.0]",
    "backbone.steps=4",
    # 2 training prompts, 2 per step: every step is an epoch, so a backbone run resumed from its checkpoint has
    # whole epochs behind it (the prompt order of an uninterrupted run needs the sampler's epochs replayed)
    "task.n_train=2",
    "storage.run_name=k",
]
TIMINGS = {"decode_seconds", "wall_time_s", "seconds", "created"}


def _pipeline(repo_root: Path, storage: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "jobs/pipeline.py", "--config", "configs/smoke.yaml", *OVERRIDES]
    cmd.append(f"storage.storage_path={storage}")
    env = {**os.environ, "PYTHONPATH": str(repo_root), "RAY_ADDRESS": ""}
    return subprocess.Popen(
        cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw
    )


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _adapters(run: Path) -> dict[str, str]:
    files = sorted((run / "backbones").rglob("*.safetensors"))
    return {str(f.relative_to(run)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_leaves_no_debris(tmp_path, repo_root):
    killed = _pipeline(repo_root, tmp_path / "killed")
    ray_dir = tmp_path / "killed" / "k" / "ray"
    deadline = time.monotonic() + 600
    while not list(ray_dir.glob("backbones--*/checkpoint_*")):  # the backbone stage has saved a checkpoint
        assert killed.poll() is None and time.monotonic() < deadline, killed.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)
    killed.send_signal(signal.SIGKILL)  # the driver only: its workers live on for a moment, as after a crash
    killed.wait(30)
    killed.stdout.close()
    assert not (tmp_path / "killed" / "k" / "report" / "metrics.json").exists()

    resumed = _pipeline(repo_root, tmp_path / "killed")
    log = resumed.communicate(timeout=1200)[0].decode()
    assert resumed.returncode == 0, log[-4000:]
    clean = _pipeline(repo_root, tmp_path / "clean")
    clean_log = clean.communicate(timeout=1200)[0].decode()
    assert clean.returncode == 0, clean_log[-4000:]

    run, ref = tmp_path / "killed" / "k", tmp_path / "clean" / "k"
    metrics = json.loads((run / "report" / "metrics.json").read_text())
    assert _strip(metrics) == _strip(json.loads((ref / "report" / "metrics.json").read_text()))
    assert _adapters(run) == _adapters(ref) and _adapters(run)
    for snap in ray_dir.glob(f"*/{SNAPSHOT}"):  # every checkpoint left is one Ray registered
        state = json.loads(snap.read_text())
        registered = {r["checkpoint_dir_name"] for r in state["checkpoint_results"]}
        assert {d.name for d in snap.parent.glob("checkpoint_*") if d.is_dir()} <= registered, snap.parent
    scratch = Path(tempfile.gettempdir()) / SCRATCH_ROOT
    leftovers = [d.name for d in scratch.iterdir() if not _alive(int(d.name.rsplit("-", 2)[-2]))]
    assert leftovers == [], leftovers
    assert "skipping" in log  # the resumed run says which finished work it skipped
