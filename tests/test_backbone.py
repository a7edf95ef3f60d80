"""Stage 1 backbone trainer (plain process): GRPO on h = w^T r with a tiny random model and toy objectives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mage_ray.config import load_config
from mage_ray.manifest import read_manifest
from mage_ray.train.backbone import ObjectiveFailure, ObjectiveReward, train_backbone
from mage_ray.train.stage1 import RewardWeightsError, train_sft, validate_reward_weights

PROMPTS = ["Say something nice.", "Tell me about boom boxes.", "What is a cat?", "Write a short poem."]


def toy_objectives():
    """Two cheap objectives (nested so cloudpickle ships them by value): length/10 and count of 'e'."""

    def length(prompts, responses):
        return np.array([len(r) / 10.0 for r in responses])

    def count_e(prompts, responses):
        return np.array([r.count("e") for r in responses], dtype=float)

    length.name, count_e.name = "length", "count_e"
    return [length, count_e]


def smoke_cfg(tmp: Path, *overrides: str):
    return load_config(
        None,
        [
            "model.name_or_path=tiny-random",
            "backbone.max_completion_length=8",
            "backbone.num_generations=2",
            "backbone.prompts_per_step=2",
            "backbone.steps=2",
            "backbone.checkpoint_every=1",
            f"storage.storage_path={tmp}",
            *overrides,
        ],
    )


def test_train_backbone_updates_lora_and_writes_artifacts(tmp_path):
    """2 GRPO steps on w = (0.7, 0.3): LoRA B (initialised to 0 by PEFT) becomes non-zero, the adapter and
    manifest are written, and every logged step's combined reward is w^T (mean r_1, mean r_2)
    (hand check: TRL's 'reward' is the mean over completions of sum_j w_j r_j = sum_j w_j mean r_j)."""
    from safetensors.torch import load_file

    cfg = smoke_cfg(tmp_path)
    out = tmp_path / "b0"
    m = train_backbone(cfg, [0.7, 0.3], out, name="b0", objectives=toy_objectives(), prompts=PROMPTS)

    assert m["status"] == "complete" and m["steps_done"] == 2 and m["resumed_from_step"] is None
    assert m["objectives"] == ["length", "count_e"] and m["w"] == [0.7, 0.3] and m["trainer"] == "grpo"
    assert read_manifest(out) == json.loads(json.dumps(m))
    assert (out / "adapter" / "adapter_config.json").is_file()
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert lora_b and any(v.abs().max() > 0 for v in lora_b.values()), "LoRA B never moved from its zero init"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        expected = 0.7 * r["rewards/length/mean"] + 0.3 * r["rewards/count_e/mean"]
        assert r["reward"] == pytest.approx(expected, rel=1e-5)
        assert "kl" in r
    assert m["reward_by_step"] == [r["reward"] for r in rows]
    assert (out / "checkpoints" / "checkpoint-2").is_dir()


@pytest.mark.parametrize(
    "w, match",
    [
        ([0.5, 0.3, 0.2], r"w must have length 2"),
        ([1.2, -0.2], r"w\[1\] = -0.2 is negative"),
        ([float("nan"), 1.0], r"w\[0\] = nan is not finite"),
        ([0.5, 0.4], r"w sums to 0.9"),
        ("ab", r"w must"),
    ],
)
def test_reward_weights_validation(w, match):
    with pytest.raises(RewardWeightsError, match=match):
        validate_reward_weights(w, 2)


def test_bad_weights_and_unwritable_out_dir_fail_before_training(tmp_path):
    cfg = smoke_cfg(tmp_path)
    with pytest.raises(RewardWeightsError, match="w sums to"):
        train_backbone(
            cfg, [0.6, 0.6], tmp_path / "x", name="x", objectives=toy_objectives(), prompts=PROMPTS
        )
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="out_dir .* is not writable"):
        train_backbone(
            cfg, [0.5, 0.5], blocker / "sub", name="x", objectives=toy_objectives(), prompts=PROMPTS
        )
    assert validate_reward_weights([0.25, 0.75], 2).tolist() == [0.25, 0.75]


def test_objective_reward_records_first_bad_sample():
    """Non-finite score on sample 1 -> failure names the objective and sample 1; batch scores NaN."""

    def bad(prompts, responses):
        return np.array([1.0, math.inf, math.nan])

    r = ObjectiveReward(bad, "bad")
    out = r(prompts=["p0", "p1", "p2"], completions=[[{"role": "assistant", "content": "c"}]] * 3)
    assert all(math.isnan(x) for x in out)
    assert isinstance(r.failure, ObjectiveFailure)
    assert "objective 'bad' returned a non-finite value inf on sample 1: prompt='p1'" in str(r.failure)


