"""Placement of training runs on GPU bundles, the pre-flight resource check, and autoscaling.

Everything runs on CPU: GPUs are Ray's logical resources (``Cluster().add_node(num_gpus=1)``), as in
Ray's own tests. Nothing calls CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mage_ray.train.placement import (
    InsufficientResourcesError,
    bundles_that_fit,
    check_resources,
    runs_that_fit,
    worker_bundle,
)

REPO = Path(__file__).resolve().parents[1]
TWO_GPU_NODES = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]


@pytest.fixture(autouse=True)
def _fixed_size_cluster_default(monkeypatch):
    """Tests below assume the default (no autoscaler) unless they say otherwise."""
    monkeypatch.delenv("MAGE_RAY_ALLOW_AUTOSCALE", raising=False)


# ---------------------------------------------------------------------------------------------
# Plain functions (no Ray cluster)


@pytest.mark.parametrize(
    "res, use_gpu",
    [
        (None, False),
        (None, True),
        ({"CPU": 1}, True),
        ({"CPU": 8, "GPU": 2}, True),
        ({"CPU": 2, "GPU": 0}, False),
    ],
)
def test_worker_bundle_follows_ray_train_rule(res, use_gpu):
    """Our bundle is exactly what Ray Train's ScalingConfig reserves per worker."""
    import ray.train

    sc = ray.train.ScalingConfig(num_workers=2, use_gpu=use_gpu, resources_per_worker=res)
    expected = {k: float(v) for k, v in sc._resources_per_worker_not_none.items()}
    assert worker_bundle(res, use_gpu) == expected


def test_bundles_that_fit_is_min_over_resources():
    """Node {CPU: 5, GPU: 2} holds min(floor(5/2), floor(2/1)) = 2 bundles of {CPU: 2, GPU: 1}."""
    assert bundles_that_fit({"CPU": 5, "GPU": 2}, {"CPU": 2, "GPU": 1}) == 2
    assert bundles_that_fit({"CPU": 5}, {"CPU": 1, "GPU": 1}) == 0


def test_runs_that_fit_by_strategy():
    """Two nodes {CPU: 2, GPU: 1}; runs of 2 workers x {GPU: 1, CPU: 1}.

    PACK/SPREAD: the 2 GPUs hold one run. STRICT_PACK: no node has 2 GPUs -> 0. STRICT_SPREAD: one bundle
    per node -> 1. Runs of 1 worker: 2 at once (one per GPU).
    """
    b = {"GPU": 1.0, "CPU": 1.0}
    assert runs_that_fit(TWO_GPU_NODES, b, 2, "PACK") == 1
    assert runs_that_fit(TWO_GPU_NODES, b, 2, "SPREAD") == 1
    assert runs_that_fit(TWO_GPU_NODES, b, 2, "STRICT_PACK") == 0
    assert runs_that_fit(TWO_GPU_NODES, b, 2, "STRICT_SPREAD") == 1
    assert runs_that_fit(TWO_GPU_NODES, b, 1, "PACK") == 2
    # A per-run driver bundle {CPU: 1} on nodes of 2 CPUs: each node then holds driver + 1 worker -> 2 runs.
    assert runs_that_fit(TWO_GPU_NODES, b, 1, "PACK", driver={"CPU": 1.0}) == 2
    # ...but a driver of {CPU: 2} leaves one node without CPU for its worker -> 1 run.
    assert runs_that_fit(TWO_GPU_NODES, b, 1, "PACK", driver={"CPU": 2.0}) == 1


def test_check_resources_counts_concurrent_runs():
    """n=2 backbones, 1 worker each with use_gpu on two 1-GPU nodes: both run at once; 3 runs -> 2 (queue)."""
    assert check_resources(1, {"CPU": 1}, True, concurrent_runs=2, nodes=TWO_GPU_NODES) == 2
    assert check_resources(1, {"CPU": 1}, True, concurrent_runs=3, nodes=TWO_GPU_NODES) == 2


