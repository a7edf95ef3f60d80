"""GenARM's autoregressive reward models (Xu et al., ICLR 2025, arXiv 2410.08193): one LoRA ARM per objective.

An ARM (GenARM's "Autoregressive RM") is a language model pi_r whose reward for a response is the sum of its
token log-probabilities:

    r(x, y) = beta_r * sum_t log pi_r(y_t | x, y_<t)

trained with the Bradley-Terry loss on preference pairs (x, y_w, y_l), with no reference model:

    L(pi_r) = -E log sigmoid(beta_r * (sum_t log pi_r(y_w,t | x, y_w,<t) - sum_t log pi_r(y_l,t | x, y_l,<t)))

At decoding time GenARM samples from pi_base(y_t | .) * pi_r(y_t | .)^gamma (the ``genarm`` / ``genarm-m``
decode methods). With the ARM's reward r = beta_r * log pi_r (what the loss above compares), KL-regularised
decoding at strength beta targets pi_base * exp(r / beta) = pi_base * pi_r^(beta_r / beta): gamma = beta_r / beta,
not 1 / beta_r. beta is a free decoding strength, so gamma is swept (``arm.gammas``); GenARM's public inference
code exposes the same exponent as a free weight alpha (``M_base + alpha * M_arm``). Here pi_r is a plain PEFT LoRA (``arm.lora_r``, ``arm.lora_alpha``,
on ``lora.target_modules``) on the base policy, as GenARM's ``training_trl`` scripts do (r 8, alpha 16).
Equation numbers are not cited; the formulas are those of GenARM's
code (``training_trl/arm_trainer.py``, ``training_openInstruct/open_instruct/arm_utils.py``).

Data and choices (departures from the paper's code, and why):

* ``arm.val_fraction`` of the rollout prompts (:func:`held_out_prompts`, the same for every objective and for
  PARM) are held out: their pairs are not trained on, and the manifest records the ARM's pair accuracy on them
  with its exact interval (``val_accuracy``, :func:`mage_ray.uncertainty.pair_accuracy`; "at chance" when the
  interval holds 0.5) next to the base policy's on the same pairs (``val_accuracy_base``).

* Pairs come from the scored rollouts of the base policy (``value.rollouts_per_prompt`` samples per prompt):
  per prompt, y_w / y_l = the best / worst response under objective i (``preference_data.build_pairs`` with w
  = one-hot(i)), kept only when r_i(y_w) - r_i(y_l) > ``arm.min_margin`` * std_i (std over the usable
  rollouts), so near-ties that carry no preference are not fitted. GenARM trains on human-labelled pairs
  (PKU-SafeRLHF, HH).
* The ARMTrainer of GenARM's (and PARM's) code is TRL's DPO loss without the reference term; it also has a
  target margin ``gamma`` (logits - gamma / beta) and a length normalisation of the log-probs, both off by
  default and both left out here.
* Optimiser: AdamW at a constant ``arm.learning_rate`` with no weight decay, gradients clipped at norm 1, for
  ``arm.steps`` steps (0: ``value.steps``) of ``arm.batch_size`` pairs (0: ``value.batch_size``) — the shared
  offline loop (:mod:`mage_ray.train.offline`). GenARM's scripts use a cosine schedule with 20 warm-up steps,
  weight decay 0.05, LoRA dropout 0.05 (here ``lora.dropout``) and bf16.

:func:`train_arm` is the plain function (one objective); :func:`train_arms` runs one Ray Train run per
objective (concurrently as Tune trials). Outputs: ``<run_dir>/arms/<objective>/`` holding ``adapter/`` (PEFT,
safetensors) + ``manifest.json`` (kind "arm") + ``metrics.jsonl``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from mage_ray.config import Config
from mage_ray.manifest import join
from mage_ray.train import offline
from mage_ray.train.preference_data import (
    PreferencePair,
    build_pairs,
    collate_sequences,
    ensure_rollouts,
    objective_matrix,
    usable_rows,
    zscore_stats,
)
from mage_ray.train.ray_shell import TrainContext, storage_abs
from mage_ray.train.values import path_name
from mage_ray.uncertainty import pair_accuracy

__all__ = [
    "accuracy_text",
    "arm_dir",
    "arm_loss",
    "arm_pairs",
    "arm_settings",
    "build_arm_policy",
    "held_out_prompts",
    "objective_stats",
    "pair_batch",
    "pair_counts",
    "split_pairs",
    "train_arm",
    "train_arms",
]


def arm_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta_r: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """GenARM's Bradley-Terry loss of an ARM (``arm_loss`` of its ``arm_utils.py``), batch mean; no reference.

    chosen_logps / rejected_logps: sum_t log pi_r(y_t | x, y_<t) of y_w / y_l, [B].

        logits = beta_r * (chosen_logps - rejected_logps)        [B]  = r(x, y_w) - r(x, y_l)
        loss   = mean(-log sigmoid(logits))

    Metrics: accuracy (fraction of logits > 0: the ARM ranks y_w above y_l), margin (mean logits).
    """
    if not beta_r > 0:
        raise ValueError(f"beta_r = {beta_r} must be > 0")
    logits = beta_r * (chosen_logps - rejected_logps)  # [B]
    loss = -F.logsigmoid(logits).mean()
    return loss, {
        "accuracy": float((logits.detach() > 0).float().mean()),
        "margin": float(logits.detach().mean()),
    }


def objective_stats(table: pa.Table, objectives: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective (mean, std) over the usable rollouts (non-empty response, finite scores): (n,) each."""
    scores = objective_matrix(table, objectives)  # (N, n)
    ok = usable_rows(table, scores)  # (N,)
    if not ok.any():
        raise ValueError("the scored rollouts have no usable row (non-empty response with finite scores)")
    return zscore_stats(scores[ok])


