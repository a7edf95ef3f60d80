"""Every shipped cluster config is validated: the launcher YAML with Ray's own autoscaler schema, the KubeRay
manifests by structure, the Serve config with Ray Serve's schema, and all of them against the resources
configs/hh_rlhf.yaml asks for (via mage_ray.train.placement)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from mage_ray.config import load_config
from mage_ray.train.placement import check_resources

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
HH = REPO / "configs" / "hh_rlhf.yaml"


def _load(rel: str) -> Any:
    return yaml.safe_load((REPO / rel).read_text())


def _serve_config_script() -> Any:
    """cluster/serve_config.py as a module (cluster/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_config", CLUSTER / "serve_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NODE_CHECKOUT = _serve_config_script().NODE_CHECKOUT  # the checkout's path on every node (image user ray)


def _here(node_path: str) -> Path:
    """This checkout's copy of a file the cluster's nodes read at ``node_path`` (under NODE_CHECKOUT)."""
    path = Path(node_path)
    assert path.is_absolute() and path.is_relative_to(NODE_CHECKOUT), node_path
    here = REPO / path.relative_to(NODE_CHECKOUT)
    assert here.is_file(), f"{node_path}: {here} is not in the repo"
    return here


def _deployments(app: dict) -> dict[str, dict]:
    """A Serve config application's deployment overrides by name (Serve matches them to the app's deployments by
    name, not by position)."""
    return {d["name"]: d for d in app["deployments"]}


# ---------------------------------------------------------------------------------------------
# What the paper configs need of a node: GPU memory, shared memory

GIB = 2**30
# Llama-2-7B (Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288; the hub's config.json):
# 6.74e9 parameters, 32 layers, 32 key/value heads of 128 = 4096 K and V values per layer and token.
LLAMA2_7B = {"name": "meta-llama/Llama-2-7b-hf", "params": 6.74e9, "layers": 32, "kv_dim": 4096}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
NCCL_SHM_HEADROOM = 2 * GIB
"""/dev/shm a GPU node must keep free beside Ray's object store for NCCL's shared-memory segments."""
PAPER_CONFIGS = ("hh_rlhf.yaml", "summary.yaml")


def _kv_bytes_per_token(cfg: Any) -> int:
    """K and V of every layer for one token: 2 x layers x kv_dim x bytes (524288 B for Llama-2-7B in bf16)."""
    assert cfg.model.name_or_path == LLAMA2_7B["name"], "the constants below describe Llama-2-7B"
    return 2 * LLAMA2_7B["layers"] * LLAMA2_7B["kv_dim"] * DTYPE_BYTES[cfg.model.dtype]


def train_gpu_bytes_lower_bound(cfg: Any) -> float:
    """One backbone worker's GPU: the base weights + the KV cache of one GRPO generation step,
    prompts_per_step x num_generations sequences of max_prompt_tokens + max_completion_length tokens.
    hh_rlhf: 13.5e9 + 8 x 8 x (512 + 128) x 524288 B = 13.5e9 + 21.5e9 = 35.0e9 B (33.3 GiB). A lower bound:
    activations, the adapters' optimizer state and the reward models (task.reward_device: cuda) come on top."""
    b = cfg.backbone
    seqs = b.prompts_per_step * b.num_generations
    tokens = cfg.task.max_prompt_tokens + b.max_completion_length
    weights = LLAMA2_7B["params"] * DTYPE_BYTES[cfg.model.dtype]
    return weights + seqs * tokens * _kv_bytes_per_token(cfg)


def serve_gpu_bytes_lower_bound(cfg: Any) -> float:
    """One Serve replica's GPU: the base weights + the KV cache of a full batch, serve.max_batch_size requests of
    the config's decode.method, each as many rows as mage_ray.guidance plans for it (mage-e-m: policy + merged
    value row = 2), of max_prompt_tokens + decode.max_new_tokens tokens.
    hh_rlhf: 13.5e9 + 32 x 2 x 640 x 524288 B = 35.0e9 B (33.3 GiB). A lower bound (adapters, logits on top)."""
    import numpy as np

    from mage_ray.guidance import AdapterLayout, PlanArgs, make_plan

    n = cfg.n_objectives
    layout = AdapterLayout(
        k=3 * n,
        n=n,
        beta=cfg.backbone.beta,
        backbones=tuple(range(n)),
        rs_backbones=tuple(range(n, 2 * n)),
        values=tuple(range(2 * n, 3 * n)),
    )
    mu = np.full(n, 1.0 / n)
    rows = len(make_plan(cfg.decode.method, layout, mu, PlanArgs(), cfg.decode.gamma).rows)
    tokens = cfg.task.max_prompt_tokens + cfg.decode.max_new_tokens
    weights = LLAMA2_7B["params"] * DTYPE_BYTES[cfg.model.dtype]
    return weights + cfg.serve.max_batch_size * rows * tokens * _kv_bytes_per_token(cfg)


def _paper_bounds_mib() -> dict[str, float]:
    """The largest lower bound over the paper configs, in MiB (the unit of nvidia.com/gpu.memory)."""
    cfgs = [load_config(REPO / "configs" / name) for name in PAPER_CONFIGS]
    return {
        "train": max(train_gpu_bytes_lower_bound(c) for c in cfgs) / 2**20,
        "serve": max(serve_gpu_bytes_lower_bound(c) for c in cfgs) / 2**20,
    }


def test_gpu_memory_bounds_reject_24gb_gpus():
    """The lower bounds exceed the 23028 MiB of an A10G (the node types this repo used to ship) for training and
    for serving, and stay under an 80 GB / 48 GB GPU: the estimate separates the GPUs, it is not vacuous."""
    bounds = _paper_bounds_mib()
    assert 23028 < bounds["train"] < 81920 and 23028 < bounds["serve"] < 46068, bounds


def _object_store_bytes(monkeypatch: Any, memory: float, shm: float) -> int:
    """Ray's default object store for a node with ``memory`` bytes and a /dev/shm of ``shm`` bytes (Ray's own
    resolve_object_store_memory: 30% of memory, at most 200 GB, at most 95% of /dev/shm but not under 10 GB)."""
    import ray._private.utils as ray_utils

    monkeypatch.setattr(ray_utils, "get_shared_memory_bytes", lambda: int(shm))
    return ray_utils.resolve_object_store_memory(int(memory), None)


# ---------------------------------------------------------------------------------------------
# Cluster launcher (ray up)


def _prepared_launcher_config(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(cfg)  # fills the provider defaults, as `ray up` does
    validate_config(prepared)  # Ray's ray-schema.json + cross-field checks
    return prepared


def test_gpu_cluster_passes_ray_autoscaler_schema():
    cfg = _load("cluster/gpu-cluster.yaml")
    prepared = _prepared_launcher_config(cfg)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    assert {"gpu_train", "gpu_serve"} <= set(types)
    for name in ("gpu_train", "gpu_serve"):
        t = types[name]
        assert t["resources"]["GPU"] >= 1
        assert 0 <= t["min_workers"] <= t["max_workers"] <= prepared["max_workers"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]
    assert isinstance(cfg["idle_timeout_minutes"], (int, float)) and cfg["idle_timeout_minutes"] > 0
    # The package is installed on every node from the synced checkout.
    assert cfg["file_mounts"] == {"~/mage_ray": "."}
    # The shared filesystem that holds the runs and the served bundle is mounted into the containers.
    bundle = _load("cluster/serve.yaml")["applications"][0]["args"]["bundle"]
    assert "-v /mnt/mage_ray:/mnt/mage_ray" in cfg["docker"]["run_options"] and bundle.startswith(
        "/mnt/mage_ray/"
    )
    assert any("pip install" in c and "~/mage_ray" in c for c in prepared["setup_commands"])
    # The image's Ray is the Ray this project pins.
    import ray

    assert f"rayproject/ray:{ray.__version__}-" in cfg["docker"]["image"]


def test_launcher_schema_rejects_mistakes():
    """The validation has teeth: a misspelled top-level field and impossible min_workers both fail."""
    import jsonschema

    cfg = _load("cluster/gpu-cluster.yaml")
    with pytest.raises(jsonschema.ValidationError):
        _prepared_launcher_config({**cfg, "idle_timeout_minute": 5})
    bad = yaml.safe_load(yaml.safe_dump(cfg))
    bad["available_node_types"]["gpu_train"]["min_workers"] = 10
    with pytest.raises(ValueError, match="min_workers"):
        _prepared_launcher_config(bad)


def test_gpu_cluster_fits_the_paper_config():
    """configs/hh_rlhf.yaml on the launcher's node types (each at max_workers):

    backbones: n = 3 runs x 4 workers x {CPU: 8, GPU: 1} at once on the gpu_train nodes;
    value models: 3 runs x 2 x {CPU: 8, GPU: 1}; Serve: max_replicas replicas of {CPU: 4, GPU: 1} on gpu_serve.
    """
    hh = load_config(HH)
    types = _prepared_launcher_config(_load("cluster/gpu-cluster.yaml"))["available_node_types"]
    train_nodes = [types["gpu_train"]["resources"]] * types["gpu_train"]["max_workers"]
    n = hh.n_objectives
    b, v = hh.backbone, hh.value
    assert (
        check_resources(
            b.num_workers, b.resources_per_worker, b.use_gpu, concurrent_runs=n, nodes=train_nodes
        )
        == n
    )
    assert (
        check_resources(
            v.num_workers, v.resources_per_worker, v.use_gpu, concurrent_runs=n, nodes=train_nodes
        )
        == n
    )
    dep = _deployments(_load("cluster/serve.yaml")["applications"][0])["MageEngine"]
    opts = dep["ray_actor_options"]
    serve_nodes = [types["gpu_serve"]["resources"]] * types["gpu_serve"]["max_workers"]
    replicas = dep["autoscaling_config"]["max_replicas"]
    replica = {"CPU": opts["num_cpus"], "GPU": opts["num_gpus"]}
    assert check_resources(1, replica, False, concurrent_runs=replicas, nodes=serve_nodes) == replicas
    # The Serve config's replica asks for what the paper config's serve section says.
    assert (opts["num_cpus"], opts["num_gpus"]) == (hh.serve.num_cpus, hh.serve.num_gpus)


class Instance(NamedTuple):
    vcpus: int
    memory_gib: int
    gpus: int
    gpu_mib: int  # memory of one GPU as nvidia-smi / GPU Feature Discovery report it


# AWS EC2 instance types (aws.amazon.com/ec2/instance-types: accelerated computing, general purpose).
AWS = {
    "m5.2xlarge": Instance(8, 32, 0, 0),
    "p4de.24xlarge": Instance(96, 1152, 8, 81920),  # 8 x A100 80 GB
    "p5.48xlarge": Instance(192, 2048, 8, 81559),  # 8 x H100 80 GB
    "g6e.2xlarge": Instance(8, 64, 1, 46068),  # 1 x L40S 48 GB
    "g5.12xlarge": Instance(48, 192, 4, 23028),  # 4 x A10G 24 GB
    "g5.4xlarge": Instance(16, 64, 1, 23028),  # 1 x A10G 24 GB
}


def _docker_bytes(size: str) -> float:
    """Docker's --shm-size value (b, k, m, g: powers of 1024)."""
    size = size.strip("'\"").lower()
    units = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}
    return float(size[:-1]) * units[size[-1]] if size[-1] in units else float(size)


def _run_options(cfg: dict, node_type: str) -> list[str]:
    """The docker run options of a node of this type, merged as Ray merges them: the global run_options + the
    head's head_run_options, or a worker's worker_run_options (the node type's own docker section wins over the
    global one, StandardAutoscaler._get_node_specific_docker_config)."""
    docker = dict(cfg["docker"])
    if node_type == cfg["head_node_type"]:
        return docker.get("run_options", []) + docker.get("head_run_options", [])
    docker.update(cfg["available_node_types"][node_type].get("docker", {}))
    return docker.get("run_options", []) + docker.get("worker_run_options", [])


def test_launcher_node_types_are_their_instance_types(monkeypatch):
    """Each node type's Ray resources are its instance type's (CPU = vCPUs or 0 on the head, GPU = GPUs); its
    `memory` resource and Ray's object store fit the instance's RAM with 5% to spare; its --shm-size /dev/shm
    holds the object store Ray would give that RAM (Ray shrinks the store to 95% of a smaller /dev/shm); a GPU node's /dev/shm keeps NCCL_SHM_HEADROOM beside the object store; gpu_train's GPUs hold the
    training lower bound and gpu_serve's the serving one (both above a 24 GB A10G)."""
    cfg = _prepared_launcher_config(_load("cluster/gpu-cluster.yaml"))
    bounds = _paper_bounds_mib()
    for name, t in cfg["available_node_types"].items():
        inst = AWS[t["node_config"]["InstanceType"]]
        res = t["resources"]
        assert res.get("GPU", 0) == inst.gpus, name
        assert res["CPU"] == (0 if name == cfg["head_node_type"] else inst.vcpus), name
        ram = inst.memory_gib * GIB
        shm_opts = [o.split("=", 1)[1] for o in _run_options(cfg, name) if o.startswith("--shm-size=")]
        assert len(shm_opts) == 1, f"{name}: needs one --shm-size (docker's default /dev/shm is 64 MiB)"
        shm = _docker_bytes(shm_opts[0])
        store = _object_store_bytes(monkeypatch, ram, shm)
        assert store == _object_store_bytes(monkeypatch, ram, 10 * ram), (
            f"{name}: /dev/shm shrinks the object store"
        )
        assert store <= shm
        assert res.get("memory", 0) + store <= 0.95 * ram, name
        if inst.gpus:
            assert shm - store >= NCCL_SHM_HEADROOM, f"{name}: /dev/shm leaves NCCL too little"
    train = AWS[cfg["available_node_types"]["gpu_train"]["node_config"]["InstanceType"]]
    serve = AWS[cfg["available_node_types"]["gpu_serve"]["node_config"]["InstanceType"]]
    assert train.gpu_mib > bounds["train"] and serve.gpu_mib > bounds["serve"], (train, serve, bounds)


def test_launcher_shares_the_model_cache_and_the_token():
    """Every container gets HF_HOME and MAGE_RAY_CACHE on the EFS mount, the same as the Serve config's
    runtime_env; huggingface_hub, given that HF_HOME, keeps the hub token (`hf auth login`) on the EFS mount too,
    so one login serves every node. No token is written in the file."""
    import subprocess
    import sys

    cfg = _load("cluster/gpu-cluster.yaml")
    opts = cfg["docker"]["run_options"]
    (mount,) = [o.split()[1].split(":")[1] for o in opts if o.startswith("-v ") and "/mnt/mage_ray" in o]
    env = dict(o.split(None, 1)[1].split("=", 1) for o in opts if o.startswith("-e "))
    assert "HF_TOKEN" not in env
    serve_env = _load("cluster/serve.yaml")["applications"][0]["runtime_env"]["env_vars"]
    for var in ("HF_HOME", "MAGE_RAY_CACHE"):
        assert Path(env[var]).is_relative_to(mount), var
        assert serve_env[var] == env[var], var
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    token_path = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_TOKEN_PATH)"],
        env={**clean, **env},  # the container's environment as the launcher sets it
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(token_path).is_relative_to(mount), token_path