def test_check_resources_fails_with_a_clear_message():
    """Two workers x {GPU: 1} on a cluster with one GPU can never be placed: the message says so."""
    with pytest.raises(InsufficientResourcesError) as e:
        check_resources(2, {"CPU": 1}, True, nodes=[{"CPU": 4, "GPU": 1}])
    msg = str(e.value)
    assert "needs 2 GPU bundles of {GPU: 1, CPU: 1}" in msg
    assert "the cluster has 1 GPU in total" in msg
    assert "add GPU nodes or lower backbone.num_workers" in msg
    # The total suffices but no node holds one bundle of 2 GPUs.
    with pytest.raises(InsufficientResourcesError, match="no single node holds one bundle"):
        check_resources(1, {"CPU": 1, "GPU": 2}, True, nodes=TWO_GPU_NODES, field_prefix="value")
    with pytest.raises(InsufficientResourcesError, match="value.num_workers"):
        check_resources(1, {"CPU": 1, "GPU": 2}, True, nodes=TWO_GPU_NODES, field_prefix="value")


def test_check_resources_waits_with_autoscaler(caplog, monkeypatch):
    """With an autoscaler the shortfall is logged (the visible reason for the wait), no exception, and all
    runs are started (their pending placement groups are what the autoscaler scales up for)."""
    with caplog.at_level("WARNING", logger="mage_ray.train.placement"):
        k = check_resources(2, {"CPU": 1}, True, concurrent_runs=3, nodes=[{"CPU": 4}], allow_autoscale=True)
    assert k == 3
    assert "0 of 3 backbone runs" in caplog.text and "waiting for the autoscaler" in caplog.text
    assert "the cluster has 0 GPU in total" in caplog.text
    # Default: the MAGE_RAY_ALLOW_AUTOSCALE environment variable (set by the shipped autoscaling clusters).
    monkeypatch.setenv("MAGE_RAY_ALLOW_AUTOSCALE", "1")
    assert check_resources(2, {"CPU": 1}, True, concurrent_runs=2, nodes=[{"CPU": 4}]) == 2
    monkeypatch.setenv("MAGE_RAY_ALLOW_AUTOSCALE", "0")
    with pytest.raises(InsufficientResourcesError):
        check_resources(2, {"CPU": 1}, True, concurrent_runs=2, nodes=[{"CPU": 4}])


def test_check_resources_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backbone.num_workers"):
        check_resources(0, {"CPU": 1}, False, nodes=TWO_GPU_NODES)
    with pytest.raises(ValueError, match="placement strategy"):
        check_resources(1, {"CPU": 1}, False, nodes=TWO_GPU_NODES, placement_strategy="TIGHT")


# ---------------------------------------------------------------------------------------------
# A real multi-node Ray cluster in this process: head + two nodes with one logical GPU each (slow: starting
# three raylets takes 10-60 s on 2 busy cores)


@pytest.fixture(scope="module")
def gpu_cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Trial and worker processes cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_live_cluster_check(gpu_cluster):
    """On the live cluster (2 x 1 GPU): 2 single-worker GPU runs fit; 3 GPU workers per run never do."""
    import ray

    assert ray.cluster_resources().get("GPU") == 2
    assert check_resources(1, {"CPU": 1}, True, concurrent_runs=2) == 2
    assert check_resources(2, {"CPU": 1}, True, concurrent_runs=2) == 1
    with pytest.raises(InsufficientResourcesError, match="the cluster has 2 GPU in total"):
        check_resources(3, {"CPU": 1}, True)


@pytest.mark.slow
def test_run_concurrent_fails_fast_instead_of_waiting(gpu_cluster, tmp_path):
    """The Tune/Train plumbing checks before it starts: 3 GPU workers per run on 2 GPUs raise at once."""
    from mage_ray.train.ray_shell import Scaling, run_concurrent

    t = time.time()
    with pytest.raises(InsufficientResourcesError, match="needs 3 GPU bundles"):
        run_concurrent(
            _placement_driver,
            [{"label": "b0", "out": str(tmp_path)}],
            scaling=Scaling(3, True, {"CPU": 1}),
            storage_path=str(tmp_path / "ray"),
            name="too-big",
        )
    assert time.time() - t < 10


