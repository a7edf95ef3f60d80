"""GenARM and PARM trainers: the losses by hand, the pair margin, two training steps of each on the smoke
config (parameters move, artifacts load), and PARM's resume (same preferences, same weights)."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch
from offline_fixtures import OBJECTIVES, offline_cfg, write_rollouts

from mage_ray.manifest import read_manifest
from mage_ray.train import offline
from mage_ray.train.arm import arm_dir, arm_loss, arm_pairs, build_arm_policy, train_arm
from mage_ray.train.parm import (
    build_pblora_policy,
    parm_dir,
    parm_loss,
    sample_preference,
    train_parm,
)
from mage_ray.train.ray_shell import TrainContext

ARM = ("arm.steps=2", "arm.batch_size=2", "arm.learning_rate=0.01", "arm.min_margin=0.0")


def test_arm_loss_hand_computed():
    """beta_r = 0.5; chosen log-probs (-3, -5), rejected (-4, -4):
    logits = 0.5 * (1, -1) = (0.5, -0.5); loss = mean(log(1 + e^-0.5), log(1 + e^0.5))
    = mean(0.4740770, 0.9740770) = 0.7240770; accuracy = 1/2; margin = mean(0.5, -0.5) = 0."""
    loss, m = arm_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), 0.5)
    assert loss.item() == pytest.approx(0.7240770, abs=1e-6)
    assert m == {"accuracy": 0.5, "margin": pytest.approx(0.0)}
    with pytest.raises(ValueError, match="beta_r"):
        arm_loss(torch.zeros(1), torch.zeros(1), 0.0)


def test_parm_loss_hand_computed():
    """mu = (0.25, 0.75), beta_r = 1.
    Objective a: chosen -1 vs rejected -1: logits 0, L_a = log 2 = 0.6931472.
    Objective b: chosen (-2, -1) vs rejected (-1, -3): logits (-1, 2),
      L_b = mean(log(1 + e), log(1 + e^-2)) = mean(1.3132617, 0.1269280) = 0.7200948.
    L = 0.25 * 0.6931472 + 0.75 * 0.7200948 = 0.7133579; accuracy = mean(0, 1/2) = 0.25."""
    t = torch.tensor
    loss, m = parm_loss(
        [t([-1.0]), t([-2.0, -1.0])], [t([-1.0]), t([-1.0, -3.0])], [0.25, 0.75], 1.0, ["a", "b"]
    )
    assert loss.item() == pytest.approx(0.7133579, abs=1e-6)
    assert m["loss/a"] == pytest.approx(0.6931472, abs=1e-6) and m["loss/b"] == pytest.approx(
        0.7200948, abs=1e-6
    )
    assert m["accuracy"] == 0.25 and m["mu/b"] == 0.75
    with pytest.raises(ValueError, match="one chosen and one rejected"):
        parm_loss([t([0.0])], [t([0.0])], [0.5, 0.5], 1.0)


def test_arm_pairs_respect_the_margin():
    """Objective o0: prompt a scores (0, 2), prompt b (0, 1); std over the 4 rows = sqrt(0.6875) = 0.8292, so
    b's gap of 1 is 1.2060 std: kept at min_margin 1.20, dropped at 1.21 (a's gap, 2.41 std, stays). With
    objective o1 the pairs follow o1: a's chosen is its first response."""
    table = pa.table(
        {
            "prompt": ["a", "a", "b", "b"],
            "prompt_ids": [[1], [1], [2], [2]],
            "response_ids": [[10], [11], [12], [13]],
            "o0": [0.0, 2.0, 0.0, 1.0],
            "o1": [5.0, 0.0, 0.0, 1.0],
        }
    )
    kept = arm_pairs(table, ["o0", "o1"], 0, 1.20)
    assert [(p.prompt, p.chosen_ids, p.rejected_ids) for p in kept] == [("a", [11], [10]), ("b", [13], [12])]
    assert [p.prompt for p in arm_pairs(table, ["o0", "o1"], 0, 1.21)] == ["a"]
    assert [(p.prompt, p.chosen_ids) for p in arm_pairs(table, ["o0", "o1"], 1, 0.0)] == [
        ("a", [10]),
        ("b", [13]),
    ]
    with pytest.raises(ValueError, match="objective_index"):
        arm_pairs(table, ["o0", "o1"], 2, 0.0)


