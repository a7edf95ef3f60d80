"""PARM: one preference-aware autoregressive reward model for all objectives (Lin et al., ICML 2025, arXiv
2505.06274), trained as PARM's ``code/training/pref_arm_trainer.py`` does.

The ARM of GenARM (:mod:`mage_ray.train.arm`) becomes preference-conditioned: the base policy carries one
PBLoRA (:mod:`mage_ray.pblora`: dW(mu) = s (B1 W1 A1 + B2 (sum_k mu_k W2[k]) A2)), so pi_r(. | mu) is one
model for every preference mu on the simplex. Each optimizer step (``PrefARMTrainer.get_batch_loss_metrics``):

    mu ~ Dirichlet(pref_sample_p * 1_n)                                       one preference per step
    L_i(mu) = mean_b -log sigmoid(beta_r * (log pi_r(y_w^b | x^b, mu) - log pi_r(y_l^b | x^b, mu)))
    L(mu)   = sum_i mu_i L_i(mu)                                              (b: objective i's pairs)

with log pi_r(y | x, mu) = sum_t log pi_r(y_t | x, y_<t, mu) (:func:`mage_ray.train.arm.arm_loss` per
objective). At decoding time ``parm`` samples from pi_base * pi_r(. | mu)^gamma (gamma = beta_r / beta for a KL
strength beta, as for GenARM's ARMs: a free decoding strength, swept; not 1 / beta_r);
:func:`mage_ray.pblora.pblora_components` turns the PBLoRA into n + 1 LoRAs mixed per row with (1, mu).
Equation numbers are not cited; the formulas are those of PARM's
code.

Departures from PARM's code, and why:

* The ARMs' held-out prompts (``arm.val_fraction``, :func:`mage_ray.train.arm.held_out_prompts`) are held out
  of PARM's pairs too; the manifest records each objective's held-out pair accuracy at its own vertex
  (``val_accuracy``, with its exact interval) and at the other vertices (``val_accuracy_other_vertex``).
* ``arm.parm_steps`` / ``arm.parm_learning_rate`` give PARM its own budget (0: the ARMs').

* Data: PARM's pairs (PKU-SafeRLHF) carry a label for every objective, so every objective's loss uses the same
  batch. Ours are built per objective from the scored rollouts (best / worst response per prompt under
  objective i, margin above ``arm.min_margin`` std, :func:`mage_ray.train.arm.arm_pairs`), so each objective's
  loss uses ``arm.batch_size`` of its own pairs (``offline.batch_indices`` on objective i's pair list); all n
  objectives' sequences go through one forward per step.
* One ``arm.beta_r`` for every objective (PARM's run.sh sets beta_safe = beta_help = 0.01 separately).
* mu is drawn from ``numpy.random.default_rng([arm.seed, step])`` (PARM: scipy's global state), so a resumed
  run sees the same preferences as an uninterrupted one.
* Optimiser: the shared offline loop (AdamW, constant ``arm.learning_rate``, no weight decay, gradients
  clipped at 1; PARM: cosine schedule, 20 warm-up steps, weight decay 0.05, bf16); no LoRA dropout (PARM:
  0.05).

:func:`train_parm` is the plain function; :func:`train_parm_ray` runs it as one Ray Train run. Output
``<run_dir>/parm/``: ``pblora/`` (:func:`mage_ray.pblora.save_pblora`) + ``manifest.json`` (kind "parm",
adapter "pblora") + ``metrics.jsonl``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from mage_ray.config import Config
from mage_ray.manifest import join
from mage_ray.pblora import apply_pblora, save_pblora, set_preference
from mage_ray.train import offline
from mage_ray.train.arm import (
    accuracy_text,
    arm_loss,
    arm_pairs,
    arm_settings,
    held_out_prompts,
    objective_stats,
    pair_counts,
    split_pairs,
)
from mage_ray.train.preference_data import collate_sequences, ensure_rollouts
from mage_ray.train.ray_shell import TrainContext, storage_abs
from mage_ray.uncertainty import pair_accuracy

__all__ = [
    "build_pblora_policy",
    "parm_dir",
    "parm_loss",
    "parm_settings",
    "sample_preference",
    "train_parm",
    "train_parm_ray",
]


def parm_loss(
    chosen_logps: Sequence[torch.Tensor],
    rejected_logps: Sequence[torch.Tensor],
    mu: Sequence[float],
    beta_r: float,
    objectives: Sequence[str] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PARM's preference-weighted loss: L = sum_i mu_i L_i, L_i = :func:`arm_loss` of objective i's pairs.

    chosen_logps[i] / rejected_logps[i]: log pi_r(y | x, mu) of objective i's y_w / y_l, [B_i]. mu: [n].
    Metrics: loss/<obj>, accuracy/<obj>, margin/<obj>, mu/<obj> per objective; accuracy and margin averaged
    over the objectives.
    """
    n = len(mu)
    if len(chosen_logps) != n or len(rejected_logps) != n:
        raise ValueError(
            f"need one chosen and one rejected batch per objective ({n}), got "
            f"{len(chosen_logps)} and {len(rejected_logps)}"
        )
    names = list(objectives) if objectives is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"objectives names {len(names)} objectives, mu has {n} weights")
    total = chosen_logps[0].new_zeros(())
    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        loss_i, m_i = arm_loss(chosen_logps[i], rejected_logps[i], beta_r)
        total = total + float(mu[i]) * loss_i  # sum_i mu_i L_i
        metrics.update({f"loss/{name}": float(loss_i.detach()), f"mu/{name}": float(mu[i])})
        metrics.update({f"{k}/{name}": v for k, v in m_i.items()})
    metrics["accuracy"] = float(np.mean([metrics[f"accuracy/{o}"] for o in names]))
    metrics["margin"] = float(np.mean([metrics[f"margin/{o}"] for o in names]))
    return total, metrics