def test_objective_failure_stops_run_and_keeps_checkpoint(tmp_path):
    """The objective works at step 1 and raises at step 2 on prompts mentioning 'boom': the run stops with
    an error naming the objective and a 'boom' sample; the step-1 checkpoint stays; manifest says failed."""
    calls = {"n": 0}

    def fragile(prompts, responses):
        calls["n"] += 1
        if calls["n"] > 1 and any("boom" in p for p in prompts):
            raise RuntimeError("scorer crashed")
        return np.zeros(len(prompts))

    fragile.name = "fragile"
    cfg = smoke_cfg(tmp_path, "backbone.prompts_per_step=4", "backbone.steps=3")
    out = tmp_path / "b_fail"
    with pytest.raises(ObjectiveFailure) as info:
        train_backbone(
            cfg, [0.5, 0.5], out, name="b_fail", objectives=[toy_objectives()[0], fragile], prompts=PROMPTS
        )
    msg = str(info.value)
    assert "objective 'fragile' raised RuntimeError: scorer crashed on sample" in msg
    assert "boom" in msg and "stopped at step 2" in msg
    assert info.value.checkpoint is not None and info.value.checkpoint.endswith("checkpoint-1")
    assert Path(info.value.checkpoint, "adapter_model.safetensors").is_file()
    m = read_manifest(out)
    assert m["status"] == "failed" and "fragile" in m["error"]
    assert not (out / "adapter").exists()


def test_train_sft_merges_into_new_base(tmp_path):
    """LoRA SFT for 2 steps, merged: the saved model's q_proj weights differ from the base model's."""
    from safetensors.torch import load_file

    from mage_ray.models import resolve_model_path

    cfg = smoke_cfg(tmp_path)
    pairs = [("Say hi.", "Hello there!"), ("Name a colour.", "Blue.")]
    path = train_sft(cfg, pairs, tmp_path / "sft", steps=2)
    assert (path / "config.json").is_file() and (read_manifest(tmp_path / "sft") or {})["steps_done"] == 2
    base = load_file(Path(resolve_model_path("tiny-random")) / "model.safetensors")
    new = {}
    for f in path.glob("*.safetensors"):
        new.update(load_file(f))
    key = next(k for k in base if "q_proj.weight" in k)
    assert not np.allclose(base[key].numpy(), new[key].numpy())
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        train_sft(cfg, [("only prompt",)], tmp_path / "sft2", steps=1)


def test_long_prompts_keep_their_last_max_prompt_tokens(tmp_path):
    """task.max_prompt_tokens = 8: a 60-word prompt keeps its last 8 tokens (ending '... word59'); short
    prompts pass unchanged, as chat messages."""
    from mage_ray.models import load_tokenizer
    from mage_ray.train.backbone import _prompt_dataset

    cfg = smoke_cfg(tmp_path, "task.max_prompt_tokens=8")
    tok = load_tokenizer("tiny-random")
    long = " ".join(f"word{i}" for i in range(60))
    ds = _prompt_dataset(cfg, tok, ["short one", long])
    assert ds[0]["prompt"] == [{"role": "user", "content": "short one"}]
    cut = ds[1]["prompt"][0]["content"]
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= 8 and cut.endswith("word59")


