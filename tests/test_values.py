"""Explicit value models (Eq. 16): loss, batching, training on the tiny model, directory format, Ray Train."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mage_ray.config import load_config
from mage_ray.models import load_tokenizer
from mage_ray.train.offline import OfflineSettings, prepare
from mage_ray.train.ray_shell import TrainContext
from mage_ray.train.rollouts import encode_prompts, rollout_table
from mage_ray.train.values import (
    ValueExample,
    build_value_net,
    collate,
    fit_value_net,
    load_value_data,
    ranking_accuracy,
    ranking_counts,
    train_value_model,
    value_loss,
)
from mage_ray.value_model import ValueModelError, apply_value_head, load_value_model

X_TOKEN = 1000
"""The synthetic objective is the fraction of this token in the response."""
VOCAB = list(range(1000, 1010))


def _cfg(tmp_path, *extra):
    return load_config(
        "configs/smoke.yaml",
        [
            f"storage.storage_path={tmp_path}",
            "value.learning_rate=0.003",
            "value.batch_size=8",
            "value.val_fraction=0.25",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def synthetic_rollouts(tmp_path_factory) -> str:
    """40 prompts x 4 responses of 8 tokens over a 10-token vocabulary; each response has its own rate of
    X_TOKEN (uniform in [0, 1]), and the reward 'frac' is the fraction of X_TOKEN in it ('neg' = -frac)."""
    tok = load_tokenizer("tiny-random")
    rng = np.random.default_rng(0)
    prompts = [f"Question {i}?" for i in range(40)]
    prompt_ids = encode_prompts(tok, prompts)
    rows, idx, frac = [], [], []
    for i, p in enumerate(prompts):
        for _ in range(4):
            rate = rng.uniform(0, 1)
            resp = [X_TOKEN if rng.uniform() < rate else int(rng.choice(VOCAB[1:])) for _ in range(8)]
            rows.append((p, tok.decode(resp), prompt_ids[i], resp))
            idx.append(i)
            frac.append(sum(t == X_TOKEN for t in resp) / len(resp))
    path = tmp_path_factory.mktemp("rollouts") / "rollouts.parquet"
    frac = np.array(frac)
    pq.write_table(rollout_table(idx, rows, {"frac": frac, "neg": -frac}), path)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_rollouts):
    tmp = tmp_path_factory.mktemp("values")
    cfg = _cfg(tmp)
    out = f"{tmp}/smoke/values/frac"
    manifest = train_value_model(cfg, synthetic_rollouts, "frac", steps=20)
    return cfg, out, manifest


def test_value_loss_hand_computed():
    """Two sequences, two positions each, Eq. 16 with a batch mean:

    seq 0: values (1, 2), target 0.5, both positions count: 0.5 * (0.5^2 + 1.5^2) = 0.5 * 2.5 = 1.25
    seq 1: values (0, 3), target 1.0, only position 0 counts: 0.5 * (0 - 1)^2 = 0.5
    loss = (1.25 + 0.5) / 2 = 0.875
    """
    values = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    targets = torch.tensor([0.5, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert value_loss(values, targets, mask).item() == pytest.approx(0.875)


def test_collate_aligns_hidden_state_before_each_response_token():
    """Prompt (10, 11, 12), response (20, 21): positions 2 and 3 (the tokens *before* 20 and 21) predict
    V[20] and V[21]; the shorter second row is right-padded and its mask covers position 1 only."""
    batch = collate(
        [ValueExample("a", [10, 11, 12], [20, 21], 1.0, 0.3), ValueExample("b", [30], [40], 0.0, -0.3)],
        pad_id=2,
    )
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 40, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["mask"].tolist() == [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]]
    assert batch["next_ids"][0, 2:4].tolist() == [20, 21]
    assert batch["next_ids"][1, 0].item() == 40
    assert batch["target"].tolist() == pytest.approx([0.3, -0.3])


def test_ranking_accuracy_hand_computed():
    """Prompt a: rewards (1, 2, 3), scores (0.1, 0.3, 0.2): pairs (1,2) ok, (1,3) ok, (2,3) wrong -> 2 of 3.
    Prompt b: rewards (5, 5) tie -> no pair. Prompt c: rewards (0, 1), equal scores -> 0.5.
    Total (2 + 0.5) / 4 = 0.625."""
    scores = [0.1, 0.3, 0.2, 9.0, 1.0, 0.7, 0.7]
    rewards = [1, 2, 3, 5, 5, 0, 1]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    assert ranking_accuracy(scores, rewards, groups) == pytest.approx(0.625)
    assert ranking_counts(scores, rewards, groups) == (2, 1, 4)  # wins, ties, pairs
    assert ranking_accuracy([1.0, 2.0], [1.0, 1.0], ["a", "a"]) is None


def test_split_holds_out_prompts_and_zscores_with_train_stats(synthetic_rollouts):
    train, val, mean, std = load_value_data(synthetic_rollouts, "frac", val_fraction=0.25, seed=0)
    assert len(train) + len(val) == 160
    assert len({e.prompt for e in val}) == 10
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    assert mean == pytest.approx(np.mean([e.reward for e in train]))
    assert np.mean([e.target for e in train]) == pytest.approx(0.0, abs=1e-9)
    assert np.std([e.target for e in train]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'nope' is not a column.*'frac', 'neg'"):
        load_value_data(synthetic_rollouts, "nope", val_fraction=0.25)


def test_parameters_change_after_training_steps(tmp_path, synthetic_rollouts):
    """The head starts at zero, so step 1 moves only the head (zero head -> zero gradient into LoRA);
    after step 2 the LoRA B matrices have moved as well."""
    cfg = _cfg(tmp_path)
    train, _, _, _ = load_value_data(synthetic_rollouts, "frac", val_fraction=0.25)
    ctx = TrainContext(quiet=True)
    t = prepare(lambda device: build_value_net(cfg, device), seed=0, learning_rate=1e-3, ctx=ctx)
    net = t.model
    assert torch.count_nonzero(net.head.weight) == 0
    before = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    history = fit_value_net(t, train, OfflineSettings(2, 4, 1e-3, 0, None), ctx)
    assert [h["step"] for h in history] == [1, 2] and "grad_norm" not in history[0]  # no clipping
    after = dict(net.named_parameters())
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["head.bias"], after["head.bias"])
    lora_b = [n for n in before if "lora_B" in n]
    assert lora_b and all(not torch.equal(before[n], after[n]) for n in lora_b)
    frozen = [p for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all("lora" not in n for n, p in net.named_parameters() if not p.requires_grad)


def test_value_model_beats_the_constant_predictor(trained):
    """20 steps on the synthetic 'frac' objective: the token-averaged validation MSE must be clearly below
    the best constant predictor's (the token-weighted variance of the validation targets), and held-out
    responses to the same prompt must be ranked better than chance."""
    _, _, m = trained
    assert m["complete"] is True and m["status"] == "complete"
    assert m["val_mse"] < 0.8 * m["val_mse_best_constant"], m
    assert m["val_mse_best_constant"] <= m["val_mse_constant"] + 1e-9
    assert m["n_val_pairs"] > 20
    assert m["ranking_accuracy"] > 0.6, m
    acc = m["val_accuracy"]  # the same pairs with their exact interval: this one has learned
    assert acc["value"] == pytest.approx(m["ranking_accuracy"]) and acc["n_pairs"] == m["n_val_pairs"]
    assert acc["lo"] > 0.5 and acc["verdict"] == "above chance", acc


def test_saved_directory_roundtrip_and_not_retrained(trained, synthetic_rollouts, capsys):
    """The saved adapter + head reproduce the trained net's V[y_t] through the inference-side helpers."""
    from peft import PeftModel

    from mage_ray.models import load_policy

    cfg, out, manifest = trained
    assert sorted(os.listdir(out)) == ["adapter", "manifest.json", "value_head.safetensors"]
    vm = load_value_model(out, vocab_size=49152, hidden_size=64)
    assert vm.objective == "frac" and vm.head_weight.shape == (49152, 64)
    assert manifest["target"] == "zscore" and manifest["reward_std"] > 0
    assert set(vm.adapter.modules) == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"}

    policy, tok = load_policy(cfg.model)
    peft = PeftModel.from_pretrained(policy, os.path.join(out, "adapter"))
    _, val, _, _ = load_value_data(synthetic_rollouts, "frac", val_fraction=0.25, seed=cfg.value.seed)
    batch = collate(val[:3], tok.pad_token_id)
    with torch.no_grad():
        h = (
            peft.get_base_model()
            .get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .last_hidden_state
        )
        full = apply_value_head(h, vm.head_weight, vm.head_bias)  # [B, L, V]
    picked = full.gather(2, batch["next_ids"][..., None]).squeeze(-1)
    assert full.shape[-1] == 49152
    assert picked[batch["mask"] > 0].abs().max() > 0.05  # the head is no longer zero

    head_mtime = os.stat(os.path.join(out, "value_head.safetensors")).st_mtime_ns
    again = train_value_model(cfg, synthetic_rollouts, "frac", steps=20)
    assert again == manifest
    assert os.stat(os.path.join(out, "value_head.safetensors")).st_mtime_ns == head_mtime
    assert "not retraining" in capsys.readouterr().out


