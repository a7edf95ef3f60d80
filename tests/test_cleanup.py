"""What a killed job leaves behind is removed by the next one: scratch directories of dead processes, and
checkpoint directories Ray Train never registered. No Ray needed: the snapshot file is written by hand in Ray's
format (``checkpoint_manager_snapshot.json``: ``checkpoint_results[].checkpoint_dir_name``)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from mage_ray.manifest import SCRATCH_ROOT, scratch_dir, sweep_scratch
from mage_ray.train.ray_shell import SNAPSHOT, drop_unregistered_checkpoints


def test_scratch_dir_is_removed_and_a_killed_owners_dir_is_swept():
    """A scratch dir vanishes on exit; one left by a process that is gone (here: a child that created it and was
    killed with SIGKILL) is removed when the next scratch dir is made; a live process's dir is kept."""
    with scratch_dir("mage-test") as d:
        assert d.is_dir() and d.parent.name == SCRATCH_ROOT
        (d / "f").write_text("x")
    assert not d.exists()
    code = (
        "import os, signal\nfrom mage_ray.manifest import scratch_dir\n"
        "with scratch_dir('mage-killed') as d:\n    print(d, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    orphan = Path(out.stdout.strip())
    assert out.returncode == -9 and orphan.is_dir()  # SIGKILL: no finally ran
    with scratch_dir("mage-live") as live:
        assert not orphan.exists() and live.is_dir()
        assert orphan.name not in sweep_scratch() and live.is_dir()  # our own live dir is kept


def test_unregistered_checkpoints_are_dropped(tmp_path):
    """Run dir with checkpoints a, b (registered) and c (written after the controller died): c is removed, a and
    b stay; a run without a snapshot registered nothing, so all its checkpoint dirs go; a URI is left alone."""
    run = tmp_path / "ray" / "backbones--b0"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c"):
        (run / name).mkdir(parents=True)
    snap = {
        "checkpoint_results": [
            {"checkpoint_dir_name": "checkpoint_a"},
            {"checkpoint_dir_name": "checkpoint_b"},
        ],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_b"},
    }
    (run / SNAPSHOT).write_text(json.dumps(snap))
    assert drop_unregistered_checkpoints(str(tmp_path / "ray"), "backbones--b0") == ["checkpoint_c"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_a", "checkpoint_b", SNAPSHOT]
    bare = tmp_path / "ray" / "values--x"
    (bare / "checkpoint_z").mkdir(parents=True)
    assert drop_unregistered_checkpoints(str(tmp_path / "ray"), "values--x") == ["checkpoint_z"]
    assert drop_unregistered_checkpoints("s3://bucket/ray", "backbones--b0") == []
    assert drop_unregistered_checkpoints(tempfile.gettempdir(), "no-such-run") == []
