"""configs/summary.yaml rehearsed (see tests/test_rehearse.py, which rehearses configs/hh_rlhf.yaml's whole graph),
with its artifacts on an S3-compatible object store, then resumed. A module of its own so that the suite's two
pytest-xdist workers rehearse the two configs side by side."""

from __future__ import annotations

import json

import pytest
from test_rehearse import FULL_GRAPH, _check_report, _rehearse, check_runs_held_distinct_gpus

from mage_ray.config import load_config

SUMMARY_OVERRIDES = (
    "sweep.betas=[0.7]",
    "eval.methods=[rs,bs,mod,mage-e-m,mage-i-m]",
)
"""What the suite leaves out of summary.yaml's graph: the beta trials (one candidate) and MORLHF, which the hh_rlhf
rehearsal runs through the same code with the same requests (a Tune trial per beta driving its backbone runs; one
GRPO Train run per grid point), and mage-e and mage-i, whose gamma stages are decode trials like mage-e-m's and
mage-i-m's. What is summary's own (its reward model classes, BART and GPT-2, and its dataset format) goes through
every stage that is left: backbones at beta and at 1, rollouts, value models, the decode sweeps, evaluation, grid
and Serve. `mage-ray rehearse --config configs/summary.yaml` runs all of it."""


def _objects(root: str) -> dict[str, int]:
    """Every object under ``root`` on the object store, with its modification time (ns)."""
    import pyarrow.fs

    from mage_ray import storage

    fs, inner = storage.filesystem(root)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    return {i.path: i.mtime_ns for i in infos if i.type == pyarrow.fs.FileType.File}


@pytest.mark.slow
def test_rehearse_summary_on_s3_and_resume(repo_root, tmp_path, s3_bucket):
    """summary.yaml rehearsed with its artifacts on an S3-compatible server (moto, started by the fixture): the
    stages, the Ray Data grid actor and the Serve replica read the bundle from the object store; a resumed
    rehearsal then skips every stage and writes no backbone or stage record again."""
    from mage_ray.bundle import load_bundle
    from mage_ray.pipeline import planned_stages
    from mage_ray.storage import is_file, join

    out, storage = tmp_path / "summary", f"{s3_bucket}/rehearsal"
    proc = _rehearse(repo_root, "summary", out, "--storage", storage, *SUMMARY_OVERRIDES)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "rehearsal.json").read_text())
    _check_report(report, 2, tuple(s for s in FULL_GRAPH if s not in ("beta", "morlhf")))
    # the 2 value-model runs at once (the backbones stage also trains the beta = 1 pair after B(beta)'s)
    check_runs_held_distinct_gpus(out, 2, ("values",))
    run = join(storage, "summary")
    for f in ("bundle/bundle.json", "report/metrics.json", "report/front.png", "report/sweep.md"):
        assert is_file(join(run, f)), f
    b = load_bundle(join(run, "bundle"))
    assert (
        b.source == join(run, "bundle") and b.objectives == ["faithful", "summary"] and len(b.backbones) == 2
    )
    inner = run.split("://", 1)[1]
    trained = {
        k: v for k, v in _objects(run).items() if k.startswith((f"{inner}/backbones/", f"{inner}/stages/"))
    }
    assert any("/backbones/" in k for k in trained)

    again = _rehearse(
        repo_root,
        "summary",
        out,
        "--storage",
        storage,
        "--resume",
        "--no-grid",
        "--no-serve",
        *SUMMARY_OVERRIDES,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    cfg = load_config(out / "config.yaml")
    for st in planned_stages(cfg):
        assert f"[pipeline] stage {st!r}: done at " in again.stdout, st
    assert "[pipeline] ===" not in again.stdout  # no stage started again
    after = _objects(run)
    assert {k: after.get(k) for k in trained} == trained
