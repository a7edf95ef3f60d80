"""WRPO backbones: loss, alpha schedule, triples, sources, a training step. The Ray Train path (n WRPO backbones
as concurrent runs, a full-model source sampled as a Ray task, the bundle serving bs-wrpo) runs in the smoke pipeline
test (tests/test_pipeline.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from offline_fixtures import offline_cfg, write_rollouts

from mage_ray.manifest import write_manifest
from mage_ray.train.preference_data import build_triples
from mage_ray.train.ray_shell import TrainContext
from mage_ray.train.wrpo import (
    train_wrpo_backbone,
    wrpo_alpha,
    wrpo_loss,
)
from mage_ray.train.wrpo_sources import discover_sources


def _cfg(tmp_path, *extra):
    return offline_cfg(
        tmp_path, "backbone.trainer=wrpo", "backbone.wrpo_alpha_max=0.5", "value.rollout_max_tokens=6", *extra
    )


def test_wrpo_loss_hand_computed():
    """alpha = 0.25, beta = 0.1; log-ratios (source, chosen, rejected) = (2, 1, -1) and (0, 0, 2):

    row 0: 0.25 * 0.1 * 2 + 0.75 * 0.1 * 1 - 0.1 * (-1) = 0.05 + 0.075 + 0.1 = 0.225
    row 1: 0 + 0 - 0.1 * 2 = -0.2
    loss = mean(log(1 + e^-0.225), log(1 + e^0.2)) = mean(0.5869620, 0.7981389) = 0.6925504
    """
    t = torch.tensor
    zero = torch.zeros(2)
    loss, m = wrpo_loss(t([2.0, 0.0]), t([1.0, 0.0]), t([-1.0, 2.0]), zero, zero, zero, 0.25, 0.1)
    assert loss.item() == pytest.approx(0.6925504, abs=1e-6)
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(0.0125)
    assert m["source_reward"] == pytest.approx((0.3 - 0.2) / 2)  # mean(0.2 - (-0.1), 0 - 0.2)
    # alpha = 0 is DPO on the target pair: the source log-ratio has no effect.
    a = wrpo_loss(t([5.0]), t([1.0]), t([0.0]), *(torch.zeros(1),) * 3, 0.0, 1.0)[0]
    b = wrpo_loss(t([-5.0]), t([1.0]), t([0.0]), *(torch.zeros(1),) * 3, 0.0, 1.0)[0]
    assert a.item() == pytest.approx(b.item())


def test_alpha_grows_linearly_from_zero_to_alpha_max():
    """T = 5, alpha_max = 0.4: alpha_t = 0.4 t / 4 = 0, 0.1, 0.2, 0.3, 0.4."""
    assert [wrpo_alpha(t, 5, 0.4) for t in range(5)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert wrpo_alpha(0, 1, 0.4) == 0.0
    with pytest.raises(ValueError, match="step"):
        wrpo_alpha(5, 5, 0.4)


def test_build_triples_ranks_by_weighted_reward():
    """w = (0.7, 0.3). Target prompt a: h = 0.7*[1, 0, 0.5] + 0.3*[0, 1, 0.5] = [0.7, 0.3, 0.5]
    -> y_wt = row 0, y_l = row 1. Sources answer a with h = 0.7*0.2 + 0.3*0.9 = 0.41 (s1) and
    0.7*0.9 + 0.3*0 = 0.63 (s2) -> y_ws from s2. Prompt b has no source response, prompt c equal target
    scores: both skipped."""
    target = pa.table(
        {
            "prompt": ["a", "a", "a", "b", "b", "c", "c"],
            "prompt_ids": [[1]] * 3 + [[2]] * 2 + [[3]] * 2,
            "response_ids": [[10], [11], [12], [13], [14], [15], [16]],
            "o0": [1.0, 0.0, 0.5, 0.0, 1.0, 0.5, 0.5],
            "o1": [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.5],
        }
    )
    s1 = pa.table(
        {
            "prompt": ["a", "c"],
            "prompt_ids": [[9], [9]],
            "response_ids": [[20], [21]],
            "o0": [0.2, 1.0],
            "o1": [0.9, 1.0],
        }
    )
    s2 = pa.table({"prompt": ["a"], "prompt_ids": [[9]], "response_ids": [[30]], "o0": [0.9], "o1": [0.0]})
    (t,) = build_triples(target, {"s1": s1, "s2": s2}, ["o0", "o1"], [0.7, 0.3])
    assert (t.prompt, t.prompt_ids, t.source_ids, t.chosen_ids, t.rejected_ids, t.source) == (
        "a",
        [1],
        [30],
        [10],
        [11],
        "s2",
    )
    assert (t.h_source, t.h_chosen, t.h_rejected) == pytest.approx((0.63, 0.7, 0.3))


def test_discover_sources_takes_complete_non_wrpo_backbones(tmp_path):
    cfg = _cfg(tmp_path, "backbone.wrpo_sources=[tiny-random:1]")
    root = tmp_path / "smoke" / "backbones"
    for beta, name, trainer, status in [
        ("1", "b0", "grpo", "complete"),
        ("0.7", "b0", "wrpo", "complete"),
        ("0.6", "b1", "rloo", "running"),
        ("0.6", "b0", "grpo", "complete"),
        ("0.8", "b0_s5", "grpo", "complete"),  # a short beta-sweep trial: not a source
    ]:
        d = root / f"beta_{beta}" / name
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_config.json").write_text("{}")
        write_manifest(d, {"trainer": trainer, "status": status, "sweep_trial": name.endswith("_s5")})
    found = discover_sources(cfg, exclude=[str(root / "beta_0.6" / "b0")])
    assert found == [str(root / "beta_1" / "b0"), "tiny-random:1"]
    with pytest.raises(ValueError, match="wrpo_sources"):
        train_wrpo_backbone(cfg, str(tmp_path / "x"), w=[0.5, 0.5], name="b0", sources={})


def test_one_step_changes_the_lora_and_alpha_follows_the_schedule(tmp_path):
    from mage_ray.lora_mix import load_adapter

    cfg = _cfg(tmp_path)
    target = write_rollouts(tmp_path)
    (tmp_path / "src").mkdir()
    source = write_rollouts(tmp_path / "src", seed=1)
    seen = []
    out = str(tmp_path / "b0")
    manifest = train_wrpo_backbone(
        cfg,
        out,
        w=[0.7, 0.3],
        name="b0",
        sources={"s": source},
        rollouts_path=target,
        ctx=TrainContext(on_step=lambda step, m, snap: seen.append(snap())),
    )
    assert any(v.abs().sum() > 0 for k, v in seen[0]["trainable"].items() if "lora_B" in k)
    assert (manifest["trainer"], manifest["kind"], manifest["w"], manifest["n_triples"]) == (
        "wrpo",
        "backbone",
        [0.7, 0.3],
        6,
    )
    alphas = [json.loads(x)["alpha"] for x in (tmp_path / "b0" / "metrics.jsonl").read_text().splitlines()]
    assert alphas == [0.0, 0.5]
    load_adapter(f"{out}/adapter")


def test_train_backbones_dispatches_to_wrpo_and_names_missing_sources(tmp_path):
    """backbone.trainer = wrpo routes the public train_backbones to WRPO, which needs sources first."""
    from mage_ray.train.ray_train import train_backbones

    with pytest.raises(ValueError, match="backbone.wrpo_sources"):
        train_backbones(_cfg(tmp_path), beta=0.7, progress=False)
    with pytest.raises(ValueError, match="GRPO/RLOO trainers only"):
        train_backbones(_cfg(tmp_path), beta=0.7, prompts=["hi"], progress=False)