def _initial_trainable(build, seed: int) -> dict[str, torch.Tensor]:
    """The trainable tensors a run starts from (``offline.prepare`` seeds, then builds)."""
    torch.manual_seed(seed)
    return offline.trainable_state(build("cpu")[0])


def test_train_arm_two_steps(tmp_path):
    from mage_ray.lora_mix import load_adapter

    cfg = offline_cfg(tmp_path, *ARM)
    rollouts = write_rollouts(tmp_path)
    out = arm_dir(cfg, "readability")
    assert out.endswith("/arms/readability") and arm_dir(cfg, "hf:/m/rm").rsplit("/", 1)[-1].startswith(
        "hf__m_rm-"
    )
    manifest = train_arm(
        cfg, out, objective="readability", rollouts_path=rollouts, ctx=TrainContext(quiet=True)
    )
    assert read_manifest(out)["status"] == "complete"
    assert (manifest["kind"], manifest["objective"], manifest["objectives"]) == (
        "arm",
        "readability",
        OBJECTIVES,
    )
    # 6 prompts, arm.val_fraction 0.1: 1 prompt's pair held out, 5 trained on
    assert manifest["beta_r"] == cfg.arm.beta_r and manifest["steps_done"] == 2
    assert (manifest["n_pairs"], manifest["n_val_pairs"]) == (5, 1)
    for key in ("val_accuracy", "val_accuracy_base"):  # 1 held-out pair: the interval holds 0.5
        assert manifest[key]["n_pairs"] == 1 and manifest[key]["verdict"] == "at chance", manifest[key]
    lines = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2] and {"loss", "accuracy", "margin"} <= set(lines[0])

    adapter = load_adapter(f"{out}/adapter")  # r = arm.lora_r = 8, s = arm.lora_alpha / r = 16 / 8
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert adapter.rank(q[len("base_model.model.") :]) == 8 and set(adapter.scaling.values()) == {2.0}
    start = _initial_trainable(partial(build_arm_policy, cfg), cfg.arm.seed)
    A0, B0 = start[f"{q}.lora_A.default.weight"], start[f"{q}.lora_B.default.weight"]
    A, B = adapter.modules[q[len("base_model.model.") :]]
    assert not B0.any() and B.abs().sum() > 0 and not torch.equal(A, A0)  # both moved from PEFT's init


@pytest.fixture(scope="module")
def parm_run(tmp_path_factory):
    """PARM trained 2 steps (snapshots of every step kept for the resume test)."""
    tmp = tmp_path_factory.mktemp("parm")
    cfg = offline_cfg(tmp, *ARM)
    rollouts = write_rollouts(tmp)
    snaps = []
    ctx = TrainContext(on_step=lambda step, m, snapshot: snaps.append(snapshot()))
    manifest = train_parm(cfg, parm_dir(cfg), rollouts_path=rollouts, ctx=ctx)
    return cfg, rollouts, manifest, snaps