def _report_placement(config: dict) -> None:
    """Ray Train per-worker function: record where this worker runs and which GPU Ray gave it."""
    import ray
    import ray.train

    ctx = ray.get_runtime_context()
    rec = {
        "label": config["label"],
        "rank": ray.train.get_context().get_world_rank(),
        "node": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    Path(config["out"], f"{config['label']}-{rec['rank']}.json").write_text(json.dumps(rec))


def _placement_driver(label: str, out: str, scaling=None, storage: str | None = None) -> dict:
    """Tune trial driver: one Ray Train run of ``_report_placement`` via ``run_torch_trainer``.

    Ray Train picks the NCCL backend whenever a worker reserves a GPU, and NCCL cannot start without CUDA,
    so on logical GPUs the process group must be gloo. ``run_torch_trainer`` has no backend argument
    (reported), so this driver swaps in a TorchTrainer with ``TorchConfig(backend="gloo")`` inside its own
    trial process; scheduling, placement groups and GPU assignment are Ray's, unchanged.
    """
    import functools

    import ray.train.torch as rtt

    from mage_ray.train.ray_shell import Scaling, run_torch_trainer

    rtt.TorchTrainer = functools.partial(rtt.TorchTrainer, torch_config=rtt.TorchConfig(backend="gloo"))
    run_torch_trainer(
        _report_placement,
        {"label": label, "out": out},
        scaling=scaling or Scaling(1, True, {"CPU": 1}),
        storage_path=storage or tempfile.mkdtemp(),
        name=f"placement-{label}",
    )
    return {"label": label}


@pytest.mark.slow
def test_two_backbone_runs_land_on_distinct_gpus(gpu_cluster, tmp_path):
    """n = 2 concurrent runs (use_gpu, 1 worker of {CPU: 1} each) through run_concurrent + run_torch_trainer.

    The two nodes have one GPU each, so the two workers must be on different nodes, each given GPU id 0 of
    its node with CUDA_VISIBLE_DEVICES set to it by Ray.
    """
    import ray

    from mage_ray.train.ray_shell import Scaling, run_concurrent

    out = tmp_path / "placement"
    out.mkdir()
    scaling = Scaling(1, True, {"CPU": 1})
    jobs = [
        {"label": f"b{i}", "out": str(out), "scaling": scaling, "storage": str(tmp_path / "ray")}
        for i in range(2)
    ]
    results = run_concurrent(
        _placement_driver, jobs, scaling=scaling, storage_path=str(tmp_path / "tune"), name="placement"
    )
    assert [r["label"] for r in results] == ["b0", "b1"]
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [r["label"] for r in recs] == ["b0", "b1"]
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
    assert {r["node"] for r in recs} == gpu_nodes  # one run per GPU node
    for r in recs:
        assert r["gpu_ids"] == ["0"] and r["cuda_visible_devices"] == "0"


# ---------------------------------------------------------------------------------------------
# Autoscaling with Ray's fake multi-node provider


@pytest.mark.slow
def test_autoscaler_adds_gpu_nodes_and_releases_them():
    """cluster/local/autoscale_demo.py: 0 GPU nodes -> 2 added for 2 pending GPU bundles -> 0 after idling."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "cluster/local/autoscale_demo.py"), "--json", "--timeout-s", "150"],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY ")]
    assert lines, f"no summary; rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    s = json.loads(lines[-1][len("SUMMARY ") :])
    assert s["gpu_nodes_before"] == 0 and s["fit_now"] == 0 and s["runs_started"] == 2
    assert s["gpu_nodes_peak"] == 2 and len(s["placed_nodes"]) == 2
    assert s["gpu_nodes_after"] == 0, "idle GPU nodes were not released"
    assert s["leftover_processes"] == 0
    assert proc.returncode == 0
