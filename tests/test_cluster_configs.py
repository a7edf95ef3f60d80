"""Every shipped cluster config is validated: the launcher YAML with Ray's own autoscaler schema, the KubeRay
manifests by structure, the Serve config with Ray Serve's schema, and all of them against the resources
configs/hh_rlhf.yaml asks for (via mage_ray.train.placement)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from mage_ray.config import load_config
from mage_ray.train.placement import check_resources

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
HH = REPO / "configs" / "hh_rlhf.yaml"


def _load(rel: str) -> Any:
    return yaml.safe_load((REPO / rel).read_text())


def _deployments(app: dict) -> dict[str, dict]:
    """A Serve config application's deployment overrides by name (Serve matches them to the app's deployments by
    name, not by position)."""
    return {d["name"]: d for d in app["deployments"]}


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

    backbones: n = 3 runs x 4 workers x {CPU: 8, GPU: 1} at once on 3 x gpu_train {CPU: 48, GPU: 4};
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
    assert (REPO / app["args"]["config"]).is_file()
    hh = load_config(REPO / app["args"]["config"])
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
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
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
    # Each override reached its deployment: the engine reserves the 0.5 CPU given here (smoke's code default is
    # 1), the ingress none (the code's default, which serve.yaml leaves alone); Serve's controller and proxy
    # reserve none either.
    assert "DEPLOYMENTS ['MageEngine', 'MageIngress']" in out
    assert "USED_CPU 0.5" in out, out[-2000:]


# ---------------------------------------------------------------------------------------------
# Local scripts


def test_local_scripts_are_valid_bash():
    import subprocess

    for name in ("start.sh", "stop.sh"):
        path = CLUSTER / "local" / name
        assert path.stat().st_mode & 0o111, f"{name} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)