def arm_pairs(
    table: pa.Table, objectives: Sequence[str], objective_index: int, min_margin_std: float
) -> list[PreferencePair]:
    """Objective i's pairs: per prompt, y_w / y_l = the best / worst response under r_i, kept only when
    r_i(y_w) - r_i(y_l) > min_margin_std * std_i (std_i over the usable rollouts, :func:`objective_stats`)."""
    if not 0 <= objective_index < len(objectives):
        raise ValueError(f"objective_index = {objective_index} must index one of {list(objectives)}")
    _, std = objective_stats(table, objectives)
    weights = np.eye(len(objectives))[objective_index]  # one-hot(i)
    return build_pairs(table, objectives, weights, min_margin=float(min_margin_std * std[objective_index]))


def held_out_prompts(table: pa.Table, fraction: float, seed: int) -> set[str]:
    """The rollout prompts whose pairs are held out of ARM / PARM training: ``round(fraction * P)`` of the P
    distinct prompts (at least 1 and at most P - 1 when fraction > 0 and P >= 2), drawn by
    ``default_rng(seed)`` from the sorted prompts, so every objective's ARM and PARM hold out the same ones."""
    prompts = sorted(set(table.column("prompt").to_pylist()))
    n_val = int(round(fraction * len(prompts)))
    if fraction > 0 and len(prompts) >= 2:
        n_val = min(max(n_val, 1), len(prompts) - 1)
    return {prompts[i] for i in np.random.default_rng(seed).permutation(len(prompts))[:n_val]}