def test_train_parm_two_steps(parm_run):
    from mage_ray.pblora import load_pblora, pblora_components

    cfg, _, manifest, _ = parm_run
    out = parm_dir(cfg)
    assert out.endswith("/parm") and read_manifest(out)["status"] == "complete"
    assert (manifest["kind"], manifest["adapter"], manifest["objectives"]) == ("parm", "pblora", OBJECTIVES)
    assert manifest["n_pairs"] == {o: 5 for o in OBJECTIVES} and (manifest["r1"], manifest["r2"]) == (4, 4)
    assert manifest["n_val_pairs"] == {o: 1 for o in OBJECTIVES}
    assert set(manifest["val_accuracy"]) == set(OBJECTIVES) == set(manifest["val_accuracy_other_vertex"])
    lines = [json.loads(x) for x in open(f"{out}/metrics.jsonl")]
    mu = [sample_preference(cfg.arm.seed, s, 2, cfg.arm.pref_sample_p) for s in (0, 1)]
    for line, m in zip(lines, mu):  # the logged preference is the seeded Dirichlet draw of that step
        assert [line[f"mu/{o}"] for o in OBJECTIVES] == pytest.approx(
            m.tolist()
        ) and m.sum() == pytest.approx(1)

    tensors, config = load_pblora(f"{out}/pblora")
    assert (
        config["n"] == 2
        and config["objectives"] == OBJECTIVES
        and config["target_modules"] == ["q_proj", "v_proj"]
    )
    start = _initial_trainable(partial(build_pblora_policy, cfg, 2), cfg.arm.seed)
    assert set(start) == set(tensors)  # only the PBLoRA tensors are trainable (and saved); no pref buffer
    for key, t0 in start.items():  # every tensor moved (B from PARM's zero init)
        assert not torch.equal(tensors[key], t0), key
    assert len(pblora_components(f"{out}/pblora", n=2)) == 3


def test_parm_output_moves_with_the_preference(parm_run):
    """The trained PARM's next-token distribution on a fixed prompt differs between mu = (1, 0) and (0, 1): mean
    total variation over the positions above 1e-5 (float noise is ~1e-8), i.e. its preference-dependent part
    learned something, which "every tensor moved" does not show (a PARM whose B2 stayed at its zero init moves
    every other tensor and gives the same output at every mu: TV 0). At mu = (0.5, 0.5) the output lies between
    the two ends (TV to each smaller than between them)."""
    from mage_ray.pblora import load_pblora, set_preference

    cfg, _, _, _ = parm_run
    tensors, _ = load_pblora(f"{parm_dir(cfg)}/pblora")
    model, tok = build_pblora_policy(cfg, 2)
    model.load_state_dict(tensors, strict=False)
    model.eval()
    ids = torch.tensor([tok("Question number 3: what is 3 plus 3?")["input_ids"]])

    def probs(mu):
        set_preference(model, mu)
        with torch.no_grad():
            return torch.softmax(model(ids).logits[0].float(), dim=-1)  # [L, V]

    def tv(p, q):
        return float(0.5 * (p - q).abs().sum(-1).mean())

    p0, p1, mid = probs([1.0, 0.0]), probs([0.0, 1.0]), probs([0.5, 0.5])
    assert tv(p0, probs([1.0, 0.0])) < 1e-7  # deterministic
    assert tv(p0, p1) > 1e-5, tv(p0, p1)
    assert tv(p0, mid) < tv(p0, p1) and tv(p1, mid) < tv(p0, p1)


def test_parm_resumes_with_the_same_preferences(parm_run, tmp_path):
    """Step 1 (0-based) rerun from the snapshot after step 0 (saved and loaded like a Ray checkpoint,
    weights_only) lands on the same PBLoRA weights as the uninterrupted run: the mu of a step and its batches
    depend on (seed, step) only, and the snapshot holds exactly the PBLoRA tensors and AdamW state."""
    from mage_ray.pblora import load_pblora

    cfg, rollouts, _, snaps = parm_run
    torch.save(snaps[0], tmp_path / "state.pt")  # as a Ray checkpoint holds it
    resume = torch.load(tmp_path / "state.pt", weights_only=True)
    out = str(tmp_path / "resumed")
    manifest = train_parm(cfg, out, rollouts_path=rollouts, ctx=TrainContext(resume=resume, quiet=True))
    assert manifest["steps_done"] == 2 and len(manifest["loss_by_step"]) == 1
    resumed, _ = load_pblora(f"{out}/pblora")
    straight, _ = load_pblora(f"{parm_dir(cfg)}/pblora")
    for key in straight:
        assert torch.allclose(resumed[key], straight[key], atol=1e-6), key
    straight_loss = read_manifest(parm_dir(cfg))["final_metrics"]["loss"]
    assert np.isclose(manifest["final_metrics"]["loss"], straight_loss, atol=1e-6)