# ---------------------------------------------------------------------------------------------
# KubeRay

# Fields of the ray.io/v1 CRDs (KubeRay 1.x); a key outside these sets is a typo the API server would drop.
RAYCLUSTER_SPEC = {
    "headGroupSpec",
    "workerGroupSpecs",
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headServiceAnnotations",
    "suspend",
    "gcsFaultToleranceOptions",
    "managedBy",
}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "numOfHosts",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
}
AUTOSCALER_OPTIONS = {
    "resources",
    "image",
    "imagePullPolicy",
    "env",
    "envFrom",
    "volumeMounts",
    "securityContext",
    "idleTimeoutSeconds",
    "upscalingMode",
    "version",
}
RAYJOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "rayClusterSpec",
    "submitterPodTemplate",
    "metadata",
    "clusterSelector",
    "submitterConfig",
    "managedBy",
    "deletionStrategy",
    "entrypoint",
    "runtimeEnvYAML",
    "jobId",
    "submissionMode",
    "entrypointResources",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes",
    "suspend",
}
RAYSERVICE_SPEC = {
    "serveConfigV2",
    "rayClusterConfig",
    "serveService",
    "upgradeStrategy",
    "excludeHeadPodFromServeSvc",
    "serviceUnhealthySecondThreshold",
    "deploymentUnhealthySecondThreshold",
}


