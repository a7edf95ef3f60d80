"""MODPO baseline (Multi-Objective Direct Preference Optimization, Zhou et al. 2024): one LoRA per preference.

For a preference w on the simplex, MODPO trains pi_theta on preference pairs (x, y_w, y_l) of one objective k
(the *pivot*) with the other objectives entering as a margin (Zhou et al. 2024, Eq. 8):

    L(theta) = -E log sigmoid( (1 / w_k) * ( beta * log pi_theta(y_w|x) / pi_ref(y_w|x)
                                            - beta * log pi_theta(y_l|x) / pi_ref(y_l|x)
                                            - w_{-k}^T (r_{-k}(x, y_w) - r_{-k}(x, y_l)) ) )

whose optimum is the KL-regularised optimum of w^T r: the pivot reward is implicit,
r_k = (1 / w_k)(beta log pi_theta / pi_ref - w_{-k}^T r_{-k}) + const. pi_ref is the base (SFT) policy = the
PEFT model with the adapter disabled.

Data and choices (departures from the paper, and why):

* Pairs come from the scored rollouts of the base policy (``value.rollouts_per_prompt`` samples per prompt):
  per prompt, y_w / y_l = the best / worst response under the pivot objective (``preference_data.build_pairs``
  with w = one-hot(k)). The paper uses human preference pairs for r_k and trained reward models for r_{-k};
  here every objective is an explicit score, so any objective can be the pivot.
* The pivot defaults to k = argmax_i w_i (first on ties, so objective 0 for (0.5, 0.5)). MODPO divides by
  w_k, so a fixed pivot k = 0 is undefined at grid points with w_0 = 0 (e.g. (0, 1)); choosing the largest
  weight keeps 1 / w_k <= n and covers the whole grid. Passing ``pivot=0`` reproduces the paper's fixed
  pivot; grid points with w_pivot = 0 are then skipped with a message (never an epsilon: 1 / eps would blow
  the logits up).
* The margin rewards r_{-k} are z-scored per objective with the rollouts' mean and std (stored in the
  manifest): raw objectives live on different scales, and the margin competes with beta * log-ratios.
* beta defaults to ``backbone.kl_coef`` (the KL coefficient of the backbones: the same role).

:func:`train_modpo` is the plain function (one preference); :func:`train_modpo_ray` runs it as a Ray Train
run and :func:`train_modpo_grid` trains a whole preference grid concurrently (Tune trials). Outputs:
``<run_dir>/modpo/mu_<w_1>-<w_2>.../`` holding ``adapter/`` + ``manifest.json`` (kind "modpo", preference) +
``metrics.jsonl`` — the bundle's ``modpo: [{preference, adapter}]`` entries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
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
    zscore_stats,
)
from mage_ray.train.ray_shell import TrainContext, storage_abs

__all__ = ["modpo_dir", "modpo_loss", "pivot_of", "train_modpo", "train_modpo_grid", "train_modpo_ray"]


def modpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    margin_chosen: torch.Tensor,
    margin_rejected: torch.Tensor,
    w_pivot: float,
    w_rest: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MODPO loss (Zhou et al. 2024, Eq. 8), averaged over the batch.

    policy_* / ref_*: log pi(y | x) of chosen / rejected under pi_theta / pi_ref, [B]. margin_*: the other
    objectives' (normalised) scores r_{-k}, [B, n-1]. w_pivot: w_k > 0; w_rest: w_{-k}, [n-1].

        logits = (beta (pc - rc) - beta (pr - rr) - w_rest . (mc - mr)) / w_pivot        [B]
        loss   = mean(-log sigmoid(logits))

    Metrics: margin (mean logits), accuracy (fraction of logits > 0), implicit_reward_margin (mean of the
    beta log-ratio difference alone).
    """
    if not w_pivot > 0:
        raise ValueError(f"w_pivot = {w_pivot} must be > 0: MODPO divides by the pivot objective's weight")
    implicit = beta * (policy_chosen - ref_chosen) - beta * (policy_rejected - ref_rejected)  # [B]
    margin = (margin_chosen - margin_rejected) @ w_rest.to(margin_chosen)  # [B]
    logits = (implicit - margin) / w_pivot  # [B]
    loss = -F.logsigmoid(logits).mean()
    return loss, {
        "margin": float(logits.detach().mean()),
        "accuracy": float((logits.detach() > 0).float().mean()),
        "implicit_reward_margin": float(implicit.detach().mean()),
    }