def test_vocab_mismatch_is_a_clear_error(trained):
    _, out, _ = trained
    with pytest.raises(ValueModelError, match=r"has vocabulary 49152 but the policy has 32000"):
        load_value_model(out, vocab_size=32000)
    with pytest.raises(ValueModelError, match="hidden size 64 but the policy has 576"):
        load_value_model(out, hidden_size=576)


def test_incomplete_directory_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text('{"objective": "x", "status": "running"}')
    with pytest.raises(ValueModelError, match="not complete"):
        load_value_model(tmp_path)


def test_resume_from_a_checkpointed_state_matches_an_uninterrupted_run(tmp_path, synthetic_rollouts):
    """What the Ray worker checkpoints (the snapshot: trainable tensors + AdamW state + step, via torch.save
    and torch.load(weights_only=True)) resumes to the same weights as a run that was never interrupted."""
    import io

    cfg = _cfg(tmp_path)
    train_value_model(cfg, synthetic_rollouts, "frac", f"{tmp_path}/straight", steps=4)
    saved = {}

    def capture(step, metrics, snapshot):
        if step == 2:
            buf = io.BytesIO()
            torch.save(snapshot(), buf)
            saved["state"] = buf.getvalue()

    train_value_model(
        cfg, synthetic_rollouts, "frac", f"{tmp_path}/first_half", steps=2, ctx=TrainContext(on_step=capture)
    )
    state = torch.load(io.BytesIO(saved["state"]), weights_only=True)
    seen = []
    m = train_value_model(
        cfg,
        synthetic_rollouts,
        "frac",
        f"{tmp_path}/resumed",
        steps=4,
        ctx=TrainContext(resume=state, on_step=lambda step, *_: seen.append(step)),
    )
    assert m["steps"] == 4 and seen == [3, 4]  # continued at step 3 (fresh weights from there would differ)
    a = load_value_model(f"{tmp_path}/straight")
    b = load_value_model(f"{tmp_path}/resumed")
    torch.testing.assert_close(a.head_weight, b.head_weight)
    torch.testing.assert_close(a.head_bias, b.head_bias)
    for module, (A, B) in a.adapter.modules.items():
        torch.testing.assert_close(A, b.adapter.modules[module][0])
        torch.testing.assert_close(B, b.adapter.modules[module][1])


def test_objective_names_become_safe_path_names():
    """Registry names are kept; an hf:<path>@index objective becomes a safe, distinct directory name."""
    from mage_ray.train.values import path_name

    assert path_name("relevance") == "relevance"
    a, b = path_name("hf:/models/rm@0"), path_name("hf:/models/rm@1")
    assert a != b and all(c.isalnum() or c in "._-" for c in a + b)
