"""Explicit value models (Sec 3.4.1 of MAGE (arXiv 2510.03782), Eq. 14-16): one per objective, trained on rollouts.

Model: the base policy + LoRA (``value.lora_r``, ``value.lora_alpha``, on ``lora.target_modules`` like the
backbones) + a linear head W [V, H], b [V] on the final normalised hidden state h_t [H]. One forward gives
V(x, y<t) = W h_t + b, a |V|-vector scoring every candidate next token; V(x, y<t)[y] estimates the final
reward after emitting y. Training only needs the row of the token actually emitted, so the loss gathers
W[y_t] instead of computing the full [B, L, V] tensor.

Loss (Eq. 16), for a response y of length T to prompt x, with bandit reward r(x, y) (Eq. 14: zero reward
until the terminal step) so the value target at every step is the final reward (Eq. 15):

    L_V(x, y) = 0.5 * sum_{t=1..T} (V(x, y<t)[y_t] - r(x, y))^2,  averaged over the sequences of a batch.

The hidden state at the position of the token *before* y_t (the last prompt token for t = 1) predicts
V[y_t]. Departures from the paper, and why:

* Targets are z-scored per objective, r~ = (r - reward_mean) / reward_std, with mean and std from the
  training rollouts (stored in the manifest). Rewards of different objectives live on different scales
  (a cosine similarity vs. a sentiment score); after z-scoring a value of 1 means "one standard deviation
  better" for every objective, so the guidance strength gamma of Eq. 25 means the same across objectives
  and merged value models (Eq. 17) mix comparable quantities.
* The head starts at zero (weight and bias), i.e. at the constant prediction 0 = the training mean of the
  z-scored target; LoRA B starts at zero as usual, so step 1 only moves the head.
* "Validation accuracy" (Sec 6.2, Fig. 12) is not defined in the paper. We report pairwise ranking
  accuracy: over pairs of held-out responses to the same prompt whose rewards differ, the fraction the
  value model orders like the reward, using its score at the final response position
  V(x, y<T)[y_T] (the value of the complete response). Score ties count one half. For reference, the
  paper's value models reach about 80% validation accuracy (Helpful, Harmless, Humor) within a few
  thousand steps; Faithful converges more slowly (Sec 6.2).

Validation holds out ``value.val_fraction`` of the *prompts* (all responses of a held-out prompt are held
out), so ranking pairs and MSE are measured on unseen prompts. ``val_mse`` is the token-averaged
(V[y_t] - r~)^2 on those rows; the manifest also records two constant baselines: predicting the training
mean (``val_mse_constant``) and the best constant in hindsight (``val_mse_best_constant``, the
token-weighted variance of the validation targets).

:func:`train_value_model` is the plain function; :func:`train_value_model_ray` runs it as a Ray Train
``TorchTrainer`` (``value.num_workers`` data-parallel workers, checkpoints + resume), and
:func:`train_value_models` trains one per objective, the pending ones concurrently as Tune trials.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from mage_ray.config import Config
from mage_ray.manifest import is_complete, join, publish_dir, read_manifest, scratch_dir, write_manifest
from mage_ray.train.offline import OfflineSettings, Trainable, fit_steps, lora_config, prepare
from mage_ray.train.preference_data import collate_sequences
from mage_ray.train.ray_shell import (
    Scaling,
    TrainContext,
    run_and_publish,
    run_pending,
    step_worker,
    storage_abs,
)
from mage_ray.value_model import ADAPTER_DIR, HEAD_FILE, save_value_head, token_values

# ---------------------------------------------------------------------------------------------
# Loss and metrics (pure tensor / numpy functions)


def value_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 16 averaged over the batch: mean_b 0.5 * sum_t mask[b,t] * (values[b,t] - targets[b])^2.

    values [B, L] = V(x, y<t)[y_t] at each position, targets [B] = (z-scored) r(x, y), mask [B, L] = 1 on
    the positions that predict a response token.
    """
    sq = (values - targets[:, None]) ** 2 * mask  # [B, L]
    return 0.5 * sq.sum(dim=1).mean()