@pytest.mark.parametrize("agg", ["sum_then_normalize", "normalize_then_sum"])
def test_reward_aggregation_reaches_grpo_config(tmp_path, agg):
    from mage_ray.train.backbone import _trainer_args

    cfg = smoke_cfg(tmp_path, f"backbone.reward_aggregation={agg}")
    args = _trainer_args(cfg, "grpo", np.array([0.7, 0.3]), 2, tmp_path / "out", quiet=True)
    assert args.multi_objective_aggregation == agg and list(args.reward_weights) == [0.7, 0.3]


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_trainer_args_turn_checkpointing_off_without_deprecation_warnings(tmp_path, trainer):
    """TRL defaults activation checkpointing on; the configs turn it off by its current name, so building them
    raises no FutureWarning (``gradient_checkpointing=False`` warned once per worker)."""
    import warnings

    from mage_ray.train.backbone import _trainer_args

    cfg = smoke_cfg(tmp_path, f"backbone.trainer={trainer}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = _trainer_args(cfg, trainer, np.array([0.7, 0.3]), 2, tmp_path / "out", quiet=True)
    assert args.gradient_checkpointing is False and args.activation_checkpointing is False


def test_reward_aggregation_is_validated(tmp_path):
    from mage_ray.config import ConfigError

    with pytest.raises(ConfigError, match="backbone.reward_aggregation"):
        smoke_cfg(tmp_path, "backbone.reward_aggregation=mean")
    with pytest.raises(ConfigError, match="trainer rloo"):
        smoke_cfg(tmp_path, "backbone.trainer=rloo", "backbone.reward_aggregation=normalize_then_sum")


def test_warm_start_from_an_adapter_starts_from_its_weights(tmp_path):
    """init_adapter: the new run's LoRA weights before its first step equal the saved adapter's (warm start from
    a beta-sweep trial); the manifest records where it started; an adapter of another shape is refused."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    cfg = smoke_cfg(tmp_path, "backbone.steps=1")
    first = tmp_path / "trial"
    train_backbone(cfg, [0.7, 0.3], first, name="t", objectives=toy_objectives(), prompts=PROMPTS)
    saved = load_file(first / "adapter" / "adapter_model.safetensors")

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.weights = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}

    snap = Snapshot()
    m = train_backbone(
        cfg,
        [0.7, 0.3],
        tmp_path / "full",
        name="b0",
        objectives=toy_objectives(),
        prompts=PROMPTS,
        init_adapter=first / "adapter",
        callbacks=[snap],
    )
    assert m["init_adapter"] == str(first / "adapter")
    assert len(snap.weights) == len(saved) > 0
    for key, value in saved.items():  # saved keys have no adapter name: ...q_proj.lora_A.weight
        live = next(v for k, v in snap.weights.items() if k.replace(".default", "") == key)
        assert torch_equal(live, value), key
    other = smoke_cfg(tmp_path, "backbone.steps=1", "lora.r=2")
    with pytest.raises(ValueError, match="init_adapter"):
        train_backbone(
            other, [0.7, 0.3], tmp_path / "bad", name="b", objectives=toy_objectives(), prompts=PROMPTS,
            init_adapter=first / "adapter",
        )  # fmt: skip


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.cpu(), b.cpu()))


def test_resumed_run_trains_on_the_prompts_of_an_uninterrupted_run(tmp_path):
    """6 prompts, 2 per step: an epoch is 3 steps. Resumed from the checkpoint at step 4 (one epoch done, one step
    into the second), the run sees the prompts, samples the completions and ends with the adapter of the
    uninterrupted 7-step run. Before the sampler's epochs were replayed, a resumed run drew the first
    epoch's prompt order again (steps 5-7 trained on other prompts, other adapter)."""
    import hashlib
    import shutil

    from transformers import TrainerCallback

    seen: dict[str, list] = {"a": [], "b": []}
    current = {"run": ""}

    def length(prompts, responses):
        seen[current["run"]].append((list(prompts), list(responses)))
        return np.array([len(r) / 10.0 for r in responses])

    def count_e(prompts, responses):
        return np.array([r.count("e") for r in responses], dtype=float)

    length.name, count_e.name = "length", "count_e"
    resume_at = 4
    prompts = [*PROMPTS, "Name a colour.", "Count to three."]
    cfg = smoke_cfg(tmp_path, "backbone.steps=7", "backbone.checkpoint_every=2")
    a, b = tmp_path / "a", tmp_path / "b"

    class KeepCheckpoint(TrainerCallback):  # the Trainer keeps only its last checkpoints
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == resume_at:
                shutil.copytree(Path(args.output_dir, f"checkpoint-{resume_at}"), tmp_path / "ckpt")

    def train(out, **kw):
        current["run"] = out.name
        objectives = [length, count_e]
        return train_backbone(
            cfg, [0.7, 0.3], out, name=out.name, objectives=objectives, prompts=prompts, quiet=True, **kw
        )

    train(a, callbacks=[KeepCheckpoint()])
    m = train(b, resume_checkpoint=tmp_path / "ckpt")
    assert m["resumed_from_step"] == resume_at and len(seen["a"]) == 7
    assert seen["b"] == seen["a"][resume_at:]  # same prompts, same sampled completions, step by step

    def digest(d):
        return hashlib.sha256((d / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()

    assert digest(a) == digest(b)