def split_pairs(
    pairs: Sequence[PreferencePair], held: set[str]
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs): a pair is held out when its prompt is in ``held``."""
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


@torch.no_grad()
def pair_counts(
    model, pairs: Sequence[PreferencePair], pad_id: int, max_len: int | None, device: Any, batch_size: int = 8
) -> tuple[int, int, int]:
    """(wins, ties, n): how many pairs ``model`` ranks like the reward, log pi(y_w | x) > log pi(y_l | x)
    (GenARM's ARM reward r = beta_r * log pi; beta_r > 0 does not change the order), and how many it ties.
    Runs in eval mode and restores the model's mode."""
    was = model.training
    model.eval()
    wins = ties = 0
    for k in range(0, len(pairs), batch_size):
        idx = list(range(k, min(k + batch_size, len(pairs))))
        logps = offline.sequence_logps(model, pair_batch(pairs, idx, pad_id, max_len, device))  # [2b]
        chosen, rejected = logps[: len(idx)], logps[len(idx) :]
        wins += int((chosen > rejected).sum())
        ties += int((chosen == rejected).sum())
    model.train(was)
    return wins, ties, len(pairs)


def pair_batch(
    pairs: Sequence[PreferencePair], idx: Sequence[int], pad_id: int, max_len: int | None, device: Any
) -> dict[str, torch.Tensor]:
    """The pairs ``idx`` collated as 2b rows: the b chosen sequences, then the b rejected ones."""
    prompts = [pairs[i].prompt_ids for i in idx] * 2
    responses = [pairs[i].chosen_ids for i in idx] + [pairs[i].rejected_ids for i in idx]
    return {k: v.to(device) for k, v in collate_sequences(prompts, responses, pad_id, max_len).items()}


def arm_settings(cfg: Config, steps: int | None = None) -> offline.OfflineSettings:
    """Steps (``steps``, else ``arm.steps``, else ``value.steps``), pairs per objective and step
    (``arm.batch_size`` or ``value.batch_size``), ``arm.learning_rate``, ``arm.seed``,
    ``model.max_context``."""
    a = cfg.arm
    steps = int(steps) if steps is not None else (a.steps or cfg.value.steps)
    if steps < 1:
        raise ValueError(f"steps = {steps} must be >= 1 (arm.steps, or value.steps when it is 0)")
    return offline.OfflineSettings(
        steps, a.batch_size or cfg.value.batch_size, a.learning_rate, a.seed, cfg.model.max_context
    )


def build_arm_policy(cfg: Config, device: Any = "cpu"):
    """Base policy + a fresh LoRA of rank ``arm.lora_r``, alpha ``arm.lora_alpha`` (``lora.target_modules``,
    ``lora.dropout``) in train mode: (PeftModel, tokenizer)."""
    from peft import get_peft_model

    from mage_ray.models import load_policy

    model, tok = load_policy(cfg.model, cfg.storage.cache_dir, device=device)
    lora = offline.lora_config(cfg.lora, r=cfg.arm.lora_r, alpha=cfg.arm.lora_alpha)
    return get_peft_model(model, lora).train(), tok


def arm_dir(cfg: Config, objective: str) -> str:
    """``<run_dir>/arms/<objective>`` (the objective's ``values.path_name``)."""
    return join(storage_abs(cfg.storage.run_dir), "arms", path_name(objective))


def train_arm(
    cfg: Config,
    out_dir: str,
    *,
    objective: str,
    rollouts_path: str | None = None,
    steps: int | None = None,
    objectives: Sequence[str] | None = None,
    ctx: TrainContext | None = None,
) -> dict[str, Any] | None:
    """Train the ARM of ``objective`` (a LoRA on the base) with :func:`arm_loss` and write it to ``out_dir``.

    Args:
        objective: the objective whose pairs train this ARM (one of ``objectives``).
        rollouts_path: scored rollouts (default ``<run_dir>/rollouts``, generated if missing).
        steps: optimizer steps (default :func:`arm_settings`).
        objectives: objective (column) names (default ``task.objectives``); rows need finite scores for all.
        ctx: runner context (rank, device, DDP wrap, step hook, resume); default a plain process.

    Returns the manifest (rank 0; other ranks return None). ValueError for an unknown objective or rollouts
    with no pair above the margin.
    """
    from mage_ray.train.rollouts import read_rollouts

    t0 = time.time()
    ctx = ctx or TrainContext()
    names = list(objectives) if objectives is not None else list(cfg.task.objectives)
    if objective not in names:
        raise ValueError(f"objective {objective!r} is not one of the objectives {names}")
    i = names.index(objective)
    s = arm_settings(cfg, steps)
    beta_r = cfg.arm.beta_r
    table = read_rollouts(ensure_rollouts(cfg, rollouts_path))
    mean, std = objective_stats(table, names)
    held = held_out_prompts(table, cfg.arm.val_fraction, cfg.arm.seed)
    pairs, val_pairs = split_pairs(arm_pairs(table, names, i, cfg.arm.min_margin), held)
    if not pairs:
        raise ValueError(
            f"rollouts hold no preference pair for objective {objective!r} with a margin above "
            f"arm.min_margin = {cfg.arm.min_margin} std: every prompt needs >= 2 responses with different "
            "scores (value.rollouts_per_prompt >= 2), or lower arm.min_margin"
        )

    t = offline.prepare(
        partial(build_arm_policy, cfg),
        seed=s.seed,
        learning_rate=s.learning_rate,
        ctx=ctx,
        checkpointing=cfg.backbone.activation_checkpointing,
    )

    def step_loss(idx: list[int], step: int):
        logps = offline.sequence_logps(
            t.forward, pair_batch(pairs, idx, t.pad_id, s.max_len, ctx.device)
        )  # [2b]
        return arm_loss(logps[: len(idx)], logps[len(idx) :], beta_r)

    history = offline.fit_steps(t, len(pairs), step_loss, s, ctx, label=f"arm {objective}")
    if ctx.rank != 0:
        return None
    held_out = pair_accuracy(*pair_counts(t.model, val_pairs, t.pad_id, s.max_len, ctx.device, s.batch_size))
    with t.model.disable_adapter():  # the same pairs ranked by the base policy: what the ARM started from
        base = pair_accuracy(*pair_counts(t.model, val_pairs, t.pad_id, s.max_len, ctx.device, s.batch_size))
    manifest = {
        **offline.common_manifest(
            cfg,
            s,
            kind="arm",
            name=path_name(objective),
            objectives=names,
            steps=s.steps,
            history=history,
            t0=t0,
            ctx=ctx,
        ),
        "objective": objective,
        "objective_index": i,
        "beta_r": beta_r,
        "lora_r": cfg.arm.lora_r,
        "lora_alpha": cfg.arm.lora_alpha,
        "min_margin_std": cfg.arm.min_margin,
        "min_margin": float(cfg.arm.min_margin * std[i]),
        "reward_mean": mean.tolist(),
        "reward_std": std.tolist(),
        "n_pairs": len(pairs),
        "n_val_pairs": len(val_pairs),
        "val_fraction": cfg.arm.val_fraction,
        "val_accuracy": held_out,
        "val_accuracy_base": base,
    }
    summary = (
        f"[arm] {objective}: {len(pairs)} pairs, {s.steps} steps; held-out pair accuracy "
        f"{accuracy_text(held_out)} ({held_out['verdict']}; base policy {accuracy_text(base)})"
    )
    return offline.save_policy_artifact(t.model, out_dir, manifest, history, summary=summary, quiet=ctx.quiet)


def accuracy_text(a: dict) -> str:
    """'0.71 [0.52, 0.85] over 24 pairs' of a :func:`mage_ray.uncertainty.pair_accuracy` result."""
    if a["value"] is None:
        return "n/a (no held-out pairs)"
    return f"{a['value']:.2f} [{a['lo']:.2f}, {a['hi']:.2f}] over {a['n_pairs']} pairs"


def train_arms(
    cfg: Config,
    *,
    rollouts_path: str | None = None,
    progress: bool = True,
    max_concurrent: int | None = None,
) -> list[dict[str, Any]]:
    """One ARM per objective of ``task.objectives`` into :func:`arm_dir`, each a Ray Train run (the pending
    ones concurrently as Tune trials, experiment "arms"); complete directories are not retrained. The rollouts
    are generated once up front. Returns the manifests in objective order."""
    rollouts = storage_abs(ensure_rollouts(cfg, rollouts_path))  # absolute: workers may run elsewhere
    total = arm_settings(cfg).steps
    jobs = [
        dict(
            cfg=cfg,
            train_fn=train_arm,
            kwargs={"objective": o, "rollouts_path": rollouts, "steps": total},
            out_dir=arm_dir(cfg, o),
            label=f"arm {o}",
            kind="arm",
            max_steps=total,
            progress=progress,
        )
        for o in cfg.task.objectives
    ]
    return offline.run_lora_jobs(cfg, jobs, experiment="arms", max_concurrent=max_concurrent)