def pivot_of(w: Sequence[float], pivot: int | None = None) -> int:
    """The pivot objective: ``pivot`` if given (ValueError when its weight is 0), else argmax_i w_i."""
    w = np.asarray(w, dtype=np.float64)
    if pivot is None:
        return int(np.argmax(w))
    if not 0 <= pivot < len(w):
        raise ValueError(f"pivot = {pivot} must index one of the {len(w)} objectives")
    if w[pivot] <= 0:
        raise ValueError(
            f"pivot = {pivot} has weight w[{pivot}] = {w[pivot]:g}; MODPO needs w_pivot > 0 (it divides by "
            "it): use pivot=None (largest weight) or skip this preference"
        )
    return int(pivot)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def modpo_dir(cfg: Config, mu: Sequence[float]) -> str:
    """``<run_dir>/modpo/mu_<mu_1>-<mu_2>-...`` (same naming as the MORLHF runs)."""

    return join(storage_abs(cfg.storage.run_dir), "modpo", "mu_" + "-".join(_fmt(float(x)) for x in mu))


def train_modpo(
    cfg: Config,
    out_dir: str,
    *,
    mu: Sequence[float],
    rollouts_path: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    beta: float | None = None,
    pivot: int | None = None,
    objectives: Sequence[str] | None = None,
    ctx: TrainContext | None = None,
) -> dict[str, Any] | None:
    """Train the MODPO policy of preference ``mu`` (a LoRA on the base) and write it to ``out_dir``.

    Args:
        mu: the preference w (n weights on the simplex, objective order of ``objectives``).
        rollouts_path: scored rollouts (default ``<run_dir>/rollouts``, generated if missing).
        steps / batch_size: optimizer steps and pairs per step (defaults: :class:`OfflineSettings`).
        beta: DPO temperature (default ``backbone.kl_coef``).
        pivot: the objective whose pairs drive the DPO term (default argmax mu; see the module docstring).
        objectives: objective (column) names (default ``task.objectives``).
        ctx: runner context (rank, device, DDP wrap, step hook, resume); default a plain process.

    Returns the manifest (rank 0; other ranks return None). Raises ValueError for a bad preference, a zero
    pivot weight, or rollouts with no usable pair.
    """
    from mage_ray.soup import validate_preference
    from mage_ray.train.rollouts import read_rollouts

    t0 = time.time()
    ctx = ctx or TrainContext()
    names = list(objectives) if objectives is not None else list(cfg.task.objectives)
    w = validate_preference(mu, len(names), name="mu")
    k = pivot_of(w, pivot)
    rest = [i for i in range(len(names)) if i != k]
    beta = cfg.backbone.kl_coef if beta is None else float(beta)
    if not beta > 0:
        raise ValueError(f"beta = {beta} must be > 0 (MODPO's KL coefficient; backbone.kl_coef by default)")
    s = offline.OfflineSettings.from_config(cfg, steps, batch_size)

    table = read_rollouts(ensure_rollouts(cfg, rollouts_path))
    mean, std = zscore_stats(objective_matrix(table, names))
    pairs: list[PreferencePair] = build_pairs(table, names, np.eye(len(names))[k])
    if not pairs:
        raise ValueError(
            f"rollouts hold no preference pair for objective {names[k]!r}: every prompt needs >= 2 responses "
            "with different scores (value.rollouts_per_prompt >= 2)"
        )
    z_w = (np.stack([p.chosen_scores for p in pairs]) - mean) / std  # [P, n]
    z_l = (np.stack([p.rejected_scores for p in pairs]) - mean) / std  # [P, n]
    margin_w = torch.tensor(z_w[:, rest], dtype=torch.float32)  # [P, n-1]
    margin_l = torch.tensor(z_l[:, rest], dtype=torch.float32)  # [P, n-1]
    w_rest = torch.tensor(w[rest], dtype=torch.float32)  # [n-1]

    t = offline.prepare(
        partial(offline.build_lora_policy, cfg),
        seed=s.seed,
        learning_rate=s.learning_rate,
        ctx=ctx,
        checkpointing=cfg.backbone.activation_checkpointing,
    )

    def batch_of(idx: list[int]) -> dict[str, torch.Tensor]:
        prompts = [pairs[i].prompt_ids for i in idx] * 2
        responses = [pairs[i].chosen_ids for i in idx] + [pairs[i].rejected_ids for i in idx]
        b = collate_sequences(prompts, responses, t.pad_id, s.max_len)
        return {key: v.to(ctx.device) for key, v in b.items()}

    refs = offline.ReferenceCache(t.model, batch_of, 2)

    def step_loss(idx: list[int], step: int):
        ref = refs(idx, ctx.device)  # [b, 2]: chosen, rejected
        logps = offline.sequence_logps(t.forward, batch_of(idx))  # [2b]
        b = len(idx)
        return modpo_loss(
            logps[:b],
            logps[b:],
            ref[:, 0],
            ref[:, 1],
            margin_w[idx].to(logps.device),
            margin_l[idx].to(logps.device),
            float(w[k]),
            w_rest,
            beta,
        )

    history = offline.fit_steps(t, len(pairs), step_loss, s, ctx)
    if ctx.rank != 0:
        return None
    name = "mu_" + "-".join(_fmt(float(x)) for x in w)  # the directory name of modpo_dir
    manifest = {
        **offline.common_manifest(
            cfg, s, kind="modpo", name=name, objectives=names, steps=s.steps, history=history, t0=t0, ctx=ctx
        ),
        "preference": w.tolist(),
        "mu": w.tolist(),
        "w": w.tolist(),
        "beta": None,  # no B(beta): a MODPO policy is trained for one preference
        "dpo_beta": beta,
        "pivot": k,
        "pivot_objective": names[k],
        "reward_mean": mean.tolist(),
        "reward_std": std.tolist(),
        "margin_normalisation": "zscore",
        "n_pairs": len(pairs),
    }
    summary = f"[modpo] mu={np.round(w, 4).tolist()} pivot {names[k]}: {len(pairs)} pairs, {s.steps} steps"
    return offline.save_policy_artifact(t.model, out_dir, manifest, history, summary=summary, quiet=ctx.quiet)