def ranking_counts(
    scores: Sequence[float], rewards: Sequence[float], groups: Sequence[Any]
) -> tuple[int, int, int]:
    """(wins, ties, pairs) over the same-group pairs with different rewards: a pair (a, b) wins when
    (s_a - s_b)(r_a - r_b) > 0 and ties when s_a == s_b."""
    s, r = np.asarray(scores, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    total, wins, ties = 0, 0, 0
    for idx in by_group.values():
        for x in range(len(idx)):
            for y in range(x + 1, len(idx)):
                a, b = idx[x], idx[y]
                if r[a] == r[b]:
                    continue
                total += 1
                wins += int((s[a] - s[b]) * (r[a] - r[b]) > 0)
                ties += int(s[a] == s[b])
    return wins, ties, total


def ranking_accuracy(
    scores: Sequence[float], rewards: Sequence[float], groups: Sequence[Any]
) -> float | None:
    """Fraction of same-group pairs with different rewards that ``scores`` order like ``rewards``.

    A pair (a, b) counts 1 when (s_a - s_b)(r_a - r_b) > 0, 0.5 when s_a == s_b, else 0. Returns None
    when there is no such pair.
    """
    wins, ties, total = ranking_counts(scores, rewards, groups)
    return (wins + 0.5 * ties) / total if total else None


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class ValueExample:
    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    """Raw reward r(x, y)."""
    target: float = 0.0
    """Z-scored reward (r - mean) / std, filled in by :func:`load_value_data`."""


def load_value_data(
    rollouts_path: str, objective: str, *, val_fraction: float, seed: int = 0
) -> tuple[list[ValueExample], list[ValueExample], float, float]:
    """Read rollouts, split by prompt, z-score with training statistics: (train, val, mean, std).

    Rows with an empty response or a non-finite reward are dropped.
    """
    import pyarrow.parquet as pq

    from mage_ray.train.rollouts import BASE_COLUMNS, read_rollouts, rollout_files

    schema_cols = pq.read_schema(rollout_files(rollouts_path)[0]).names
    if objective not in schema_cols:
        others = [c for c in schema_cols if c not in BASE_COLUMNS]
        raise ValueError(
            f"objective {objective!r} is not a column of rollouts {rollouts_path!r}; has {others}"
        )
    table = read_rollouts(rollouts_path, columns=["prompt", "prompt_ids", "response_ids", objective])
    rows = [
        ValueExample(p, list(pi), list(ri), float(r))
        for p, pi, ri, r in zip(*(table.column(c).to_pylist() for c in table.column_names))
        if ri and r is not None and math.isfinite(r)
    ]
    if not rows:
        raise ValueError(f"rollouts {rollouts_path!r} have no usable rows for objective {objective!r}")
    prompts = sorted({e.prompt for e in rows})
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(prompts)))
    if val_fraction > 0 and len(prompts) >= 2:
        n_val = min(max(n_val, 1), len(prompts) - 1)
    held = {prompts[i] for i in rng.permutation(len(prompts))[:n_val]}
    train = [e for e in rows if e.prompt not in held]
    val = [e for e in rows if e.prompt in held]
    rewards = np.array([e.reward for e in train])
    mean, std = float(rewards.mean()), float(rewards.std())
    std = max(std, 1e-6)  # a constant reward gives targets 0, not a division by zero
    for e in rows:
        e.target = (e.reward - mean) / std
    return train, val, mean, std


