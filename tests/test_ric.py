"""RiC: tag format, preference-to-target mapping, prompt round trip, online rounds, training -> decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from offline_fixtures import OBJECTIVES, offline_cfg, write_rollouts

from mage_ray.guidance import ric_prompt
from mage_ray.manifest import read_manifest
from mage_ray.train.ray_shell import TrainContext
from mage_ray.train.ric import (
    format_scores,
    preference_to_targets,
    ric_user_prompt,
    select_online,
    sft_loss,
    train_ric,
)


def _cfg(tmp_path, *extra):
    return offline_cfg(tmp_path, "value.rollout_max_tokens=6", *extra)


def test_score_tags_round_to_one_decimal():
    """RiC writes '<rm{i}_score> {z:.1f}'; -0.04 rounds to 0.0 (not -0.0)."""
    assert format_scores([0.06, -0.04, -1.26]) == "<rm1_score> 0.1 <rm2_score> 0.0 <rm3_score> -1.3"
    assert ric_user_prompt("Hi there. ", [1.0, -2.0]) == "Hi there. <rm1_score> 1.0 <rm2_score> -2.0"
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    tagged = ric_user_prompt(chat, [0.5, 0.25])
    assert tagged[3]["content"] == "Bye <rm1_score> 0.5 <rm2_score> 0.2" and chat[3]["content"] == "Bye"
    assert tagged[:3] == chat[:3]


def test_preference_to_target_mapping_hand_computed():
    """lo = (-2, -1), hi = (2, 3), n = 2. "linf" (RiC Sec. 3.3): the largest weight gets hi, others
    lo + min(n mu_i, 1)(hi - lo).
      mu = (0.3, 0.7): t2 = 3; t1 = -2 + min(0.6, 1) * 4 = 0.4
      mu = (0.5, 0.5): t1 = 2 (first on ties); t2 = -1 + min(1, 1) * 4 = 3
      mu = (1, 0):     t1 = 2; t2 = -1 + 0 = -1
    "l2": mu = (0.6, 0.8), ||mu|| = 1: (-2 + 2.4, -1 + 3.2) = (0.4, 2.2).
    "linear": mu = (0.25, 0.75): (-2 + 1, -1 + 3) = (-1, 2)."""
    lo, hi = [-2.0, -1.0], [2.0, 3.0]
    assert preference_to_targets([0.3, 0.7], lo, hi).tolist() == pytest.approx([0.4, 3.0])
    assert preference_to_targets([0.5, 0.5], lo, hi).tolist() == pytest.approx([2.0, 3.0])
    assert preference_to_targets([1.0, 0.0], lo, hi).tolist() == pytest.approx([2.0, -1.0])
    assert preference_to_targets([0.6, 0.8], lo, hi, "l2").tolist() == pytest.approx([0.4, 2.2])
    assert preference_to_targets([0.25, 0.75], lo, hi, "linear").tolist() == pytest.approx([-1.0, 2.0])
    with pytest.raises(ValueError, match="mapping"):
        preference_to_targets([0.5, 0.5], lo, hi, "cosine")


def test_ric_prompt_hook_uses_the_manifest_and_refuses_without_one():
    manifest = {
        "objectives": OBJECTIVES,
        "score_low": [-2.0, -1.0],
        "score_high": [2.0, 3.0],
        "mapping": "linf",
    }
    assert (
        ric_prompt("Tell me.", np.array([0.3, 0.7]), manifest) == "Tell me. <rm1_score> 0.4 <rm2_score> 3.0"
    )
    with pytest.raises(ValueError, match="manifest"):
        ric_prompt("Tell me.", np.array([0.3, 0.7]), None)
    with pytest.raises(ValueError, match="objectives"):
        ric_prompt("Tell me.", np.array([0.2, 0.3, 0.5]), manifest)


def test_sft_loss_and_online_selection_hand_computed():
    """sft: logps [[-1, -2, x], [-3, x, x]] on masks [[1, 1, 0], [1, 0, 0]] -> (1 + 2 + 3) / 3 = 2.
    select "any", q = 0.5 over z = [[0, 0], [1, -1], [-1, 1], [-1, -1]]: medians are (-0.5, -0.5), so rows
    0, 1, 2 pass (row 3 is below both). "weighted" with mus [[1,0],[0,1],[0,1],[0.5,0.5]]: h = [0, -1, 1, -1],
    median -0.5 -> rows 0 and 2."""
    logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logps, mask).item() == pytest.approx(2.0)
    z = np.array([[0.0, 0.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    mus = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.5, 0.5]])
    assert select_online(z, mus, 0.5, "any").tolist() == [True, True, True, False]
    assert select_online(z, mus, 0.5, "weighted").tolist() == [True, False, True, False]


def test_offline_and_online_rounds_train_on_the_tagged_prompts(tmp_path):
    """Two rounds of one step: the LoRA moves, the manifest stores the z-score statistics and the ranges of
    the rounded training scores, and round 2 adds self-generated examples scored by the real objectives."""
    from mage_ray.train.rollouts import read_rollouts

    cfg = _cfg(tmp_path)
    rollouts = write_rollouts(tmp_path)
    seen = []
    out = str(tmp_path / "ric")
    m = train_ric(
        cfg,
        out,
        rollouts_path=rollouts,
        steps=1,
        rounds=2,
        quantile=0.5,
        ctx=TrainContext(on_step=lambda step, mt, snap: seen.append(snap())),
    )
    assert any(v.abs().sum() > 0 for k, v in seen[0]["trainable"].items() if "lora_B" in k)
    assert m["steps_done"] == 2 and len(m["online_rounds"]) == 1
    assert m["online_rounds"][0]["generated"] == 6 and 1 <= m["n_online_examples"] <= 6
    assert len(seen[1]["extra"]["online"]) == m["n_online_examples"]  # resumable state carries the samples
    raw = np.stack([read_rollouts(rollouts).column(o).to_numpy() for o in OBJECTIVES], axis=1)
    z = np.round((raw - raw.mean(0)) / raw.std(0), 1)
    assert m["reward_mean"] == pytest.approx(raw.mean(0).tolist())
    assert m["score_low"] == pytest.approx(z.min(0).tolist()) and m["score_high"] == pytest.approx(
        z.max(0).tolist()
    )
    assert read_manifest(out)["status"] == "complete"


def test_ric_decodes_with_the_training_prompt(tmp_path):
    """The decode engine's prompt tokens for method 'ric' equal the training encoding of the same prompt tagged
    with the mapped targets. (RiC as a Ray Train run, ``train_ric_ray``, is the smoke pipeline test's ric stage,
    tests/test_pipeline.py.)"""
    from mage_ray.bundle import build_bundle
    from mage_ray.decode import Engine, Request
    from mage_ray.lora_mix import load_adapter
    from mage_ray.models import load_tokenizer
    from mage_ray.train.rollouts import encode_prompts

    cfg = _cfg(tmp_path)
    out = str(tmp_path / "ric")
    m = train_ric(cfg, out, rollouts_path=write_rollouts(tmp_path), steps=1, rounds=1)
    assert m["status"] == "complete" and m["steps_done"] == 1 and read_manifest(out)["mapping"] == "linf"
    load_adapter(f"{out}/adapter")

    bundle = build_bundle(
        tmp_path / "bundle",
        model="tiny-random",
        objectives=OBJECTIVES,
        beta=0.7,
        backbones=[out, out],
        ric=out,
        default_method="ric",
    )
    engine = Engine.from_bundle(bundle, methods=["ric"])
    mu, prompt = [0.2, 0.8], "What is 2 plus 2?"
    job = engine.prepare(Request(prompt, preference=mu, method="ric", max_new_tokens=4))
    targets = preference_to_targets(mu, m["score_low"], m["score_high"])
    tok = load_tokenizer("tiny-random")
    assert job.prompt_ids == encode_prompts(tok, [ric_user_prompt(prompt, targets)])[0]
    assert format_scores(targets) in tok.decode(job.prompt_ids)
    (res,) = engine.generate([Request(prompt, preference=mu, method="ric", max_new_tokens=4)])
    assert res.finish_reason != "error", res.error