def _check_cluster_spec(spec: dict) -> None:
    import ray

    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head)
    groups = [head] + spec["workerGroupSpecs"]
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(g)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    for g in groups:
        # KubeRay's rayStartParams is map[string]string: a bare YAML number is rejected by the API server.
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), g["rayStartParams"]
        containers = g["template"]["spec"]["containers"]
        assert containers and all(c.get("image") and c.get("name") for c in containers)
        lim = containers[0]["resources"]["limits"]
        assert lim == containers[0]["resources"]["requests"]  # Ray reads its resources from the limits
    assert head["rayStartParams"].get("num-cpus") == "0"


def _pod_resources(group: dict) -> dict[str, float]:
    """The Ray resources KubeRay gives a pod of this group: CPU / GPU from the container limits."""
    lim = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {"CPU": float(lim["cpu"]), "GPU": float(lim.get("nvidia.com/gpu", 0))}


def test_kuberay_raycluster():
    doc = _load("cluster/kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    # Autoscaling (GPU groups start at 0 pods): the pre-flight resource check must wait, not fail.
    for g in [doc["spec"]["headGroupSpec"], *groups.values()]:
        env = {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env.get("MAGE_RAY_ALLOW_AUTOSCALE") == "1"
    gpu = groups["gpu-train"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    # The paper config's 3 concurrent backbones fit the GPU group at maxReplicas.
    hh = load_config(HH)
    b = hh.backbone
    nodes = [_pod_resources(gpu)] * gpu["maxReplicas"]
    n = hh.n_objectives
    assert (
        check_resources(b.num_workers, b.resources_per_worker, b.use_gpu, concurrent_runs=n, nodes=nodes) == n
    )


def test_kuberay_rayjob_runs_a_job_of_this_repo():
    doc = _load("cluster/kuberay/rayjob.yaml")
    cluster = _load("cluster/kuberay/raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and argv[1] == "jobs/sweep.py"
    assert (REPO / argv[1]).is_file(), f"{argv[1]} is not in the repo"
    cfg_path = argv[argv.index("--config") + 1]
    assert cfg_path == "configs/hh_rlhf.yaml"
    job_cfg = load_config(REPO / cfg_path, argv[argv.index("--config") + 2 :])  # the job's config is valid
    # The RayService serves the bundle this job writes, from the shared volume both clusters mount.
    serve = yaml.safe_load(_load("cluster/kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    assert serve["applications"][0]["args"]["bundle"] == f"{job_cfg.storage.run_dir}/bundle"
    for doc_ in (cluster, _load("cluster/kuberay/rayservice.yaml")):
        spec_ = doc_["spec"].get("rayClusterConfig", doc_["spec"])
        for g in [spec_["headGroupSpec"], *spec_["workerGroupSpecs"]]:
            mounts = [m["mountPath"] for m in g["template"]["spec"]["containers"][0]["volumeMounts"]]
            assert job_cfg.storage.storage_path in mounts, g.get("groupName", "head")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] == "/home/ray/mage_ray"
    # ...which is where cluster/Dockerfile puts the checkout.
    assert "WORKDIR /home/ray/mage_ray" in (CLUSTER / "Dockerfile").read_text()


def test_kuberay_rayservice():
    doc = _load("cluster/kuberay/rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    spec = doc["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, set(spec) - RAYSERVICE_SPEC
    _check_cluster_spec(spec["rayClusterConfig"])
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    _validate_serve_config(yaml.safe_load(spec["serveConfigV2"]))
    # Its GPU group holds the Serve replicas at max_replicas.
    serve = yaml.safe_load(spec["serveConfigV2"])
    dep = _deployments(serve["applications"][0])["MageEngine"]
    groups = {g["groupName"]: g for g in spec["rayClusterConfig"]["workerGroupSpecs"]}
    nodes = [_pod_resources(groups["gpu-serve"])] * groups["gpu-serve"]["maxReplicas"]
    replica = {"CPU": dep["ray_actor_options"]["num_cpus"], "GPU": dep["ray_actor_options"]["num_gpus"]}
    k = dep["autoscaling_config"]["max_replicas"]
    assert check_resources(1, replica, False, concurrent_runs=k, nodes=nodes) == k


def test_rayservice_serves_the_same_config_as_serve_yaml():
    """serveConfigV2 == cluster/serve.yaml, except the proxy host: 0.0.0.0 in the pod (the Kubernetes
    service reaches it by pod IP), 127.0.0.1 in serve.yaml (localhost unless you mean to expose it)."""
    serve = _load("cluster/serve.yaml")
    v2 = yaml.safe_load(_load("cluster/kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    assert serve["http_options"]["host"] == "127.0.0.1"
    assert v2["http_options"]["host"] == "0.0.0.0"
    strip = lambda d: {**d, "http_options": {k: v for k, v in d["http_options"].items() if k != "host"}}  # noqa: E731
    assert strip(v2) == strip(serve)


KUBERAY_CLUSTERS = ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayservice.yaml")
GPU_LABEL = "nvidia.com/gpu.present"  # set on GPU nodes by NVIDIA GPU Feature Discovery (GPU Operator)
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB of one GPU, the same source
GPU_TAINT = ("nvidia.com/gpu", "NoSchedule")  # the usual taint of GPU node pools (EKS, GKE, AKS)


def _quantity(q: str | int | float) -> float:
    """A Kubernetes quantity ("48Gi", "1Ti", "500M", "8") as a number."""
    q = str(q)
    for suffix, f in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40)):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * f
    for suffix, f in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * f
    return float(q)


def _groups(rel: str) -> list[tuple[str, dict]]:
    """(name, group) of the head and every worker group of a RayCluster / RayService manifest."""
    doc = _load(rel)
    spec = doc["spec"].get("rayClusterConfig", doc["spec"])
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def _all_groups() -> list[tuple[str, str, dict, dict]]:
    """(manifest, group name, pod spec, the Ray container) for every group of the KubeRay clusters."""
    out = []
    for rel in KUBERAY_CLUSTERS:
        for name, g in _groups(rel):
            pod = g["template"]["spec"]
            out.append((rel, name, pod, pod["containers"][0]))
    return out


def _gpus(container: dict) -> float:
    return float(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _mounted_volume(pod: dict, container: dict, path: str) -> dict | None:
    """The pod volume the container mounts at ``path`` (or at a parent of it), or None."""
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    best = None
    for m in container.get("volumeMounts", []):
        if Path(path).is_relative_to(m["mountPath"]) and (
            best is None or len(m["mountPath"]) > len(best["mountPath"])
        ):
            best = m
    return None if best is None else vols[best["name"]]


def test_kuberay_volume_mounts_refer_to_declared_volumes():
    """Every container's volumeMounts name a volume of its pod (the API server rejects the pod otherwise), mount
    paths and container names are unique, and every PVC the pods claim is the ReadWriteMany claim shipped in
    cluster/kuberay/storage.yaml."""
    pvc = _load("cluster/kuberay/storage.yaml")
    assert pvc["apiVersion"] == "v1" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"]
    assert _quantity(pvc["spec"]["resources"]["requests"]["storage"]) > 0
    for rel, name, pod, _ in _all_groups():
        vols = [v["name"] for v in pod.get("volumes", [])]
        assert len(vols) == len(set(vols)), (rel, name)
        names = [c["name"] for c in pod["containers"]]
        assert len(names) == len(set(names)), (rel, name)
        for c in pod["containers"]:
            paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
            assert len(paths) == len(set(paths)), (rel, name)
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols, f"{rel} {name}: mount {m['name']} names no volume"
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], (rel, name)


def test_kuberay_pods_have_a_memory_dev_shm(monkeypatch):
    """Every Ray container mounts a memory-backed emptyDir with a sizeLimit at /dev/shm (a container's default
    is 64 MiB: Ray's object store would fall back to disk and NCCL with several GPUs per pod fails). The limit
    lies under the container's memory limit (tmpfs pages count against it), holds Ray's default object store
    for that memory without shrinking it, and on GPU pods leaves NCCL_SHM_HEADROOM beside it."""
    for rel, name, pod, c in _all_groups():
        vol = _mounted_volume(pod, c, "/dev/shm")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert "/dev/shm" in mounts and vol is not None, f"{rel} {name}: no /dev/shm volume"
        empty = vol.get("emptyDir", {})
        assert empty.get("medium") == "Memory" and "sizeLimit" in empty, (rel, name, vol)
        shm = _quantity(empty["sizeLimit"])
        memory = _quantity(c["resources"]["limits"]["memory"])
        assert shm < memory, (rel, name)
        store = _object_store_bytes(monkeypatch, memory, shm)
        assert store == _object_store_bytes(monkeypatch, memory, 10 * memory), (
            f"{rel} {name}: /dev/shm too small"
        )
        assert store <= shm
        if _gpus(c):
            assert shm - store >= NCCL_SHM_HEADROOM, (rel, name)


def _tolerates(tolerations: list[dict], key: str, effect: str) -> bool:
    """Kubernetes' matching: same key (or an empty key with Exists) and the same effect (or none)."""
    for t in tolerations:
        key_ok = t.get("key") == key or (not t.get("key") and t.get("operator") == "Exists")
        if key_ok and t.get("effect") in (None, "", effect):
            return True
    return False


def _required_terms(pod: dict) -> list[list[dict]]:
    """The matchExpressions of each required node-affinity term (a node must match one term)."""
    aff = (
        pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    return [t.get("matchExpressions", []) for t in (aff or {}).get("nodeSelectorTerms", [])]


def test_kuberay_gpu_pods_land_on_gpu_nodes():
    """GPU groups select GPU nodes (GPU_LABEL), tolerate the GPU taint and require GPUs with more memory than the
    lower bound of their work (training in raycluster.yaml, serving in rayservice.yaml); the head and CPU groups
    require nodes without GPU_LABEL and do not tolerate the taint, so they never take a GPU node."""
    bounds = _paper_bounds_mib()
    work = {"cluster/kuberay/raycluster.yaml": "train", "cluster/kuberay/rayservice.yaml": "serve"}
    seen_gpu = set()
    for rel, name, pod, c in _all_groups():
        terms = _required_terms(pod)
        if _gpus(c):
            seen_gpu.add(rel)
            assert pod.get("nodeSelector", {}).get(GPU_LABEL) == "true", (rel, name)
            assert _tolerates(pod.get("tolerations", []), *GPU_TAINT), (rel, name)
            assert terms, (rel, name)
            for exprs in terms:  # whichever term a node matches, its GPUs are large enough
                (mem,) = [e for e in exprs if e["key"] == GPU_MEMORY_LABEL]
                assert mem["operator"] == "Gt" and float(mem["values"][0]) >= bounds[work[rel]], (rel, name)
        else:
            assert not _tolerates(pod.get("tolerations", []), *GPU_TAINT), (rel, name)
            assert terms and all(
                {"key": GPU_LABEL, "operator": "DoesNotExist"} in exprs for exprs in terms
            ), f"{rel} {name}: a CPU pod may land on a GPU node"
    assert seen_gpu == set(KUBERAY_CLUSTERS)


def test_kuberay_pods_share_the_model_cache_and_take_the_token_from_a_secret():
    """Every Ray container (they all may load models: drivers run pre-flight model checks, workers train and
    score, replicas serve) sets HF_HOME and MAGE_RAY_CACHE to paths on its ReadWriteMany PVC, the same paths as
    the Serve config's runtime_env, and HF_TOKEN from a Secret key, optional (public models work without the
    Secret), never a literal value."""
    serve_env = _load("cluster/serve.yaml")["applications"][0]["runtime_env"]["env_vars"]
    for rel, name, pod, c in _all_groups():
        env = _env(c)
        for var in ("HF_HOME", "MAGE_RAY_CACHE"):
            assert var in env, f"{rel} {name}: no {var}"
            vol = _mounted_volume(pod, c, env[var]["value"])
            assert vol is not None and "persistentVolumeClaim" in vol, (
                f"{rel} {name}: {var} is not on the PVC"
            )
            assert env[var]["value"] == serve_env[var], (rel, name, var)
        token = env.get("HF_TOKEN", {})
        ref = token.get("valueFrom", {}).get("secretKeyRef", {})
        assert "value" not in token and ref.get("name") and ref.get("key"), (rel, name)
        assert ref.get("optional") is True, (rel, name)


def test_no_hub_token_is_committed():
    """No Hugging Face token (hf_ + 30 or more letters and digits) in the cluster files or the docs."""
    import re

    token = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
    files = [p for p in CLUSTER.rglob("*") if p.is_file()] + [
        *(REPO / "docs").glob("*.md"),
        REPO / "README.md",
    ]
    leaks = [str(p) for p in files if token.search(p.read_text(errors="ignore"))]
    assert leaks == []


# ---------------------------------------------------------------------------------------------
# Serve config


def _unknown_keys(data: Any, model: Any, path: str = "") -> list[str]:
    """Keys of ``data`` that the pydantic ``model`` does not declare (Serve's schema silently ignores them)."""
    import typing

    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    out = [f"{path}{k}" for k in data if k not in fields]
    for k, v in data.items():
        if k not in fields:
            continue
        ann = fields[k].annotation
        for sub in [ann, *typing.get_args(ann)]:
            for inner in [sub, *typing.get_args(sub)]:
                if isinstance(inner, type) and hasattr(inner, "model_fields"):
                    items = v if isinstance(v, list) else [v]
                    for i, item in enumerate(items):
                        out += _unknown_keys(
                            item, inner, f"{path}{k}[{i}]." if isinstance(v, list) else f"{path}{k}."
                        )
    return sorted(set(out))


def _validate_serve_config(doc: dict) -> Any:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(doc)
    assert _unknown_keys(doc, ServeDeploySchema) == []
    (app,) = doc["applications"]
    assert app["import_path"] == "mage_ray.serve.app:build_app"
    assert {"bundle", "config"} <= set(app["args"]) <= {"bundle", "config", "overrides"}
    hh = load_config(_here(app["args"]["config"]))
    deps = _deployments(app)
    assert len(deps) == len(app["deployments"]) and set(deps) == {"MageEngine", "MageIngress"}
    dep, ingress = deps["MageEngine"], deps["MageIngress"]
    # Serve's default max_ongoing_requests (5) would starve batching: it must exceed the batch size.
    assert dep["max_ongoing_requests"] > hh.serve.max_batch_size
    assert dep["ray_actor_options"]["num_gpus"] >= 1
    # The engine's overrides say what the config's serve section gives the code (engine_options), so a run
    # without this file (jobs/serve.py --config ...) gets the same replicas.
    from mage_ray.serve.engine import engine_options

    code = engine_options(hh)
    assert dep["ray_actor_options"] == code["ray_actor_options"]
    assert dep["max_ongoing_requests"] == code["max_ongoing_requests"]
    # The ingress holds one request per engine request: it must let as many through, and scale as far.
    assert ingress["max_ongoing_requests"] >= dep["max_ongoing_requests"]
    assert ingress["autoscaling_config"] == dep["autoscaling_config"]
    assert "ray_actor_options" not in ingress  # the code's default: no CPU reserved, no GPU
    return schema


def test_serve_yaml_passes_serve_schema():
    doc = _load("cluster/serve.yaml")
    schema = _validate_serve_config(doc)
    assert schema.http_options.host == "127.0.0.1" and schema.http_options.port == 8000


def test_serve_schema_check_catches_typos():
    """ServeDeploySchema accepts unknown keys silently; our strict walk does not."""
    from ray.serve.schema import ServeDeploySchema

    doc = _load("cluster/serve.yaml")
    doc["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpu"] = 1
    doc["applications"][0]["route_prefx"] = "/"
    ServeDeploySchema.model_validate(doc)  # accepted as is
    assert _unknown_keys(doc, ServeDeploySchema) == [
        "applications[0].deployments[0].ray_actor_options.num_gpu",
        "applications[0].route_prefx",
    ]


def test_serve_import_path_and_deployment_names_resolve(tmp_path_factory, repo_root):
    """The import path in serve.yaml names the app builder, and its deployment overrides name exactly the
    deployments of the app that builder returns (Serve rejects overrides of deployments that do not exist): the
    ingress MageIngress (no CPU reserved), bound to the engine MageEngine (the config's serve resources)."""
    from bundle_factory import cached_tiny_bundle
    from ray.serve._private.utils import import_attr

    from mage_ray.serve import app as serve_app

    app = _load("cluster/serve.yaml")["applications"][0]
    assert import_attr(app["import_path"]) is serve_app.build_app
    built = serve_app.build_app(
        {"bundle": str(cached_tiny_bundle(tmp_path_factory)), "config": str(repo_root / "configs/smoke.yaml")}
    )
    ingress = built._bound_deployment  # Serve keeps an Application's deployment here (no public accessor)
    (engine_app,) = [a for a in ingress.init_args if isinstance(a, type(built))]
    engine = engine_app._bound_deployment
    assert (ingress.name, engine.name) == ("MageIngress", "MageEngine")
    assert ingress.ray_actor_options["num_cpus"] == 0
    smoke = load_config(repo_root / "configs/smoke.yaml")
    assert engine.ray_actor_options["num_cpus"] == smoke.serve.num_cpus
    assert set(_deployments(app)) == {ingress.name, engine.name}


@pytest.mark.slow
def test_serve_yaml_deploys_the_app(tmp_path):
    """Deploy cluster/serve.yaml through Serve's config path (as `serve deploy` does) on a local Ray, with
    only what a laptop lacks swapped: a tiny bundle, configs/smoke.yaml, no GPU, one replica each, a free port.
    The deployment overrides (name, autoscaling_config, max_ongoing_requests, ray_actor_options) must be
    accepted, reach the deployment they name, and the app must answer GET /v1/objectives."""
    import json
    import socket
    import subprocess
    import sys

    from bundle_factory import make_tiny_bundle

    bundle = make_tiny_bundle(tmp_path / "bundle_src")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = _load("cluster/serve.yaml")
    app = doc["applications"][0]
    app["args"] = {
        "bundle": str(bundle),
        "config": "configs/smoke.yaml",
        "overrides": ["task.objectives=conciseness,readability"],
    }
    # The runtime_env's caches move to this test's directory (a laptop has no /mnt/mage_ray).
    assert set(app["runtime_env"]["env_vars"]) == {"HF_HOME", "HF_XET_CACHE", "MAGE_RAY_CACHE"}
    app["runtime_env"]["env_vars"] = {k: str(tmp_path / k.lower()) for k in app["runtime_env"]["env_vars"]}
    deps = _deployments(app)
    deps["MageEngine"]["ray_actor_options"] = {"num_cpus": 0.5, "num_gpus": 0}
    for d in deps.values():
        d["autoscaling_config"]["max_replicas"] = 1
    doc["http_options"]["port"] = port
    cfg_file = tmp_path / "serve.json"
    cfg_file.write_text(json.dumps(doc))
    script = f"""
import json, time, urllib.request, ray
from ray import serve
from ray.serve.schema import ServeDeploySchema
from ray.serve._private.api import serve_start
doc = json.load(open({str(cfg_file)!r}))
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
try:
    serve_start(http_options=doc["http_options"]).deploy_apps(ServeDeploySchema(**doc))
    t, st = time.time(), None
    while time.time() - t < 240:
        st = serve.status().applications.get("mage")
        if st and st.status in ("RUNNING", "DEPLOY_FAILED", "UNHEALTHY"):
            break
        time.sleep(1)
    print("STATUS", st.status if st else None, st.message if st else "")
    if st and st.status == "RUNNING":
        body = urllib.request.urlopen("http://127.0.0.1:{port}/v1/objectives", timeout=60).read()
        print("OBJECTIVES", json.loads(body)["objectives"])
        pid = json.loads(urllib.request.urlopen("http://127.0.0.1:{port}/v1/stats", timeout=60).read())["pid"]
        environ = dict(
            kv.split("=", 1) for kv in open(f"/proc/{{pid}}/environ").read().split("\\0") if "=" in kv
        )
        print("ENGINE_ENV", json.dumps({{k: environ.get(k) for k in ("HF_HOME", "HF_XET_CACHE", "MAGE_RAY_CACHE")}}))
        print("DEPLOYMENTS", sorted(st.deployments))
        t = time.time()  # the replicas' reservations reach available_resources() within a resource report
        while True:
            used = ray.cluster_resources()["CPU"] - ray.available_resources().get("CPU", 0)
            if used == 0.5 or time.time() - t > 60:
                break
            time.sleep(0.5)
        print("USED_CPU", used)
finally:
    serve.shutdown()
    ray.shutdown()
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=400, env=env
    )
    out = proc.stdout
    assert "STATUS ApplicationStatus.RUNNING" in out, out[-2000:] + proc.stderr[-3000:]
    assert "OBJECTIVES ['conciseness', 'readability']" in out
    # The app's runtime_env reached the engine replica's process.
    (engine_env,) = [
        json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("ENGINE_ENV")
    ]
    assert engine_env == app["runtime_env"]["env_vars"], engine_env
    # Each override reached its deployment: the engine reserves the 0.5 CPU given here (smoke's code default is
    # 1), the ingress none (the code's default, which serve.yaml leaves alone); Serve's controller and proxy
    # reserve none either.
    assert "DEPLOYMENTS ['MageEngine', 'MageIngress']" in out
    assert "USED_CPU 0.5" in out, out[-2000:]


def test_serve_yaml_paths_are_absolute_with_a_runtime_env():
    """The app's bundle and config are absolute (the Ray process that builds the app runs in no particular
    directory): the bundle on the shared filesystem every node mounts (the launcher's EFS volume, the KubeRay
    PVC's mount), the config in the checkout every node has (cluster/Dockerfile's WORKDIR, the launcher's synced
    ~/mage_ray in the image's home). Its runtime_env sets the cache variables and no local working_dir (the
    package is installed on every node)."""
    app = _load("cluster/serve.yaml")["applications"][0]
    bundle, config = app["args"]["bundle"], app["args"]["config"]
    launcher = _load("cluster/gpu-cluster.yaml")
    efs = [o.split()[1].split(":")[1] for o in launcher["docker"]["run_options"] if o.startswith("-v ")]
    assert any(Path(bundle).is_relative_to(m) for m in efs), bundle
    for _rel, _name, pod, c in _all_groups():
        vol = _mounted_volume(pod, c, bundle)
        assert vol is not None and "persistentVolumeClaim" in vol
    assert _here(config) == HH
    assert f"WORKDIR {NODE_CHECKOUT}\n" in (CLUSTER / "Dockerfile").read_text()
    assert launcher["file_mounts"] == {"~/mage_ray": "."} and NODE_CHECKOUT == "/home/ray/mage_ray"
    env = app["runtime_env"]
    assert set(env["env_vars"]) >= {"HF_HOME", "MAGE_RAY_CACHE"}
    assert "working_dir" not in env


def _documented_commands(prefix: str) -> list[list[str]]:
    """The shell commands in docs/cluster.md's code blocks that start with ``prefix`` (continuations joined)."""
    text = (REPO / "docs" / "cluster.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split("  #", 1)[0].strip()
        if line.startswith(prefix):
            out.append(shlex.split(line))
    return out


def test_documented_override_serves_another_bundle(tmp_path_factory, tmp_path):
    """Each `python cluster/serve_config.py ...` of docs/cluster.md, run as written (its output file moved to a
    temporary directory), writes a config that Serve's ServeDeploySchema accepts with no unknown key, whose app
    args are the documented bundle and config, that keeps everything else of the base file, and that the docs
    then deploy (`serve deploy ... FILE` / `kubectl apply -f FILE`). The same script, given a tiny bundle and
    configs/smoke.yaml, writes args that Ray's own builder call (what `serve deploy` runs) hands to build_app,
    whose engine serves that bundle with smoke's serve resources."""
    from bundle_factory import cached_tiny_bundle
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    script = _serve_config_script()
    commands = _documented_commands("python cluster/serve_config.py")
    assert {"cluster/serve.yaml", "cluster/kuberay/rayservice.yaml"} == {
        argv[argv.index("--base") + 1] if "--base" in argv else "cluster/serve.yaml" for argv in commands
    }, "docs/cluster.md shows the override of the Serve config and of the RayService"
    docs = (REPO / "docs" / "cluster.md").read_text()
    for argv in commands:
        documented_out = argv[argv.index("-o") + 1]
        assert f"serve deploy --address http://127.0.0.1:8265 {documented_out}" in docs or (
            f"kubectl apply -f {documented_out}" in docs
        ), documented_out
        out = tmp_path / Path(documented_out).name
        argv = [a if a != documented_out else str(out) for a in argv[2:]]
        if "--base" in argv:
            argv[argv.index("--base") + 1] = str(REPO / argv[argv.index("--base") + 1])
        assert script.main(argv) == 0
        written = yaml.safe_load(out.read_text())
        base_rel = argv[argv.index("--base") + 1] if "--base" in argv else str(CLUSTER / "serve.yaml")
        base = yaml.safe_load(Path(base_rel).read_text())
        if written.get("kind") == "RayService":
            assert {k: v for k, v in written.items() if k != "spec"} == {
                k: v for k, v in base.items() if k != "spec"
            }
            assert {k: v for k, v in written["spec"].items() if k != "serveConfigV2"} == {
                k: v for k, v in base["spec"].items() if k != "serveConfigV2"
            }
            doc, base = (
                yaml.safe_load(written["spec"]["serveConfigV2"]),
                yaml.safe_load(base["spec"]["serveConfigV2"]),
            )
        else:
            doc = written
        _validate_serve_config(doc)
        args = ServeDeploySchema.model_validate(doc).applications[0].args
        assert args == {
            "bundle": argv[argv.index("--bundle") + 1],
            "config": argv[argv.index("--config") + 1],
        }
        base["applications"][0]["args"] = args
        assert doc == base  # nothing else changed (summary's serve section is hh_rlhf's)
    # ...and the args reach build_app as Serve hands them over.
    bundle = cached_tiny_bundle(tmp_path_factory)
    smoke = REPO / "configs" / "smoke.yaml"
    out = tmp_path / "tiny.yaml"
    assert script.main(["--bundle", str(bundle), "--config", str(smoke), "-o", str(out)]) == 0
    app = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text())).applications[0]
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    ingress = built._bound_deployment
    (engine_app,) = [a for a in ingress.init_args if isinstance(a, type(built))]
    engine = engine_app._bound_deployment
    assert Path(engine.init_args[0]).resolve() == bundle.resolve()
    # The engine's deployment options follow the config's serve section (smoke: 1 CPU, no GPU), not hh_rlhf's.
    from mage_ray.serve.engine import engine_options

    deps = _deployments(yaml.safe_load(out.read_text())["applications"][0])
    assert deps["MageEngine"]["ray_actor_options"] == engine_options(load_config(smoke))["ray_actor_options"]


def test_serve_config_script_refuses_relative_paths(capsys):
    """A relative bundle or config would resolve in whatever directory the builder runs in: one error line, 2."""
    script = _serve_config_script()
    assert (
        script.main(["--bundle", "runs/x/bundle", "--config", "/home/ray/mage_ray/configs/hh_rlhf.yaml"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --bundle = 'runs/x/bundle'")


def test_serve_cli_address_variables():
    """`serve deploy` (and status / config / shutdown) read the dashboard address from --address or
    RAY_DASHBOARD_ADDRESS, not RAY_ADDRESS (read in Ray's own python/ray/serve/scripts.py, without importing it):
    no command line in the repo sets RAY_ADDRESS for them."""
    import ast
    import importlib.util
    import re

    source = Path(importlib.util.find_spec("ray.serve.scripts").origin).read_text()
    env_of = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and dec.args
                    and getattr(dec.args[0], "value", None) == "--address"
                ):
                    (default,) = [k.value for k in dec.keywords if k.arg == "default"]
                    env_of[node.name] = default.args[0].value  # os.environ.get("VAR", ...)
    assert env_of["deploy"] == "RAY_DASHBOARD_ADDRESS", env_of
    dashboard_cmds = [cmd for cmd, var in env_of.items() if var != "RAY_ADDRESS"]
    assert {"deploy", "status", "config", "shutdown"} <= set(dashboard_cmds)
    bad = re.compile(rf"(?<![A-Z_])RAY_ADDRESS=\S*\s+serve\s+({'|'.join(dashboard_cmds)})\b")
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix not in {".pyc"}]
    files += [
        *(REPO / "docs").rglob("*.md"),
        REPO / "README.md",
        REPO / "Makefile",
        *(REPO / "jobs").glob("*.py"),
    ]
    hits = [
        f"{p.relative_to(REPO)}: {line.strip()}"
        for p in files
        if p.is_file()
        for line in p.read_text(errors="ignore").splitlines()
        if bad.search(line)
    ]
    assert hits == []


# ---------------------------------------------------------------------------------------------
# Local scripts


def test_local_scripts_are_valid_bash():
    import subprocess

    for name in ("start.sh", "stop.sh"):
        path = CLUSTER / "local" / name
        assert path.stat().st_mode & 0o111, f"{name} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
