"""End to end on a real multi-node Ray cluster on this machine (cluster/local/start.sh: a head and two
worker nodes with logical GPUs, dashboard up for the Jobs API): the sweep job submitted with
``JobSubmissionClient``, stopped mid-run, resubmitted, resumed from its stored state.

The cluster is started once for the module and always stopped (cluster/local/stop.sh ends exactly its
processes, found by its temp dir; ``ray stop`` would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow]

# The smoke config, cut to the stages a resume test needs: beta (one candidate), 2 backbones (1 GRPO step
# each), alpha (a 2-trial Tune sweep, decode only), gamma (one candidate), bundle + report. Method `bs`
# needs neither the Rewarded Soups backbones nor value models.
SWEEP_ARGS = (
    "eval.methods=bs sweep.gamma_method=bs 'sweep.gammas=[0.0]' 'sweep.alphas=[0.0, 0.2]' "
    "backbone.steps=1 decode.max_new_tokens=4"
)
JOB_TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def local_cluster():
    """cluster/local/start.sh with a head (1 CPU) and 2 workers (1 CPU, 1 logical GPU each)."""
    sys.path.insert(0, str(REPO / "cluster" / "local"))
    import ray_procs

    cdir = tempfile.mkdtemp(prefix="mrjs_", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**_env(), "CLUSTER_DIR": cdir, "NUM_WORKERS": "2", "HEAD_CPUS": "1", "WORKER_CPUS": "1",
           "WORKER_GPUS": "1"}  # fmt: skip
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "cluster/local/start.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        info = dict(
            line.removeprefix("export ").split("=", 1)
            for line in Path(cdir, "env").read_text().splitlines()
            if line.startswith("export ")
        )
        assert info["RAY_ADDRESS"] in proc.stdout  # the script prints the address to use
        yield {"dir": cdir, **info}
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh")], env=env, timeout=120)
        left = ray_procs.find([cdir + "/"])
        shutil.rmtree(cdir, ignore_errors=True)
        assert not left, f"Ray processes left behind: {[p.pid for p in left]}"


def test_local_cluster_has_three_nodes_and_logical_gpus(local_cluster):
    """3 nodes; 2 logical GPUs, one per worker; two live 1-GPU actors sit on the two worker nodes."""
    script = """
import json, ray
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
@ray.remote(num_gpus=1, num_cpus=0)
class Where:
    def get(self):
        return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()
actors = [Where.remote() for _ in range(2)]  # both alive at once: one per GPU
nodes = [n for n in ray.nodes() if n["Alive"]]
print(json.dumps({"nodes": len(nodes), "gpu": ray.cluster_resources().get("GPU", 0),
                  "cpu": ray.cluster_resources().get("CPU", 0),
                  "gpu_nodes": sorted(n["NodeID"] for n in nodes if n["Resources"].get("GPU")),
                  "placed": sorted(ray.get([a.get.remote() for a in actors]))}))
"""
    env = {**_env(), "RAY_ADDRESS": local_cluster["RAY_ADDRESS"]}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["nodes"], r["gpu"], r["cpu"]) == (3, 2, 3)
    assert sorted(node for node, _ in r["placed"]) == r["gpu_nodes"]
    assert all(ids == [0] for _, ids in r["placed"])


def _wait(client, job_id: str, until, timeout_s: float) -> str:
    t = time.time()
    while time.time() - t < timeout_s:
        status = client.get_job_status(job_id)
        if until(status):
            return status
        time.sleep(2)
    raise AssertionError(f"job {job_id}: still {client.get_job_status(job_id)} after {timeout_s:.0f} s")


def test_sweep_job_stop_resubmit_resume(local_cluster, tmp_path):
    """Submit the sweep; stop it once its backbones stage is recorded; resubmit: it finishes without
    redoing the stages the first job completed, and writes the bundle and the report.

    The job's python is the venv's (start.sh puts it first on the cluster's PATH).
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    storage, run = str(tmp_path / "runs"), "jobtest"
    run_dir = Path(storage, run)
    entrypoint = (
        "python -c 'import sys; print(\"JOB_PYTHON\", sys.prefix)' && "
        f"python jobs/sweep.py --config configs/smoke.yaml storage.storage_path={storage} "
        f"storage.run_name={run} {SWEEP_ARGS}"
    )
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache"],
        "env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_DEDUP_LOGS": "0"},
    }
    client = JobSubmissionClient(local_cluster["RAY_DASHBOARD"])

    # 1. First submission: stop it as soon as the backbones stage is recorded.
    first = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    backbones_rec = run_dir / "stages" / "backbones.json"
    t = time.time()
    while not backbones_rec.exists():
        status = client.get_job_status(first)
        assert not status.is_terminal(), (
            f"first job ended {status} early:\n{client.get_job_logs(first)[-4000:]}"
        )
        assert time.time() - t < JOB_TIMEOUT_S, "backbones stage not recorded in time"
        time.sleep(2)
    client.stop_job(first)
    status = _wait(client, first, lambda s: s.is_terminal(), 120)
    logs_first = client.get_job_logs(first)
    assert status == JobStatus.STOPPED, f"first job {status} (finished before the stop took effect?)"
    assert "=== backbones" in logs_first
    assert not (run_dir / "bundle" / "bundle.json").exists()
    python_line = next(ln for ln in logs_first.splitlines() if ln.startswith("JOB_PYTHON "))
    assert python_line.split(" ", 1)[1] == sys.prefix  # the venv, not the system python
    done_before = {p.name: p.read_bytes() for p in (run_dir / "stages").glob("*.json")}
    assert {"beta.json", "backbones.json"} <= set(done_before)

    # 2. Resubmit the same command: it resumes and succeeds.
    second = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    status = _wait(client, second, lambda s: s.is_terminal(), JOB_TIMEOUT_S)
    logs_second = client.get_job_logs(second)
    assert status == JobStatus.SUCCEEDED, logs_second[-4000:]
    assert "=== backbones" not in logs_second  # completed stages are not redone...
    for name, data in done_before.items():
        assert (run_dir / "stages" / name).read_bytes() == data, f"stage record {name} was rewritten"
    assert "bundle ready" in logs_second
    bundle = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    assert bundle  # ...and the run is complete: bundle + report
    report = run_dir / "report"
    assert report.is_dir() and any(report.iterdir())


def test_jobs_keep_per_backbone_progress_lines(monkeypatch):
    """Ray's driver folds log lines that differ only in numbers ("[b0] step 3 ..." / "[b1] step 3 ...") into one;
    init_ray turns that off even when ``ray`` was imported first, unless RAY_DEDUP_LOGS asks for it."""
    import ray._private.ray_logging as ray_logging

    from mage_ray.runtime import _keep_repeated_log_lines

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    _keep_repeated_log_lines()
    assert ray_logging.RAY_DEDUP_LOGS is False and os.environ["RAY_DEDUP_LOGS"] == "0"

    monkeypatch.setattr(ray_logging, "RAY_DEDUP_LOGS", True)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    _keep_repeated_log_lines()
    assert ray_logging.RAY_DEDUP_LOGS is True
