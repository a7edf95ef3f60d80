"""MODPO: loss, pivot choice, pair construction, a training step, resume, a grid point -> bundle -> decode."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from offline_fixtures import OBJECTIVES, offline_cfg, write_rollouts

from mage_ray.manifest import read_manifest
from mage_ray.train.modpo import modpo_dir, modpo_loss, pivot_of, train_modpo, train_modpo_grid
from mage_ray.train.offline import batch_indices
from mage_ray.train.preference_data import build_pairs, collate_sequences, zscore_stats
from mage_ray.train.ray_shell import TrainContext


def _cfg(tmp_path, *extra):
    return offline_cfg(tmp_path, *extra)


def test_modpo_loss_hand_computed():
    """beta = 0.5, w = (w_k, w_rest) = (0.25, 0.75), one margin objective.

    Row 0: policy/ref chosen -10/-10.5, rejected -11/-10.5, margin scores 1 vs 0:
      implicit = 0.5 * 0.5 - 0.5 * (-0.5) = 0.5; margin = 0.75 * (1 - 0) = 0.75;
      logits = (0.5 - 0.75) / 0.25 = -1
    Row 1: chosen -12/-12, rejected -12/-11, margin scores 0 vs 0:
      implicit = 0 - 0.5 * (-1) = 0.5; margin = 0; logits = 0.5 / 0.25 = 2
    loss = mean(log(1 + e^1), log(1 + e^-2)) = mean(1.3132617, 0.1269280) = 0.7200948;
    accuracy = 1/2 (only row 1 has logits > 0); margin = mean(-1, 2) = 0.5.
    """
    t = torch.tensor
    loss, m = modpo_loss(
        t([-10.0, -12.0]),
        t([-11.0, -12.0]),
        t([-10.5, -12.0]),
        t([-10.5, -11.0]),
        t([[1.0], [0.0]]),
        t([[0.0], [0.0]]),
        0.25,
        t([0.75]),
        0.5,
    )
    assert loss.item() == pytest.approx(0.7200948, abs=1e-6)
    assert m["accuracy"] == 0.5 and m["margin"] == pytest.approx(0.5)
    assert m["implicit_reward_margin"] == pytest.approx(0.5)


def test_pivot_defaults_to_largest_weight_and_zero_weight_is_refused():
    """w_0 = 0 has no MODPO pivot on objective 0 (1 / w_0); the default pivots on the largest weight."""
    assert pivot_of([0.0, 1.0]) == 1
    assert pivot_of([0.5, 0.5]) == 0  # first on ties
    assert pivot_of([0.2, 0.3, 0.5]) == 2
    with pytest.raises(ValueError, match="w_pivot > 0"):
        pivot_of([0.0, 1.0], pivot=0)
    with pytest.raises(ValueError, match="must be > 0"):
        modpo_loss(*(torch.zeros(1),) * 4, torch.zeros(1, 1), torch.zeros(1, 1), 0.0, torch.ones(1), 0.1)


def test_build_pairs_best_vs_worst_per_prompt():
    """Prompt a: scores on objective 0 (0.1, 0.9, 0.5) -> chosen row 1, rejected row 0 (row 3, the best on
    objective 0 overall, has an empty response and is dropped). Prompt b has one response, prompt c two with
    equal scores: both skipped. With w = (0, 1) prompt a's pair follows objective 1: chosen row 0,
    rejected row 2."""
    table = pa.table(
        {
            "prompt": ["a", "a", "a", "a", "b", "c", "c"],
            "prompt_ids": [[1, 2]] * 4 + [[3]] + [[4]] * 2,
            "response_ids": [[10], [11], [12], [], [13], [14], [15]],
            "o0": [0.1, 0.9, 0.5, 5.0, 0.3, 0.2, 0.2],
            "o1": [0.8, 0.0, -0.4, 0.0, 0.0, 0.0, 0.0],
        }
    )
    pairs = build_pairs(table, ["o0", "o1"], [1.0, 0.0])
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.prompt, p.prompt_ids, p.chosen_ids, p.rejected_ids) == ("a", [1, 2], [11], [10])
    assert p.chosen_scores.tolist() == [0.9, 0.0] and p.rejected_scores.tolist() == [0.1, 0.8]
    by_o1 = build_pairs(table, ["o0", "o1"], [0.0, 1.0])
    assert [(q.chosen_ids, q.rejected_ids) for q in by_o1] == [([10], [12])]
    with pytest.raises(ValueError, match="not columns"):
        build_pairs(table, ["o0", "missing"], [1.0, 0.0])


def test_collate_masks_the_positions_that_predict_response_tokens():
    """Prompt [5, 6] + response [7, 8] -> input [5, 6, 7, 8]; positions 1 and 2 predict 7 and 8."""
    b = collate_sequences([[5, 6], [9]], [[7, 8], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 4, 0, 0]]
    assert b["mask"].tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert b["next_ids"][0, 1:3].tolist() == [7, 8]
    mean, std = zscore_stats(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0] and std.tolist() == [1.0, 1e-6]
    # Two ranks split one global batch of 4 into disjoint halves.
    assert sorted(batch_indices(0, 10, 4, 0, 0, 2) + batch_indices(0, 10, 4, 0, 1, 2)) == sorted(
        batch_indices(0, 10, 4, 0)
    )


def test_one_step_changes_the_lora_and_writes_the_artifact(tmp_path):
    from mage_ray.lora_mix import load_adapter

    cfg = _cfg(tmp_path)
    rollouts = write_rollouts(tmp_path)
    seen = []

    def on_step(step, m, snapshot):
        seen.append(snapshot())

    out = str(tmp_path / "modpo")
    manifest = train_modpo(
        cfg, out, mu=[0.3, 0.7], rollouts_path=rollouts, steps=1, ctx=TrainContext(on_step=on_step)
    )
    b_after = {k: v for k, v in seen[0]["trainable"].items() if "lora_B" in k}
    assert b_after and any(v.abs().sum() > 0 for v in b_after.values())  # PEFT starts lora_B at 0
    assert manifest["pivot"] == 1 and manifest["preference"] == [0.3, 0.7] and manifest["n_pairs"] == 6
    assert read_manifest(out)["status"] == "complete"
    adapter = load_adapter(f"{out}/adapter")
    assert adapter.modules
    lines = (tmp_path / "modpo" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1


def test_modpo_grid_point_trains_skips_and_decodes(tmp_path, capsys):
    """A grid point trains into its directory; a fixed pivot 0 skips (0, 1) and a complete point is not retrained
    (neither starts Ray); the bundle decodes method 'modpo'. (The grid as concurrent Ray Train runs is the smoke
    pipeline test's modpo stage, tests/test_pipeline.py.)"""
    from mage_ray.bundle import build_bundle
    from mage_ray.decode import Engine, Request
    from mage_ray.lora_mix import load_adapter

    cfg = _cfg(tmp_path)
    rollouts = write_rollouts(tmp_path)
    mu = [0.0, 1.0]
    d = modpo_dir(cfg, mu)
    assert d.endswith("/modpo/mu_0-1")
    manifest = train_modpo(cfg, d, mu=mu, rollouts_path=rollouts)
    assert manifest["preference"] == mu and manifest["pivot"] == 1
    assert manifest["status"] == "complete" and manifest["steps_done"] == 2
    assert read_manifest(d)["status"] == "complete"
    load_adapter(f"{d}/adapter")
    assert train_modpo_grid(cfg, [mu], rollouts_path=rollouts, pivot=0, progress=False) == []
    assert "skipping mu=[0.0, 1.0]" in capsys.readouterr().out
    (again,) = train_modpo_grid(cfg, [mu], rollouts_path=rollouts, progress=False)
    assert again["created"] == manifest["created"]

    bundle = build_bundle(
        tmp_path / "bundle",
        model="tiny-random",
        objectives=OBJECTIVES,
        beta=0.7,
        backbones=[d, d],
        modpo=[(mu, d)],
        default_method="modpo",
    )
    engine = Engine.from_bundle(bundle, methods=["modpo"])
    ok, missing = engine.generate(
        [
            Request("What is 2 plus 2?", preference=p, method="modpo", max_new_tokens=4)
            for p in (mu, [1.0, 0.0])
        ]
    )
    assert ok.finish_reason != "error" and ok.usage.completion_tokens >= 1, ok.error
    assert missing.finish_reason == "error" and "no modpo adapter" in missing.error


def test_resuming_from_a_snapshot_matches_an_uninterrupted_run(tmp_path):
    """Step 2 resumed from the step-1 snapshot (saved and loaded like a Ray checkpoint, weights_only) gives
    the same LoRA as two uninterrupted steps: same batches, same optimizer state, same reference log-probs."""
    cfg = _cfg(tmp_path)
    rollouts = write_rollouts(tmp_path)
    snaps = []
    full = train_modpo(
        cfg,
        str(tmp_path / "a"),
        mu=[0.5, 0.5],
        rollouts_path=rollouts,
        ctx=TrainContext(on_step=lambda s, m, snap: snaps.append(snap())),
    )
    torch.save(snaps[0], tmp_path / "state.pt")
    resume = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = train_modpo(
        cfg,
        str(tmp_path / "b"),
        mu=[0.5, 0.5],
        rollouts_path=rollouts,
        ctx=TrainContext(resume=resume, quiet=True),
    )
    assert resumed["steps_done"] == 2 and resumed["loss_by_step"] == [pytest.approx(full["loss_by_step"][1])]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_token_logps_match_a_full_log_softmax(tiny_model_path):
    """token_logps keeps logits only from the first response position; the values equal a full forward's
    log_softmax gathered at the next tokens, on the response positions (and 0 elsewhere)."""
    from transformers import AutoModelForCausalLM

    from mage_ray.train.offline import sequence_logps, token_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    batch = collate_sequences([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]], pad_id=0)
    with torch.no_grad():
        got = token_logps(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = full.log_softmax(-1).gather(-1, batch["next_ids"][..., None]).squeeze(-1) * batch["mask"]
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(sequence_logps(model, batch), want.sum(1), atol=1e-5)
