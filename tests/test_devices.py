"""mage_ray.devices: a model goes on a GPU only in a process that holds one, and the rehearsal's ledger records
who asked Ray for what and what each process did with it."""

from __future__ import annotations

import json
import sys

import pytest

from mage_ray.config import ConfigError, config_from_dict
from mage_ray.devices import (
    HUB_MAP_ENV,
    REHEARSAL_ENV,
    PlacementError,
    hub_source,
    note_process,
    note_request,
    place,
    set_stage,
)
from mage_ray.rehearse import read_ledger, summarise


def test_cpu_stays_cpu_and_cuda_without_a_gpu_is_refused_by_name():
    assert place("cpu", "policy 'x'") == "cpu"
    with pytest.raises(
        PlacementError, match=r"reward model 'rm' is configured for cuda, but the driver \(pid \d+\)"
    ):
        place("cuda", "reward model 'rm'")  # this machine has no CUDA (the CPU build of torch)


def test_rehearsal_refuses_cuda_in_a_process_ray_gave_no_gpu_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv(REHEARSAL_ENV, str(tmp_path))
    set_stage("alpha")
    note_request("Tune trial", {"CPU": 1}, count=2, detail="alpha")
    with pytest.raises(
        PlacementError, match=r"rehearsal: stage 'alpha': reward model 'rm' is placed on cuda in the driver"
    ):
        place("cuda", "reward model 'rm'")
    events = read_ledger(tmp_path)
    assert [e["kind"] for e in events] == ["stage", "request", "place"]
    assert events[-1]["ok"] is False and events[-1]["stage"] == "alpha"
    summary = summarise(events)
    assert summary["violations"] == [
        f"stage 'alpha': reward model 'rm' placed on cuda in {events[-1]['process']}, to which Ray assigned no GPU"
    ]
    assert summary["stages"]["alpha"]["requested"] == [
        {"who": "Tune trial", "resources": "{CPU: 1}", "count": 2, "of": ["alpha"]}
    ]


def _worker(gpus_wanted: float):
    """In a Ray task: place a model on cuda (the rehearsal's rule) and report what happened."""
    note_process("test task")
    try:
        return place("cuda", "policy 'p'")
    except PlacementError as e:
        return f"refused: {e}"


def test_in_a_rehearsal_only_processes_ray_gave_a_gpu_get_the_cpu_that_stands_in(tmp_path, monkeypatch):
    """Two tasks on a local Ray with 1 logical GPU: the one that requested it places the model (on the CPU), the one
    that did not is refused; the summary names the GPU holder that placed nothing as idle."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv(REHEARSAL_ENV, str(tmp_path))
    from mage_ray.runtime import init_ray

    init_ray(num_cpus=2, num_gpus=1)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    try:
        set_stage("evaluate")
        with_gpu = ray.remote(num_gpus=1, num_cpus=0)(_worker).remote(1)
        without = ray.remote(num_gpus=0, num_cpus=1)(_worker).remote(0)
        idle = ray.remote(num_gpus=1, num_cpus=0)(note_process)
        assert ray.get(with_gpu) == "cpu"
        assert ray.get(without).startswith(
            "refused: rehearsal: stage 'evaluate': policy 'p' is placed on cuda in Ray"
        )
        ray.get(idle.remote("idle holder"))
    finally:
        ray.shutdown()
    s = summarise(read_ledger(tmp_path))
    st = s["stages"]["evaluate"]
    statuses = sorted(m["status"] for m in st["gpu_models"])
    assert statuses[0].startswith("NO GPU in Ray worker") and statuses[1] == "ok"
    assert len(s["violations"]) == 1 and "to which Ray assigned no GPU" in s["violations"][0]
    assert st["idle_gpu_processes"] == {"idle holder": 1}
    assert s["idle_gpu_stages"] == ["evaluate"]


def test_hub_map(monkeypatch, tmp_path):
    assert hub_source("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    monkeypatch.setenv(HUB_MAP_ENV, json.dumps({"meta-llama/Llama-2-7b-hf": str(tmp_path)}))
    assert hub_source("meta-llama/Llama-2-7b-hf") == str(tmp_path)
    assert hub_source("other/model") == "other/model"


def test_gpu_reward_models_need_gpu_decode_workers():
    base = {"task": {"reward_device": "cuda"}}
    with pytest.raises(
        ConfigError, match=r"'task.reward_device' = 'cuda' needs GPU decode workers.*decode.num_gpus"
    ):
        config_from_dict(base)
    cfg = config_from_dict({**base, "decode": {"num_gpus": 1, "num_cpus": 4}})
    assert cfg.decode.device == "cuda" and cfg.decode.ray_resources() == {"CPU": 4.0, "GPU": 1.0}
    assert config_from_dict({}).decode.ray_resources() == {"CPU": 1.0}  # the old decode trials' {"CPU": 1}
    with pytest.raises(ConfigError, match="task.reward_device"):
        config_from_dict({"task": {"reward_device": "gpu"}})
