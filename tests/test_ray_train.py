"""Ray Train backbone runs on a local 4-logical-CPU Ray: DDP on gloo, kill-and-resume, a failing rank, SFT.

That the n backbones of a stage train as n concurrent Tune trials is checked where the stage runs: the
rehearsal of configs/hh_rlhf.yaml (tests/test_rehearse.py) finds its 3 backbone workers on 3 distinct GPUs at once."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mage_ray.config import load_config
from mage_ray.manifest import read_manifest

PROMPTS = ["Say something nice.", "Tell me about boom boxes.", "What is a cat?", "Write a short poem."]


def toy_objectives():
    """Nested (so cloudpickle ships them to the workers by value): length/10 and count of 'e'."""

    def length(prompts, responses):
        return np.array([len(r) / 10.0 for r in responses])

    def count_e(prompts, responses):
        return np.array([r.count("e") for r in responses], dtype=float)

    length.name, count_e.name = "length", "count_e"
    return [length, count_e]


def smoke_cfg(tmp, *overrides: str):
    return load_config(
        None,
        [
            "model.name_or_path=tiny-random",
            "backbone.max_completion_length=8",
            "backbone.num_generations=2",
            "backbone.prompts_per_step=1",
            "backbone.steps=2",
            "backbone.checkpoint_every=2",
            "backbone.max_failures=1",
            f"storage.storage_path={tmp}",
            "storage.run_name=t",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_format_progress_and_run_names(tmp_path):
    from mage_ray.train.ray_shell import format_progress
    from mage_ray.train.ray_shell import train_run_name as _train_run_name
    from mage_ray.train.ray_train import backbone_dir, morlhf_dir

    line = format_progress(
        "b0",
        {
            "step": 3,
            "max_steps": 30,
            "reward": 0.5,
            "rewards/relevance/mean": 0.25,
            "kl": 0.001,
            "wall_step_s": 4.2,
        },
        saved=True,
    )
    assert line == "[b0] step 3/30 | reward 0.5000 | relevance 0.2500 | kl 1.00e-03 | 4.2 s/step [ckpt]"
    cfg = smoke_cfg(tmp_path)
    assert backbone_dir(cfg, 0.7, "b1") == f"{tmp_path}/t/backbones/beta_0.7/b1"
    assert morlhf_dir(cfg, [0.3, 0.7]) == f"{tmp_path}/t/morlhf/mu_0.3-0.7"
    assert _train_run_name(cfg, backbone_dir(cfg, 0.7, "b1")) == "backbones--beta_0.7--b1"


def test_ddp_two_cpu_workers(ray_local, tmp_path):
    """One backbone on 2 data-parallel gloo workers: both processes train, rank 0 publishes the adapter."""
    from mage_ray.train.ray_train import train_backbone_ray

    cfg = smoke_cfg(tmp_path, "backbone.num_workers=2")
    out = f"{tmp_path}/t/backbones/beta_0.7/b0"
    m = train_backbone_ray(
        cfg, [0.7, 0.3], name="b0", out_dir=out, objectives=toy_objectives(), prompts=PROMPTS
    )
    assert m["status"] == "complete" and m["num_processes"] == 2 and m["steps_done"] == 2
    assert os.path.isfile(f"{out}/adapter/adapter_model.safetensors")
    assert read_manifest(out)["ray_train_run"].endswith("backbones--beta_0.7--b0")


def test_worker_killed_mid_training_resumes_from_checkpoint(ray_local, tmp_path):
    """Worker hard-exits at step 3 of 4 (checkpoint at step 2): Ray restarts the group, training resumes at
    step 2 (not 0) and finishes with 4 steps; the history holds each step exactly once."""
    from mage_ray.train.ray_train import train_backbone_ray

    cfg = smoke_cfg(tmp_path, "backbone.steps=4")
    out = f"{tmp_path}/t/backbones/beta_0.7/b0"
    marker = tmp_path / "killed_once"
    m = train_backbone_ray(
        cfg,
        [0.7, 0.3],
        name="b0",
        out_dir=out,
        objectives=toy_objectives(),
        prompts=PROMPTS,
        fault_injection={"step": 3, "marker": str(marker), "delay_s": 5.0},
        progress=False,
    )
    assert marker.exists(), "the fault hook never fired"
    assert m["resumed_from_step"] == 2
    assert m["steps_done"] == 4
    steps = [json.loads(line)["step"] for line in open(f"{out}/metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_objective_failure_on_one_ddp_rank_stops_every_worker(ray_local, tmp_path):
    """2 DDP workers; the objective raises on rank 1 only, at its 2nd call (step 2). Both workers must stop at
    step 2 (no hang in the reward all-gather), the error names the objective and keeps the step-1 Ray
    checkpoint, nothing is published, and Ray does not retry the deterministic failure."""
    from mage_ray.train.backbone import ObjectiveFailure
    from mage_ray.train.ray_train import train_backbone_ray

    calls = {"n": 0}

    def fragile(prompts, responses):
        calls["n"] += 1
        if os.environ.get("RANK") == "1" and calls["n"] >= 2:
            raise RuntimeError("rank-1 scorer down")
        return np.zeros(len(prompts))

    fragile.name = "fragile"
    cfg = smoke_cfg(tmp_path, "backbone.num_workers=2", "backbone.steps=3", "backbone.checkpoint_every=1")
    out = f"{tmp_path}/t/backbones/beta_0.7/b0"
    with pytest.raises(ObjectiveFailure) as info:
        train_backbone_ray(
            cfg,
            [0.5, 0.5],
            name="b0",
            out_dir=out,
            objectives=[toy_objectives()[0], fragile],
            prompts=PROMPTS,
        )
    msg = str(info.value)
    assert "objective 'fragile' raised RuntimeError: rank-1 scorer down" in msg and "stopped at step 2" in msg
    assert info.value.checkpoint is not None and os.path.isdir(info.value.checkpoint)
    assert read_manifest(out) is None


def test_sft_stage_runs_once_through_the_shell(ray_local, tmp_path):
    """backbone.sft_steps = 2 with explicit pairs: one Ray Train run publishes <run_dir>/sft (manifest complete,
    2 steps, the Ray run recorded) and the returned config's base model is the merged model; a second call reuses
    it without training (the manifest is unchanged)."""
    from mage_ray.train.ray_train import prepare_sft_base

    cfg = smoke_cfg(tmp_path, "backbone.sft_steps=2")
    pairs = [("Say hi.", "Hello there!"), ("Name a colour.", "Blue.")]
    out = prepare_sft_base(cfg, pairs)
    sft_dir = os.path.join(cfg.storage.run_dir, "sft")
    m = read_manifest(sft_dir)
    assert m["status"] == "complete" and m["steps_done"] == 2 and m["ray_train_run"]
    assert out.model.name_or_path == os.path.join(sft_dir, "model")
    assert os.path.isfile(os.path.join(sft_dir, "model", "config.json"))
    again = prepare_sft_base(cfg, pairs)
    assert again.model.name_or_path == out.model.name_or_path and read_manifest(sft_dir) == m