def sample_preference(seed: int, step: int, n: int, concentration: float) -> np.ndarray:
    """mu ~ Dirichlet(concentration * 1_n) from ``default_rng([seed, step])``: the same mu for every rank and
    on resume. (n,) float64."""
    return np.random.default_rng([seed, step]).dirichlet(np.full(n, float(concentration)))


def parm_settings(cfg: Config, steps: int | None = None) -> offline.OfflineSettings:
    """The ARMs' settings (:func:`mage_ray.train.arm.arm_settings`) with PARM's own ``arm.parm_steps`` and
    ``arm.parm_learning_rate`` where they are set (> 0); ``steps`` overrides both."""
    a = cfg.arm
    s = arm_settings(cfg, steps if steps is not None else (a.parm_steps or None))
    lr = a.parm_learning_rate or s.learning_rate
    return offline.OfflineSettings(s.steps, s.batch_size, lr, s.seed, s.max_len)


def held_out_accuracy(model, pairs, names, pad_id, max_len, device, batch_size) -> tuple[dict, dict]:
    """PARM's held-out pair accuracy per objective: objective i's held-out pairs ranked by pi_r(. | e_i) (its own
    vertex; :func:`mage_ray.uncertainty.pair_accuracy`), and by pi_r(. | e_j) at the other vertices (mean over
    j != i, the value only): a PARM whose preference-dependent part learned nothing ranks them alike."""
    n = len(names)
    own, other = {}, {}
    for i, o in enumerate(names):
        set_preference(model, np.eye(n)[i])
        own[o] = pair_accuracy(*pair_counts(model, pairs[i], pad_id, max_len, device, batch_size))
        vals = []
        for j in range(n):
            if j != i and pairs[i]:
                set_preference(model, np.eye(n)[j])
                w, t, m = pair_counts(model, pairs[i], pad_id, max_len, device, batch_size)
                vals.append((w + 0.5 * t) / m)
        other[o] = float(np.mean(vals)) if vals else None
    return own, other


def build_pblora_policy(cfg: Config, n: int, device: Any = "cpu"):
    """Base policy + a fresh PBLoRA (``arm.r1``, ``arm.r2``, ``arm.pblora_alpha``, on ``lora.target_modules``)
    for n objectives, everything else frozen, in train mode: (model, tokenizer)."""
    from mage_ray.models import load_policy

    model, tok = load_policy(cfg.model, cfg.storage.cache_dir, device=device)
    a = cfg.arm
    apply_pblora(model, list(cfg.lora.target_modules), a.r1, a.r2, n, a.pblora_alpha)
    return model.train(), tok


def parm_dir(cfg: Config) -> str:
    """``<run_dir>/parm``."""
    return join(storage_abs(cfg.storage.run_dir), "parm")