def collate(
    examples: Sequence[ValueExample], pad_id: int, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded batch (:func:`~mage_ray.train.preference_data.collate_sequences`): input_ids /
    attention_mask / next_ids / mask [B, L], and target [B] (the z-scored rewards)."""
    batch = collate_sequences(
        [e.prompt_ids for e in examples], [e.response_ids for e in examples], pad_id, max_len
    )
    batch["target"] = torch.tensor([e.target for e in examples], dtype=torch.float32)
    return batch


# ---------------------------------------------------------------------------------------------
# Model


class ValueNet(nn.Module):
    """Base policy + LoRA + vocabulary-sized head; ``forward`` returns V(x, y<t)[next token] [B, L]."""

    def __init__(self, policy, lora):
        """``lora``: the PEFT ``LoraConfig`` of the value model's adapter (:func:`~mage_ray.train.offline.lora_config`)."""
        super().__init__()
        from peft import get_peft_model

        self.peft = get_peft_model(policy, lora)
        hidden, vocab = policy.config.hidden_size, policy.config.vocab_size
        self.head = nn.Linear(hidden, vocab)  # W [V, H], b [V]
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [B, L, H] (the decoder stack incl. its final norm, no LM head)."""
        decoder = self.peft.get_base_model().get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids, attention_mask, next_ids) -> torch.Tensor:
        h = self.hidden(input_ids, attention_mask)  # [B, L, H]
        return token_values(h.float(), next_ids, self.head.weight, self.head.bias)  # [B, L]


def build_value_net(cfg: Config, device: str | torch.device = "cpu") -> tuple[ValueNet, Any]:
    """Load the base policy and wrap it: (ValueNet in train mode on ``device``, tokenizer)."""
    from mage_ray.devices import place
    from mage_ray.models import load_policy

    device = place(device, "value model")
    policy, tok = load_policy(cfg.model, cfg.storage.cache_dir, device=device)
    net = ValueNet(policy, lora_config(cfg.lora, r=cfg.value.lora_r, alpha=cfg.value.lora_alpha))
    return net.to(device).train(), tok


@torch.no_grad()
def evaluate_value_net(
    net: ValueNet,
    examples: Sequence[ValueExample],
    pad_id: int,
    *,
    batch_size: int = 16,
    max_len: int | None = None,
) -> dict[str, Any]:
    """Validation metrics (module docstring): val_mse, val_mse_constant, val_mse_best_constant,
    ranking_accuracy, val_accuracy (:func:`mage_ray.uncertainty.pair_accuracy`: the same pairs with their exact
    interval and verdict, chance flagged), n_val_rows, n_val_pairs."""
    from mage_ray.uncertainty import pair_accuracy

    if not examples:
        return {
            "val_mse": None,
            "val_mse_constant": None,
            "val_mse_best_constant": None,
            "ranking_accuracy": None,
            "val_accuracy": pair_accuracy(0, 0, 0),
            "n_val_rows": 0,
            "n_val_pairs": 0,
        }
    was_training = net.training
    net.eval()
    device = net.head.weight.device
    sq, zsq, tok_targets, final = 0.0, 0.0, [], []
    n_tok = 0.0
    for k in range(0, len(examples), batch_size):
        chunk = examples[k : k + batch_size]
        batch = {key: v.to(device) for key, v in collate(chunk, pad_id, max_len).items()}
        v = net(batch["input_ids"], batch["attention_mask"], batch["next_ids"])  # [B, L]
        m, t = batch["mask"], batch["target"]
        sq += float(((v - t[:, None]) ** 2 * m).sum())
        zsq += float((t[:, None] ** 2 * m).sum())
        n_tok += float(m.sum())
        tok_targets += [(float(ti), float(mi)) for ti, mi in zip(t, m.sum(1))]
        last = (m * torch.arange(m.shape[1], device=device)).argmax(dim=1)  # [B] last masked position
        final += v.gather(1, last[:, None]).squeeze(1).tolist()
    net.train(was_training)
    t_arr = np.array([t for t, _ in tok_targets])
    w_arr = np.array([w for _, w in tok_targets])
    best_c = float((t_arr * w_arr).sum() / w_arr.sum())
    groups = [e.prompt for e in examples]
    wins, ties, n_pairs = ranking_counts(final, [e.reward for e in examples], groups)
    return {
        "val_mse": sq / n_tok,
        "val_mse_constant": zsq / n_tok,
        "val_mse_best_constant": float((w_arr * (t_arr - best_c) ** 2).sum() / w_arr.sum()),
        "ranking_accuracy": (wins + 0.5 * ties) / n_pairs if n_pairs else None,
        "val_accuracy": pair_accuracy(wins, ties, n_pairs),
        "n_val_rows": len(examples),
        "n_val_pairs": n_pairs,
    }


# ---------------------------------------------------------------------------------------------
# Training (plain function)


def value_micro_batch_here(cfg: Config, net: ValueNet) -> int | None:
    """Sequences per forward / backward of this worker: with the model on a CUDA device as many as fit
    ``plan.gpu_memory_gib`` (else the device's memory) by :func:`mage_ray.stage_plan.value_micro_batch`; None (the
    whole batch) on CPU (a rehearsal's stand-in included) or for a policy the plan has no shape for."""
    device = net.head.weight.device
    if device.type != "cuda":
        return None
    from mage_ray.memory_plan import shape_from_config
    from mage_ray.stage_plan import gpu_budget, value_micro_batch

    try:
        shape = shape_from_config(net.peft.get_base_model().config.to_dict())
    except KeyError:  # not a Llama-style config
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    return value_micro_batch(cfg, shape, gpu_budget(cfg, total))


def fit_value_net(
    t: Trainable,
    train: Sequence[ValueExample],
    s: OfflineSettings,
    ctx: TrainContext,
    label: str = "value",
    micro_batch: int | None = None,
) -> list[dict[str, float]]:
    """Optimizer steps ``t.start_step .. s.steps - 1`` of Eq. 16 on the LoRA + head (the one offline loop,
    :func:`~mage_ray.train.offline.fit_steps`, without gradient clipping); return per-step metrics, each with
    ``train_token_mse`` = the token-averaged (V[y_t] - r~)^2 of the step's batch (of each micro-batch, averaged
    over them by examples when ``micro_batch`` splits the batch)."""

    def step_loss(idx: list[int], _step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = {
            k: v.to(ctx.device) for k, v in collate([train[i] for i in idx], t.pad_id, s.max_len).items()
        }
        values = t.forward(batch["input_ids"], batch["attention_mask"], batch["next_ids"])  # [b, L]
        loss = value_loss(values, batch["target"], batch["mask"])
        with torch.no_grad():
            sq = (values - batch["target"][:, None]) ** 2 * batch["mask"]  # [b, L]
            return loss, {"train_token_mse": float(sq.sum() / batch["mask"].sum())}

    return fit_steps(
        t, len(train), step_loss, s, ctx, max_grad_norm=None, label=label, micro_batch=micro_batch
    )


def path_name(objective: str) -> str:
    """A file-system-safe name for an objective: itself when it is one (``relevance``), else its characters outside
    ``[A-Za-z0-9._-]`` replaced by ``_`` plus a short hash (``hf:/models/rm@1`` -> ``hf__models_rm_1-<hash>``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", objective)
    if safe == objective:
        return objective
    return f"{safe.strip('_')[:60]}-{hashlib.sha1(objective.encode()).hexdigest()[:8]}"


def value_model_dir(cfg: Config, objective: str) -> str:
    """``<run_dir>/values/<objective>`` (the objective's :func:`path_name`)."""
    return join(cfg.storage.run_dir, "values", path_name(objective))


def save_value_net(net: ValueNet, out_dir: str, manifest: dict[str, Any]) -> str:
    """Write adapter/ + value_head.safetensors + manifest.json atomically (temp dir, then rename/upload)."""
    with scratch_dir("mage-value") as tmp:
        net.peft.save_pretrained(os.path.join(tmp, ADAPTER_DIR), safe_serialization=True)
        save_value_head(os.path.join(tmp, HEAD_FILE), net.head.weight, net.head.bias)
        write_manifest(tmp, manifest)
        return publish_dir(tmp, out_dir)


def train_value_model(
    cfg: Config,
    rollouts_path: str,
    objective_name: str,
    out_dir: str | None = None,
    *,
    steps: int | None = None,
    ctx: TrainContext | None = None,
) -> dict[str, Any] | None:
    """Train the explicit value model of ``objective_name`` and write it to ``out_dir``; return its manifest.

    ``out_dir`` defaults to ``<run_dir>/values/<objective>``; a complete one is returned as is. ``steps``
    overrides ``value.steps``. ``ctx``: the runner (rank, device, DDP wrap, step hook, resume); default a plain
    process on the GPU when ``value.use_gpu`` and one is there. Only rank 0 evaluates and writes (other ranks
    return None).
    """
    out_dir = out_dir or value_model_dir(cfg, objective_name)
    if is_complete(out_dir):
        print(f"[values] {objective_name}: complete model in {out_dir}; not retraining")
        return read_manifest(out_dir)
    s = OfflineSettings.from_value(cfg, steps)
    t0 = time.time()
    ctx = ctx or TrainContext(device="cuda" if cfg.value.use_gpu else "cpu")
    train, val, mean, std = load_value_data(
        rollouts_path, objective_name, val_fraction=cfg.value.val_fraction, seed=cfg.value.seed
    )
    t = prepare(
        partial(build_value_net, cfg),
        seed=s.seed,
        learning_rate=s.learning_rate,
        ctx=ctx,
        checkpointing=cfg.value.activation_checkpointing,
    )
    micro = value_micro_batch_here(cfg, t.model)
    history = fit_value_net(t, train, s, ctx, label=f"value {objective_name}", micro_batch=micro)
    if ctx.rank != 0:
        return None
    net = t.model
    metrics = evaluate_value_net(net, val, t.pad_id, batch_size=s.batch_size, max_len=s.max_len)
    manifest = _manifest(
        cfg, net, objective_name, mean, std, s.steps, len(train), metrics, history, time.time() - t0
    )
    save_value_net(net, out_dir, manifest)
    print(
        f"[values] {objective_name}: {s.steps} steps, val_mse {_fmt(metrics['val_mse'])} "
        f"(constant {_fmt(metrics['val_mse_constant'])}), ranking accuracy {_fmt(metrics['ranking_accuracy'])} "
        f"over {metrics['n_val_pairs']} held-out pairs ({metrics['val_accuracy']['verdict']}) -> {out_dir}"
    )
    return manifest


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _manifest(cfg, net, objective, mean, std, steps, n_train, metrics, history, wall) -> dict[str, Any]:
    step_times = [h["step_time_s"] for h in history]
    return {
        "objective": objective,
        "base_model": cfg.model.name_or_path,
        "vocab_size": int(net.head.weight.shape[0]),
        "hidden_size": int(net.head.weight.shape[1]),
        "reward_mean": mean,
        "reward_std": std,
        "target": "zscore",
        **metrics,
        "steps": steps,
        "batch_size": cfg.value.batch_size,
        "learning_rate": cfg.value.learning_rate,
        "lora_r": cfg.value.lora_r,
        "lora_alpha": cfg.value.lora_alpha,
        "target_modules": list(cfg.lora.target_modules),
        "head_init": "zeros",
        "n_train_rows": n_train,
        "final_train_loss": history[-1]["loss"] if history else None,
        "mean_step_time_s": float(np.mean(step_times)) if step_times else None,
        "wall_time_s": round(wall, 2),
        "status": "complete",
        "complete": True,
    }


# ---------------------------------------------------------------------------------------------
# Ray Train wrapper: one TorchTrainer run per objective, n runs side by side as Tune trials


def train_value_model_ray(
    cfg: Config,
    rollouts_path: str,
    objective: str,
    out_dir: str | None = None,
    *,
    steps: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one value model as a Ray Train run (``value.num_workers`` workers) and publish it to ``out_dir``.

    Ray Train state lives under ``<run_dir>/ray/values--<objective>``; relaunching after a crash resumes
    from the last checkpoint, and a complete ``out_dir`` is not retrained.
    """
    steps = cfg.value.steps if steps is None else int(steps)
    kwargs = {"rollouts_path": storage_abs(rollouts_path), "objective_name": objective, "steps": steps}
    config = {"train_fn": train_value_model, "cfg": cfg, "kwargs": kwargs, "max_steps": steps}
    return run_and_publish(
        step_worker,
        {**config, "checkpoint_every": max(10, steps // 4)},  # a head checkpoint is |V| x H x 3 floats
        out_dir or value_model_dir(cfg, objective),
        cfg=cfg,
        scaling=Scaling.from_value(cfg.value),
        run_name=f"values--{path_name(objective)}",
        label=f"value {objective}",
        field_prefix="value",
        progress=progress,
    )


def train_value_models(
    cfg: Config,
    rollouts_path: str | None = None,
    objectives: Sequence[str] | None = None,
    *,
    use_ray: bool = True,
    steps: int | None = None,
    max_concurrent: int | None = None,
) -> list[dict[str, Any]]:
    """One value model per objective (default ``task.objectives``) into ``<run_dir>/values/<objective>``.

    With ``use_ray`` each is a Ray Train run and pending ones run concurrently as Tune trials (as many as
    the cluster's resources hold, or ``max_concurrent``); without it they train one after the other in
    this process. Complete ones are skipped. Returns the manifests in objective order.
    """
    # absolute: Ray Train workers and Tune trials run in their own working directories
    rollouts_path = storage_abs(rollouts_path or join(cfg.storage.run_dir, "rollouts"))
    objectives = list(objectives) if objectives is not None else list(cfg.task.objectives)
    jobs = [
        {
            "cfg": cfg,
            "rollouts_path": rollouts_path,
            "objective": o,
            "out_dir": value_model_dir(cfg, o),
            "steps": steps,
        }
        for o in objectives
    ]
    if not use_ray:
        for j in jobs:
            if is_complete(j["out_dir"]):
                print(f"[value {j['objective']}] complete, skipping ({j['out_dir']})", flush=True)
            else:
                train_value_model(cfg, rollouts_path, j["objective"], j["out_dir"], steps=steps)
        return [read_manifest(j["out_dir"]) or {} for j in jobs]
    return run_pending(
        train_value_model_ray,
        jobs,
        cfg=cfg,
        scaling=Scaling.from_value(cfg.value),
        experiment="values",
        labels=[f"value {o}" for o in objectives],
        max_concurrent=max_concurrent,
        field_prefix="value",
    )


__all__ = [
    "ValueExample",
    "ValueNet",
    "build_value_net",
    "collate",
    "evaluate_value_net",
    "fit_value_net",
    "load_value_data",
    "ranking_accuracy",
    "ranking_counts",
    "save_value_net",
    "train_value_model",
    "train_value_model_ray",
    "train_value_models",
    "value_loss",
    "value_model_dir",
]