def _steps(cfg: Config, steps: int | None) -> int:
    return cfg.backbone.steps if steps is None else int(steps)


def train_modpo_ray(
    cfg: Config, mu: Sequence[float], *, out_dir: str | None = None, progress: bool = True, **kwargs: Any
) -> dict[str, Any]:
    """One MODPO policy as a Ray Train run, published to ``out_dir`` (default :func:`modpo_dir`)."""
    return train_modpo_grid(cfg, [mu], out_dirs=[out_dir] if out_dir else None, progress=progress, **kwargs)[
        0
    ]


def train_modpo_grid(
    cfg: Config,
    grid: Sequence[Sequence[float]] | np.ndarray,
    *,
    out_dirs: Sequence[str] | None = None,
    rollouts_path: str | None = None,
    steps: int | None = None,
    pivot: int | None = None,
    max_concurrent: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Train one MODPO policy per preference of ``grid`` (Ray Train runs, concurrently as Tune trials).

    The rollouts are generated once up front (default ``<run_dir>/rollouts``). With a fixed ``pivot``, grid
    points whose pivot weight is 0 are skipped with a message (see the module docstring). Complete
    directories are not retrained. Returns the manifests of the trained (or already complete) points.
    """
    from mage_ray.soup import validate_preference

    n = len(kwargs.get("objectives") or cfg.task.objectives)
    mus = [validate_preference(mu, n, name="grid[]") for mu in np.asarray(grid, dtype=float)]

    rollouts = storage_abs(ensure_rollouts(cfg, rollouts_path))  # absolute: workers may run elsewhere
    total = _steps(cfg, steps)
    jobs = []
    for i, mu in enumerate(mus):
        if pivot is not None and mu[pivot] <= 0:
            print(
                f"[modpo] skipping mu={np.round(mu, 4).tolist()}: pivot objective {pivot} has weight 0 "
                "(MODPO divides by it; use pivot=None to pivot on the largest weight)",
                flush=True,
            )
            continue
        out = out_dirs[i] if out_dirs is not None else modpo_dir(cfg, mu)
        label = "modpo " + out.rstrip("/").rsplit("/", 1)[-1]
        job_kwargs = {"mu": mu.tolist(), "rollouts_path": rollouts, "steps": total, "pivot": pivot, **kwargs}
        jobs.append(
            dict(
                cfg=cfg,
                train_fn=train_modpo,
                kwargs=job_kwargs,
                out_dir=out,
                label=label,
                kind="modpo",
                max_steps=total,
                progress=progress,
            )
        )
    return offline.run_lora_jobs(cfg, jobs, experiment="modpo", max_concurrent=max_concurrent)
