"""RiC baseline (Rewards-in-Context, Yang et al. 2024, arXiv 2402.10207): SFT with the rewards in the prompt.

Training (offline stage): every scored response y to prompt x (the base policy's rollouts) becomes an SFT
example whose prompt carries y's normalised scores, e.g. ``"<prompt> <rm1_score> 0.8 <rm2_score> -0.3"``:

    L(theta) = - sum_t log pi_theta(y_t | x ⊕ tags(z(x, y)), y<t)      (token-mean over the batch)

with z_i = (r_i - mean_i) / std_i the z-score of objective i under the rollouts' statistics, rounded to one
decimal as in the authors' code (repository YangRui2015/RiC, ``ric/utils.py``: ``<rm{i}_score> {score:.1f}``
tags between the prompt and the response). The tags are appended to the *user message* (chat template
applied afterwards), so the decode engine's prompt and the training prompt are built by the same function,
:func:`mage_ray.ric_format.ric_user_prompt`.

Inference (preference-to-reward mapping, RiC Sec. 3.3, authors' ``map_rewards_from_preference``
method "linf"): for preference mu over n objectives, with [lo_i, hi_i] the range of the normalised training
scores of objective i,

    target_i = hi_i                                        if i = argmax_j mu_j
    target_i = lo_i + min(n * mu_i, 1) * (hi_i - lo_i)     otherwise

rounded to one decimal. ("l2": lo + mu_i / ||mu||_2 (hi - lo); "linear": lo + mu_i (hi - lo) are the authors'
alternatives, selectable with ``mapping``.) ``mage_ray.guidance.ric_prompt`` calls
:func:`mage_ray.ric_format.ric_prompt_for_preference` with the adapter's manifest, which stores the normalisation statistics,
the ranges, the tag format and the mapping.

Online rounds (RiC Sec. 3.2, optional, ``rounds > 1``): each further round samples one response per training
prompt from the current policy under a preference mu drawn uniformly from the ``eval.grid_step`` grid (prompt
tagged with mapping(mu)), scores and normalises it, keeps the responses whose normalised score on *any*
objective reaches that objective's ``quantile`` over the round (the authors' ``select_data_with_quantile``;
``select="weighted"`` keeps instead those whose mu^T z reaches its quantile), relabels them with their
*obtained* scores, and fine-tunes ``steps`` more steps on them plus the offline examples passing the same
filter (the authors' ``merge_dataset``). One offline round is the default.

Departures: the authors rescale the z-scores so the 0.0001 / 0.9999 quantiles land on -4 / +4 and map
preferences onto a Gaussian reference; we map onto the observed range of the z-scores (stored in the
manifest), which is what that rescaling approximates without an extra constant. Output: ``<run_dir>/ric/``
(``adapter/`` + ``manifest.json`` + ``metrics.jsonl``), the bundle's ``ric: {adapter: dir}`` entry.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from mage_ray.config import Config
from mage_ray.manifest import join
from mage_ray.ric_format import (
    DECIMALS,
    MAPPINGS,
    SCORE_TAG,
    format_scores,
    preference_to_targets,
    ric_prompt_for_preference,
    ric_user_prompt,
)
from mage_ray.train import offline
from mage_ray.train.preference_data import (
    collate_sequences,
    ensure_rollouts,
    objective_matrix,
    usable_rows,
    zscore_stats,
)
from mage_ray.train.ray_shell import TrainContext, storage_abs

__all__ = [
    "MAPPINGS",
    "SCORE_TAG",
    "format_scores",
    "preference_to_targets",
    "ric_dir",
    "ric_prompt_for_preference",
    "ric_user_prompt",
    "select_online",
    "sft_loss",
    "train_ric",
    "train_ric_ray",
]

# ---------------------------------------------------------------------------------------------
# Loss and online selection


def sft_loss(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood of the response tokens: -sum(logps * mask) / sum(mask).

    logps, mask: [B, L] (log pi(y_t | ...) at the positions predicting response tokens, 0 elsewhere).
    """
    return -(logps * mask).sum() / mask.sum().clamp(min=1.0)