def train_parm(
    cfg: Config,
    out_dir: str,
    *,
    rollouts_path: str | None = None,
    steps: int | None = None,
    objectives: Sequence[str] | None = None,
    ctx: TrainContext | None = None,
) -> dict[str, Any] | None:
    """Train PARM's PBLoRA ARM on every objective's pairs and write it to ``out_dir``.

    Args:
        rollouts_path: scored rollouts (default ``<run_dir>/rollouts``, generated if missing).
        steps: optimizer steps (default :func:`mage_ray.train.arm.arm_settings`).
        objectives: objective (column) names (default ``task.objectives``).
        ctx: runner context (rank, device, DDP wrap, step hook, resume); default a plain process.

    Returns the manifest (rank 0; other ranks return None). ValueError when an objective has no pair above the
    margin.
    """
    from mage_ray.train.rollouts import read_rollouts

    t0 = time.time()
    ctx = ctx or TrainContext()
    names = list(objectives) if objectives is not None else list(cfg.task.objectives)
    n, a = len(names), cfg.arm
    s = parm_settings(cfg, steps)
    table = read_rollouts(ensure_rollouts(cfg, rollouts_path))
    mean, std = objective_stats(table, names)
    held = held_out_prompts(table, a.val_fraction, a.seed)  # the ARMs' held-out prompts
    split = [split_pairs(arm_pairs(table, names, i, a.min_margin), held) for i in range(n)]
    pairs, val_pairs = [tr for tr, _ in split], [va for _, va in split]
    empty = [names[i] for i in range(n) if not pairs[i]]
    if empty:
        raise ValueError(
            f"rollouts hold no preference pair for objective(s) {empty} with a margin above arm.min_margin = "
            f"{a.min_margin} std: every prompt needs >= 2 responses with different scores "
            "(value.rollouts_per_prompt >= 2), or lower arm.min_margin"
        )

    t = offline.prepare(
        partial(build_pblora_policy, cfg, n),
        seed=s.seed,
        learning_rate=s.learning_rate,
        ctx=ctx,
        checkpointing=cfg.backbone.activation_checkpointing,
    )

    def step_loss(_idx: list[int], step: int):
        mu = sample_preference(s.seed, step, n, a.pref_sample_p)  # [n]
        set_preference(t.model, mu)
        # objective i's own batch of pairs; all objectives' 2 b_i sequences in one forward
        idx = [
            offline.batch_indices(step, len(p), s.batch_size, s.seed, ctx.rank, ctx.world_size) for p in pairs
        ]
        prompts, responses = [], []
        for p, ix in zip(pairs, idx):
            prompts += [p[j].prompt_ids for j in ix] * 2
            responses += [p[j].chosen_ids for j in ix] + [p[j].rejected_ids for j in ix]
        batch = collate_sequences(prompts, responses, t.pad_id, s.max_len)
        logps = offline.sequence_logps(
            t.forward, {k: v.to(ctx.device) for k, v in batch.items()}
        )  # [sum 2 b_i]
        blocks = logps.split([2 * len(ix) for ix in idx])  # per objective: [2 b_i] = chosen, rejected
        chosen = [blk[: len(ix)] for blk, ix in zip(blocks, idx)]
        rejected = [blk[len(ix) :] for blk, ix in zip(blocks, idx)]
        return parm_loss(chosen, rejected, mu, a.beta_r, names)

    # fit_steps' own example indices are unused: each objective draws its batch from its own pair list
    history = offline.fit_steps(t, max(len(p) for p in pairs), step_loss, s, ctx, label="parm")
    if ctx.rank != 0:
        return None
    own, other = held_out_accuracy(t.model, val_pairs, names, t.pad_id, s.max_len, ctx.device, s.batch_size)
    manifest = {
        **offline.common_manifest(
            cfg, s, kind="parm", name="parm", objectives=names, steps=s.steps, history=history, t0=t0, ctx=ctx
        ),
        "adapter": "pblora",
        "beta_r": a.beta_r,
        "r1": a.r1,
        "r2": a.r2,
        "pblora_alpha": a.pblora_alpha,
        "pblora_scaling": a.pblora_alpha / a.r2,
        "target_modules": list(cfg.lora.target_modules),
        "pref_sample_p": a.pref_sample_p,
        "min_margin_std": a.min_margin,
        "reward_mean": mean.tolist(),
        "reward_std": std.tolist(),
        "n_pairs": {o: len(p) for o, p in zip(names, pairs)},
        "n_val_pairs": {o: len(p) for o, p in zip(names, val_pairs)},
        "val_fraction": a.val_fraction,
        "val_accuracy": own,
        "val_accuracy_other_vertex": other,
    }

    def save_model(tmp: str) -> None:
        extra = {"kind": "parm", "beta_r": a.beta_r}
        save_pblora(
            t.model, join(tmp, "pblora"), objectives=names, base_model=cfg.model.name_or_path, extra=extra
        )

    summary = (
        f"[parm] {n} objectives, pairs {manifest['n_pairs']}, {s.steps} steps, lr {s.learning_rate:g}; "
        + ("; ".join(f"{o} held-out {accuracy_text(own[o])} ({own[o]['verdict']})" for o in names))
    )
    return offline.save_policy_artifact(
        t.model, out_dir, manifest, history, summary=summary, quiet=ctx.quiet, save_model=save_model
    )


def train_parm_ray(cfg: Config, *, rollouts_path: str | None = None, progress: bool = True) -> dict[str, Any]:
    """PARM as one Ray Train run (experiment "parm"), published to :func:`parm_dir`; a complete one is
    returned as is. The rollouts are generated up front."""
    rollouts = storage_abs(ensure_rollouts(cfg, rollouts_path))  # absolute: workers may run elsewhere
    total = parm_settings(cfg).steps
    job = dict(
        cfg=cfg,
        train_fn=train_parm,
        kwargs={"rollouts_path": rollouts, "steps": total},
        out_dir=parm_dir(cfg),
        label="parm",
        kind="parm",
        max_steps=total,
        progress=progress,
    )
    return offline.run_lora_jobs(cfg, [job], experiment="parm")[0]
