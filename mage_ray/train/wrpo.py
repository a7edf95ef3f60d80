"""WRPO as a backbone trainer (``backbone.trainer: wrpo``): weighted-reward preference optimisation.

WRPO (Yang et al. 2024, "Weighted-Reward Preference Optimization for Implicit Model Fusion", arXiv 2412.03187) fuses
*source* models into a *target* policy through preference optimisation alone: no vocabulary alignment, no
weight merging, only text is exchanged. For backbone i of Bone Soup the ranking reward is the backbone's
combined reward h_i = w_i^T r (Eq. 11-12 of MAGE (arXiv 2510.03782), w_i = column i of B(beta)), and each training example is
a triple (x, y_ws, y_wt, y_l):

* y_ws: the highest-h_i response to x among all source models' responses;
* y_wt, y_l: the highest- and lowest-h_i of the target policy's own responses (the base / SFT policy's scored
  rollouts, ``<run_dir>/rollouts``).

Loss (WRPO_DPO, Table 5 of WRPO), with the fusion coefficient alpha:

    L = -E log sigmoid( alpha       * beta * log pi_theta(y_ws|x) / pi_ref(y_ws|x)
                      + (1 - alpha) * beta * log pi_theta(y_wt|x) / pi_ref(y_wt|x)
                      -               beta * log pi_theta(y_l|x)  / pi_ref(y_l|x) )

Progressive adaptation (Sec. 3 of the paper, "dynamic" tuning, Fig. 6): alpha grows linearly from 0 at the
first optimizer step to alpha_max (``backbone.wrpo_alpha_max``) at the last,
alpha_t = alpha_max * t / (T - 1), so training starts as plain DPO on the target's own (in-distribution)
pairs and shifts weight to the source responses as the policy moves toward them. pi_ref is the base
policy (the PEFT model with its adapter disabled); beta defaults to ``backbone.kl_coef``.

Sources, in order: ``sources`` given by the caller, else every complete non-WRPO backbone under
``<run_dir>/backbones/*/`` (e.g. GRPO backbones of other betas, Rewarded-Soups beta = 1 backbones) other than
the one being trained, plus ``backbone.wrpo_sources`` (HF ids, local model directories, ``embedded:`` /
``tiny-random:<seed>`` names, or adapter directories). Each source answers every training prompt once
(``samples_per_source``), with the target rollouts' sampling settings; responses are scored by the task
objectives and cached in ``<run_dir>/wrpo/sources/<source>.parquet`` (:mod:`mage_ray.train.wrpo_sources`). A
source with another tokenizer has its text re-tokenised with the target's (WRPO's point: heterogeneous models
need no vocabulary alignment).

Output: the same layout as GRPO backbones, ``<run_dir>/backbones/beta_<beta>/<name>/`` = ``adapter/`` +
``manifest.json`` (kind "backbone", trainer "wrpo", w, beta, objectives, ...) + ``metrics.jsonl``, so Bone
Soup and MAGE build on WRPO backbones unchanged. :func:`train_wrpo_backbone` is the plain function;
:func:`train_wrpo_backbones` trains the n backbones of B(beta) as concurrent Ray Train runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mage_ray.config import Config
from mage_ray.manifest import is_complete, read_manifest
from mage_ray.train import offline
from mage_ray.train.preference_data import (
    PreferenceTriple,
    build_triples,
    collate_sequences,
    ensure_rollouts,
)
from mage_ray.train.ray_shell import TrainContext, storage_abs
from mage_ray.train.wrpo_sources import NO_SOURCES, discover_sources, source_tables

__all__ = [
    "train_wrpo_backbone",
    "train_wrpo_backbones",
    "wrpo_alpha",
    "wrpo_loss",
]


# ---------------------------------------------------------------------------------------------
# Loss and schedule


def wrpo_alpha(step: int, total_steps: int, alpha_max: float) -> float:
    """Progressive fusion coefficient alpha_t = alpha_max * t / (T - 1), step t in 0..T-1 (0 when T = 1)."""
    if total_steps < 1 or not 0 <= step < total_steps:
        raise ValueError(f"step = {step} must lie in [0, total_steps = {total_steps})")
    return float(alpha_max) * step / max(total_steps - 1, 1)


def wrpo_loss(
    policy_source: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_source: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """WRPO_DPO loss (WRPO, Table 5), averaged over the batch. All inputs are log pi(y | x), [B].

        logits = alpha * beta (ps - rs) + (1 - alpha) * beta (pc - rc) - beta (pr - rr)        [B]
        loss   = mean(-log sigmoid(logits))

    Metrics: margin (mean logits), accuracy (logits > 0), source_reward / target_reward (mean implicit rewards
    beta log pi/pi_ref of y_ws and y_wt, minus that of y_l).
    """
    r_s = beta * (policy_source - ref_source)  # [B]
    r_c = beta * (policy_chosen - ref_chosen)  # [B]
    r_l = beta * (policy_rejected - ref_rejected)  # [B]
    logits = alpha * r_s + (1.0 - alpha) * r_c - r_l  # [B]
    loss = -F.logsigmoid(logits).mean()
    return loss, {
        "margin": float(logits.detach().mean()),
        "accuracy": float((logits.detach() > 0).float().mean()),
        "source_reward": float((r_s - r_l).detach().mean()),
        "target_reward": float((r_c - r_l).detach().mean()),
    }


# ---------------------------------------------------------------------------------------------
# Training: one backbone (plain function), n backbones (Ray)


def train_wrpo_backbone(
    cfg: Config,
    out_dir: str,
    *,
    w: Sequence[float],
    name: str,
    sources: Mapping[str, str],
    rollouts_path: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    alpha_max: float | None = None,
    beta: float | None = None,
    objectives: Sequence[str] | None = None,
    extra_manifest: dict[str, Any] | None = None,
    ctx: TrainContext | None = None,
) -> dict[str, Any] | None:
    """Train one WRPO backbone on h = w^T r from ``sources`` ({label: scored Parquet}) and target rollouts.

    Args:
        w: reward weights (column of B(beta), Eq. 12), on the simplex.
        name: backbone name (``b0``, ...), recorded in the manifest.
        sources: source responses (:func:`source_tables`), token ids in the target tokenizer.
        rollouts_path: the target policy's scored rollouts (default ``<run_dir>/rollouts``; >= 2 per prompt).
        steps / batch_size: optimizer steps and triples per step (defaults: :class:`OfflineSettings`).
        alpha_max: final fusion coefficient (default ``backbone.wrpo_alpha_max``).
        beta: DPO temperature (default ``backbone.kl_coef``).
        objectives: objective (column) names (default ``task.objectives``).

    Returns the manifest on rank 0 (others None). Raises RewardWeightsError for a bad ``w`` and ValueError
    when there are no sources or no usable triple.
    """
    from mage_ray.train.rollouts import read_rollouts
    from mage_ray.train.stage1 import validate_reward_weights

    t0 = time.time()
    ctx = ctx or TrainContext()
    names = list(objectives) if objectives is not None else list(cfg.task.objectives)
    w_arr = validate_reward_weights(w, len(names))
    alpha_max = cfg.backbone.wrpo_alpha_max if alpha_max is None else float(alpha_max)
    if not 0.0 <= alpha_max <= 1.0:
        raise ValueError(f"alpha_max = {alpha_max} must lie in [0, 1] (backbone.wrpo_alpha_max)")
    beta = cfg.backbone.kl_coef if beta is None else float(beta)
    if not beta > 0:
        raise ValueError(f"beta = {beta} must be > 0 (WRPO's KL coefficient; backbone.kl_coef by default)")
    if not sources:
        raise ValueError(NO_SOURCES)
    s = offline.OfflineSettings.from_config(cfg, steps, batch_size)
    target = read_rollouts(ensure_rollouts(cfg, rollouts_path))
    tables = {label: read_rollouts(path) for label, path in sources.items()}
    triples: list[PreferenceTriple] = build_triples(target, tables, names, w_arr)
    if not triples:
        raise ValueError(
            "no WRPO triple: every prompt needs a source response and >= 2 target responses with different "
            "h = w^T r (value.rollouts_per_prompt >= 2)"
        )

    t = offline.prepare(
        partial(offline.build_lora_policy, cfg),
        seed=s.seed,
        learning_rate=s.learning_rate,
        ctx=ctx,
        checkpointing=cfg.backbone.activation_checkpointing,
    )

    def batch_of(idx: list[int]) -> dict[str, torch.Tensor]:
        prompts = [triples[i].prompt_ids for i in idx] * 3
        responses = (
            [triples[i].source_ids for i in idx]
            + [triples[i].chosen_ids for i in idx]
            + [triples[i].rejected_ids for i in idx]
        )
        return {
            k: v.to(ctx.device) for k, v in collate_sequences(prompts, responses, t.pad_id, s.max_len).items()
        }

    refs = offline.ReferenceCache(t.model, batch_of, 3)

    def step_loss(idx: list[int], step: int):
        ref = refs(idx, ctx.device)  # [b, 3]: source, chosen, rejected
        logps = offline.sequence_logps(t.forward, batch_of(idx))  # [3b]
        b = len(idx)
        alpha = wrpo_alpha(step, s.steps, alpha_max)
        loss, m = wrpo_loss(
            logps[:b], logps[b : 2 * b], logps[2 * b :], ref[:, 0], ref[:, 1], ref[:, 2], alpha, beta
        )
        return loss, {**m, "alpha": alpha}

    history = offline.fit_steps(t, len(triples), step_loss, s, ctx)
    if ctx.rank != 0:
        return None
    wins = np.mean([x.h_source > x.h_chosen for x in triples])
    manifest = {
        **offline.common_manifest(
            cfg,
            s,
            kind="backbone",
            name=name,
            objectives=names,
            steps=s.steps,
            history=history,
            t0=t0,
            ctx=ctx,
        ),
        "trainer": "wrpo",
        "w": w_arr.tolist(),
        "beta": cfg.backbone.beta,
        "kl_coef": beta,
        "dpo_beta": beta,
        "wrpo_alpha_max": alpha_max,
        "alpha_schedule": "linear 0 -> alpha_max over the optimizer steps",
        "sources": list(sources),
        "n_triples": len(triples),
        "source_win_rate": float(wins),
        "source_counts": {k: sum(x.source == k for x in triples) for k in sources},
        "backbone_config": dataclasses.asdict(cfg.backbone),
        **(extra_manifest or {}),
    }
    summary = f"[wrpo] {name}: w={np.round(w_arr, 4).tolist()} {len(triples)} triples, {s.steps} steps"
    return offline.save_policy_artifact(t.model, out_dir, manifest, history, summary=summary, quiet=ctx.quiet)


def train_wrpo_backbones(
    cfg: Config,
    *,
    beta: float | None = None,
    steps: int | None = None,
    names: Sequence[str] | None = None,
    weights: Sequence[Sequence[float]] | None = None,
    sources: Sequence[str] | None = None,
    rollouts_path: str | None = None,
    objectives: Sequence[Any] | None = None,
    samples_per_source: int = 1,
    max_concurrent: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train the n WRPO backbones of B(beta) (backbone i on h_i = w_i^T r, w_i = column i) as concurrent Ray
    Train runs into ``<run_dir>/backbones/beta_<beta>/<name>/``; return their manifests (GRPO's layout).

    ``sources`` (model specs / adapter dirs) default to :func:`discover_sources`. The target rollouts
    (``<run_dir>/rollouts``) and the source responses are produced once, up front. ``objectives``: objective
    callables for scoring source responses (default ``load_objectives(task)``). Complete backbones are
    skipped.
    """
    from mage_ray.train.rollouts import read_rollouts
    from mage_ray.train.stage1 import backbone_dir, backbone_plan, prepare_sft_base

    cfg = prepare_sft_base(cfg)
    beta, ws, names = backbone_plan(cfg, beta, weights, names, objectives)
    dirs = [backbone_dir(cfg, beta, nm) for nm in names]
    total = cfg.backbone.steps if steps is None else int(steps)
    if all(is_complete(d) for d in dirs):
        return [read_manifest(d) or {} for d in dirs]
    specs = list(sources) if sources is not None else discover_sources(cfg, exclude=dirs)
    if not specs:
        raise ValueError(NO_SOURCES)
    rollouts = storage_abs(ensure_rollouts(cfg, rollouts_path))
    prompts = list(dict.fromkeys(read_rollouts(rollouts, columns=["prompt"]).column("prompt").to_pylist()))
    tables = source_tables(cfg, specs, prompts, objectives=objectives, samples_per_source=samples_per_source)
    obj_names = [o.name for o in objectives] if objectives is not None else None
    jobs = []
    for i, (w, nm, d) in enumerate(zip(ws, names, dirs)):
        kwargs = {
            "w": w.tolist(),
            "name": nm,
            "sources": tables,
            "rollouts_path": rollouts,
            "steps": total,
            "objectives": obj_names,
            "extra_manifest": {"index": i, "beta": beta},
        }
        jobs.append(
            dict(
                cfg=cfg,
                train_fn=train_wrpo_backbone,
                kwargs=kwargs,
                out_dir=d,
                label=f"wrpo {nm}",
                kind="wrpo",
                max_steps=total,
                progress=progress,
            )
        )
    return offline.run_lora_jobs(cfg, jobs, experiment=f"wrpo-beta_{beta:.4g}", max_concurrent=max_concurrent)