def select_online(z: np.ndarray, mus: np.ndarray, quantile: float, select: str = "any") -> np.ndarray:
    """Which online samples to keep: (N,) bool.

    z: (N, n) normalised obtained scores; mus: (N, n) the preferences they were generated for.
    "any" (RiC): z_i >= quantile_q(z_i) for some objective i. "weighted": mu^T z >= quantile_q(mu^T z).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile = {quantile} must lie in [0, 1]")
    if select == "any":
        return (z >= np.quantile(z, quantile, axis=0)).any(axis=1)
    if select == "weighted":
        h = (z * mus).sum(axis=1)
        return h >= np.quantile(h, quantile)
    raise ValueError(f"select = {select!r} is invalid: expected 'any' or 'weighted'")


# ---------------------------------------------------------------------------------------------
# Training


def ric_dir(cfg: Config) -> str:
    """``<run_dir>/ric``."""

    return join(storage_abs(cfg.storage.run_dir), "ric")


def _generate_online(
    model,
    tok,
    cfg: Config,
    prompts: list[str],
    mus: np.ndarray,
    lo,
    hi,
    mapping: str,
    seed: int,
    ctx: TrainContext,
) -> list[tuple[str, str, list[int]]]:
    """One sample per (prompt, mu) from the current policy under the tagged prompt: [(prompt, text, ids)].

    With several workers each rank samples its share and the results are all-gathered (same order everywhere).
    """
    from mage_ray.train.rollouts import sample_batches

    mine = list(range(ctx.rank, len(prompts), ctx.world_size))
    tagged = [ric_user_prompt(prompts[i], preference_to_targets(mus[i], lo, hi, mapping)) for i in mine]
    model.eval()
    rows = sample_batches(model, tok, cfg, tagged, mine, n=1, temperature=cfg.backbone.temperature, seed=seed)
    out = {i: (prompts[i], text, ids) for i, (_, text, _, ids) in zip(mine, rows)}
    model.train()
    if ctx.world_size > 1:
        import torch.distributed as dist

        parts: list[dict | None] = [None] * ctx.world_size
        dist.all_gather_object(parts, out)
        out = {i: v for part in parts for i, v in (part or {}).items()}
    return [out[i] for i in range(len(prompts))]


def train_ric(
    cfg: Config,
    out_dir: str,
    *,
    rollouts_path: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    rounds: int = 1,
    quantile: float = 0.7,
    select: str = "any",
    mapping: str = "linf",
    objectives: Sequence[str] | None = None,
    online_objectives: Sequence[Any] | None = None,
    ctx: TrainContext | None = None,
) -> dict[str, Any] | None:
    """Train the RiC policy (a LoRA on the base) on score-tagged rollouts and write it to ``out_dir``.

    Args:
        rollouts_path: scored rollouts of the base policy (default ``<run_dir>/rollouts``, generated when
            missing).
        steps: optimizer steps *per round*; batch_size: examples per step (defaults:
            :class:`OfflineSettings`).
        rounds: 1 = offline SFT only; each further round is an online round (module docstring).
        quantile / select: the online rounds' filter.
        mapping: the preference-to-target mapping stored for decoding.
        objectives: objective (column) names (default ``task.objectives``); online_objectives: callables to
            score online samples (default ``load_objectives(task)``).

    Returns the manifest on rank 0 (others None).
    """
    from mage_ray.soup import preference_grid
    from mage_ray.train.rollouts import encode_prompts, read_rollouts

    t0 = time.time()
    ctx = ctx or TrainContext()
    if rounds < 1:
        raise ValueError(f"rounds = {rounds} must be >= 1 (1 = offline only)")
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping = {mapping!r} is invalid: expected one of {list(MAPPINGS)}")
    select_online(np.zeros((1, 1)), np.ones((1, 1)), quantile, select)  # validates quantile / select early
    names = list(objectives) if objectives is not None else list(cfg.task.objectives)
    s = offline.OfflineSettings.from_config(cfg, steps, batch_size)

    table = read_rollouts(ensure_rollouts(cfg, rollouts_path))
    raw = objective_matrix(table, names)  # (N, n)
    keep = usable_rows(table, raw)
    if not keep.any():
        raise ValueError("the rollouts hold no usable scored response (non-empty, finite scores)")
    mean, std = zscore_stats(raw[keep])
    z = np.round((raw - mean) / std, DECIMALS)  # (N, n) the scores written into prompts
    lo, hi = z[keep].min(axis=0), z[keep].max(axis=0)
    prompts = table.column("prompt").to_pylist()
    responses = table.column("response_ids").to_pylist()
    offline_examples = [(prompts[i], list(responses[i]), z[i]) for i in np.flatnonzero(keep)]

    t = offline.prepare(
        partial(offline.build_lora_policy, cfg),
        seed=s.seed,
        learning_rate=s.learning_rate,
        ctx=ctx,
        checkpointing=cfg.backbone.activation_checkpointing,
    )
    extra = dict((ctx.resume or {}).get("extra") or {})
    online: list[tuple[str, list[int], np.ndarray]] = [
        (p, ids, np.asarray(sc)) for p, ids, sc in extra.get("online", [])
    ]
    round_log: list[dict] = list(extra.get("round_log", []))
    history: list[dict] = []
    train_prompts = list(dict.fromkeys(prompts))
    for rnd in range(t.start_step // s.steps, rounds):
        data = offline_examples
        if rnd > 0:
            if len(round_log) < rnd:  # this round's samples are not in the resumed state yet
                rng = np.random.default_rng([s.seed, rnd])
                grid = preference_grid(len(names), cfg.eval.grid_step)
                mus = grid[rng.integers(len(grid), size=len(train_prompts))]  # (P, n)
                gen = _generate_online(
                    t.model, t.tokenizer, cfg, train_prompts, mus, lo, hi, mapping, s.seed + rnd, ctx
                )
                if online_objectives is None:
                    from mage_ray.tasks.objectives import load_objectives

                    online_objectives = load_objectives(cfg.task, cfg.storage.cache_dir)
                from mage_ray.train.rollouts import score_rows

                sc = score_rows(online_objectives, [g[0] for g in gen], [g[1] for g in gen])
                zg = np.round((np.stack([sc[o] for o in names], axis=1) - mean) / std, DECIMALS)  # (P, n)
                ok = select_online(zg, mus, quantile, select) & np.array([len(g[2]) > 0 for g in gen])
                online += [(g[0], list(g[2]), zg[i]) for i, g in enumerate(gen) if ok[i]]
                round_log.append(
                    {
                        "round": rnd + 1,
                        "generated": len(gen),
                        "kept": int(ok.sum()),
                        "mean_obtained_z": zg.mean(axis=0).round(4).tolist(),
                    }
                )
            offline_z = np.stack([e[2] for e in offline_examples])
            front = select_online(offline_z, np.ones_like(offline_z), quantile, "any")
            data = [e for e, f in zip(offline_examples, front) if f] + online
        tagged = [ric_user_prompt(p, sc) for p, _, sc in data]
        p_ids = encode_prompts(
            t.tokenizer,
            tagged,
            use_chat_template=cfg.model.chat_template,
            max_prompt_tokens=cfg.task.max_prompt_tokens,
        )

        def step_loss(idx: list[int], _step: int, data=data, p_ids=p_ids, rnd=rnd):
            batch = collate_sequences([p_ids[i] for i in idx], [data[i][1] for i in idx], t.pad_id, s.max_len)
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            loss = sft_loss(offline.token_logps(t.forward, batch), batch["mask"])
            return loss, {"round": float(rnd + 1), "n_examples": float(len(data))}

        def state(online=online, round_log=round_log) -> dict:
            return {"online": [(p, ids, sc.tolist()) for p, ids, sc in online], "round_log": round_log}

        round_settings = dataclasses.replace(s, steps=(rnd + 1) * s.steps, seed=s.seed + rnd)
        start = max(t.start_step, rnd * s.steps)
        history += offline.fit_steps(
            t, len(data), step_loss, round_settings, ctx, start_step=start, snapshot_extra=state
        )
    if ctx.rank != 0:
        return None
    manifest = {
        **offline.common_manifest(
            cfg,
            s,
            kind="ric",
            name="ric",
            objectives=names,
            steps=s.steps * rounds,
            history=history,
            t0=t0,
            ctx=ctx,
        ),
        "beta": None,
        "reward_mean": mean.tolist(),
        "reward_std": std.tolist(),
        "normalisation": "zscore",
        "score_low": lo.tolist(),
        "score_high": hi.tolist(),
        "score_format": f"{SCORE_TAG} {{score:.{DECIMALS}f}}, appended to the user message",
        "decimals": DECIMALS,
        "mapping": mapping,
        "rounds": rounds,
        "steps_per_round": s.steps,
        "quantile": quantile,
        "select": select,
        "online_rounds": round_log,
        "n_offline_examples": len(offline_examples),
        "n_online_examples": len(online),
    }
    summary = (
        f"[ric] {len(offline_examples)} offline + {len(online)} online examples, "
        f"{rounds} round(s) x {s.steps} steps"
    )
    return offline.save_policy_artifact(t.model, out_dir, manifest, history, summary=summary, quiet=ctx.quiet)


def train_ric_ray(
    cfg: Config,
    *,
    out_dir: str | None = None,
    rollouts_path: str | None = None,
    steps: int | None = None,
    rounds: int = 1,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train RiC as one Ray Train run (``backbone.num_workers`` workers), published to ``out_dir`` (default
    ``<run_dir>/ric``); the rollouts are generated first when missing. A complete directory is returned as
    is."""

    out = out_dir or ric_dir(cfg)
    per_round = cfg.backbone.steps if steps is None else int(steps)
    job_kwargs = {
        "rollouts_path": storage_abs(ensure_rollouts(cfg, rollouts_path)),
        "steps": per_round,
        "rounds": rounds,
        **kwargs,
    }
    job = dict(
        cfg=cfg,
        train_fn=train_ric,
        kwargs=job_kwargs,
        out_dir=out,
        label="ric",
        kind="ric",
        max_steps=per_round * rounds,
        progress=progress,
    )
    return offline.run_lora_jobs(cfg, [job], experiment="ric")[0]
