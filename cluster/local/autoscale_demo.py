"""Autoscaling on one machine: Ray's fake multi-node provider adds GPU worker nodes for pending GPU bundles
and removes them once idle. No cloud, no real GPU (the GPUs are logical resources).

    .venv/bin/python cluster/local/autoscale_demo.py            # prints a timeline, exits 0 on success
    .venv/bin/python cluster/local/autoscale_demo.py --json     # the same, plus one JSON summary line

What it does, in the terms of a backbone sweep (two backbones, ``backbone.num_workers=1``,
``backbone.use_gpu=true``, ``backbone.resources_per_worker={CPU: 1}``):

1. start a head with 1 CPU and no GPU, and an autoscaler whose ``gpu_worker`` node type has
   ``{CPU: 1, GPU: 1}``, ``min_workers: 0``, ``max_workers: 2``, ``idle_timeout_minutes: 0.1`` (6 s);
2. the pre-flight check (``mage_ray.train.placement.check_resources(..., allow_autoscale=True)``) finds
   room for 0 of the 2 runs, logs why, and lets both start and wait instead of failing;
3. reserve the two runs' worker bundles ``{GPU: 1, CPU: 1}`` as placement groups, which is exactly what
   Ray Train asks for; the autoscaler launches two ``gpu_worker`` nodes and both groups become ready;
4. run one task in each group (it reports its node and GPU id), remove the groups, and watch the
   autoscaler terminate the idle GPU nodes.

This is ``ray.cluster_utils.AutoscalingCluster`` without its two problems here: the 2.60 wheel lacks the
``fake_multi_node/example.yaml`` it reads, and its ``start()`` runs ``ray stop --force``, which would end
every Ray process on the machine. This one uses its own temp dir and GCS port and stops only its own
processes (``ray_procs.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray_procs  # noqa: E402

GPU_NODE_TYPE = "gpu_worker"
AUTH = os.environ.setdefault("RAY_AUTH_MODE", "disabled")
"""Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists; pin one mode for the
cluster and this driver (the demo cluster lives for a minute on this machine)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_autoscaler_config(
    head_resources: dict[str, float],
    worker_node_types: dict[str, Any],
    *,
    gcs_address: str,
    idle_timeout_minutes: float = 0.1,
    max_workers: int = 8,
) -> dict[str, Any]:
    """A full autoscaler config for the ``fake_multinode`` provider (Ray's fake_multi_node/example.yaml).

    Passes ``ray.autoscaler._private.util.validate_config``; ``gcs_address`` points the fake provider's
    worker nodes at this cluster's GCS instead of the default port 6379.
    """
    types = {
        "ray.head.default": {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
        **worker_node_types,
    }
    return {
        "cluster_name": "mage_ray_fake",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class FakeAutoscalingCluster:
    """A head node with an autoscaler that starts/stops fake worker nodes (raylets) on this machine."""

    def __init__(self, head_resources: dict[str, float], worker_node_types: dict[str, Any], **config_kw: Any):
        self.dir = tempfile.mkdtemp(prefix="mrfa_", dir="/tmp")  # short: unix socket paths live under it
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head_resources = dict(head_resources)
        ip = _node_ip()
        self.config = fake_autoscaler_config(
            head_resources, worker_node_types, gcs_address=f"{ip}:{self.port}", **config_kw
        )

    def start(self) -> None:
        cfg_path = os.path.join(self.dir, "autoscaler.json")
        Path(cfg_path).write_text(json.dumps(self.config))
        res = dict(self.head_resources)
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [
            ray_bin if os.path.exists(ray_bin) else "ray",
            "start",
            "--head",
            f"--port={self.port}",
            f"--autoscaling-config={cfg_path}",
            f"--temp-dir={self.dir}",
            f"--num-cpus={res.pop('CPU', 0)}",
            f"--num-gpus={res.pop('GPU', 0)}",
            "--include-dashboard=false",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--min-worker-port=0",
            "--max-worker-port=0",
            "--disable-usage-stats",
        ]
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        env = {
            **os.environ,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_AUTH_MODE": AUTH,
        }
        env.pop("RAY_ADDRESS", None)
        log = open(os.path.join(self.dir, "start.log"), "w")  # noqa: SIM115 - kept for the process lifetime
        subprocess.run(cmd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=180)

    def session_name(self) -> str | None:
        latest = Path(self.dir) / "session_latest"
        return latest.resolve().name if latest.exists() else None

    def shutdown(self) -> tuple[int, int]:
        """Stop the head, the autoscaler and every fake worker node (by temp dir, session name, GCS port)."""
        marks = [self.dir + "/", self.session_name() or ""]
        out = ray_procs.stop(marks, gcs_port=self.port)
        if not os.environ.get("MAGE_KEEP_FAKE_CLUSTER_DIR"):
            shutil.rmtree(self.dir, ignore_errors=True)
        return out


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def _gpu_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def _wait(pred, timeout_s: float, poll_s: float = 0.5) -> bool:
    t = time.time()
    while time.time() - t < timeout_s:
        if pred():
            return True
        time.sleep(poll_s)
    return False


def run_demo(n_runs: int = 2, timeout_s: float = 150.0, log=print) -> dict[str, Any]:
    """Steps 1-4 of the module docstring; return a summary (node counts and timings)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mage_ray.train.placement import check_resources, cluster_nodes, runs_that_fit, worker_bundle

    t0 = time.time()

    def say(msg: str) -> None:
        log(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    gpu_type = {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": n_runs}
    cluster = FakeAutoscalingCluster({"CPU": 1}, {GPU_NODE_TYPE: gpu_type}, idle_timeout_minutes=0.1)
    summary: dict[str, Any] = {"n_runs": n_runs}
    try:
        cluster.start()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        say(
            f"head up at {cluster.address}: {_fmt_res(ray.cluster_resources())}; GPU nodes: {len(_gpu_nodes())}"
        )
        summary["gpu_nodes_before"] = len(_gpu_nodes())

        bundle = worker_bundle({"CPU": 1}, use_gpu=True)
        summary["fit_now"] = runs_that_fit(cluster_nodes(), bundle, 1)
        k = check_resources(1, {"CPU": 1}, True, concurrent_runs=n_runs, allow_autoscale=True)
        say(
            f"pre-flight: {summary['fit_now']} of {n_runs} runs fit now; allow_autoscale, so all {k} start and wait"
        )
        summary["runs_started"] = k

        t_req = time.time()
        pgs = [placement_group([bundle], strategy="PACK") for _ in range(k)]
        say(f"requested {n_runs} placement groups of {bundle} (one per backbone run)")
        ready = ray.get([pg.ready() for pg in pgs], timeout=timeout_s)
        t_up = time.time() - t_req
        say(f"all {len(ready)} placement groups ready; GPU nodes: {len(_gpu_nodes())}")
        summary["gpu_nodes_peak"] = len(_gpu_nodes())
        summary["scale_up_s"] = round(t_up, 1)

        @ray.remote(num_cpus=1, num_gpus=1)
        def where() -> dict[str, Any]:
            return {"node": ray.get_runtime_context().get_node_id()[-8:], "gpu_ids": ray.get_gpu_ids()}

        placed = ray.get(
            [
                where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote()
                for pg in pgs
            ]
        )
        say(f"one task per run ran on: {placed}")
        summary["placed_nodes"] = sorted({p["node"] for p in placed})

        for pg in pgs:
            remove_placement_group(pg)
        t_rm = time.time()
        say("placement groups removed; waiting for the idle GPU nodes to be terminated (idle timeout 6 s)")
        gone = _wait(lambda: not _gpu_nodes(), timeout_s)
        summary["scale_down_s"] = round(time.time() - t_rm, 1)
        summary["gpu_nodes_after"] = len(_gpu_nodes())
        say(f"GPU nodes now: {summary['gpu_nodes_after']} ({'released' if gone else 'NOT released'})")
        summary["ok"] = bool(
            summary["gpu_nodes_before"] == 0
            and summary["gpu_nodes_peak"] >= n_runs
            and len(summary["placed_nodes"]) == n_runs
            and gone
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        stopped, left = cluster.shutdown()
        say(f"cluster stopped ({stopped} processes; {left} left)")
        summary["leftover_processes"] = left
    return summary


def _fmt_res(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fake multi-node autoscaling demo (logical GPUs).")
    ap.add_argument("--runs", type=int, default=2, help="GPU runs to request (= GPU nodes to add)")
    ap.add_argument("--timeout-s", type=float, default=150.0)
    ap.add_argument("--json", action="store_true", help="print a JSON summary line at the end")
    args = ap.parse_args(argv)
    summary = run_demo(args.runs, args.timeout_s)
    if args.json:
        print("SUMMARY " + json.dumps(summary), flush=True)
    return 0 if summary.get("ok") and not summary.get("leftover_processes") else 1


if __name__ == "__main__":
    sys.exit(main())
