"""Data of the offline baselines RiC, MODPO and WRPO: scored rollouts -> examples -> padded batches.

All three train a LoRA on the base policy from *scored responses* (the rollout Parquet of
:mod:`mage_ray.train.rollouts`: columns prompt, response, prompt_ids, response_ids and one float column per
objective; :func:`ensure_rollouts` generates the default ones). This module holds their data:

* :func:`build_pairs` (MODPO): per prompt, the best and the worst response under a weighted score w^T r
  (MODPO uses w = one-hot(pivot objective)). :func:`build_triples` (WRPO): per prompt, the best
  *source-model* response y_ws and the best / worst *target-policy* responses y_wt / y_l, all ranked by
  h = w^T r (Eq. 11 of MAGE (arXiv 2510.03782)). :func:`objective_matrix` reads the scores, :func:`usable_rows` marks the
  rows with a response and finite scores, :func:`zscore_stats` gives per-objective (mean, std).
* :func:`collate_sequences`: right-padded prompt + response, mask on the positions that predict a response
  token (the value models batch with it too).

The loop they train with is :mod:`mage_ray.train.offline`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from mage_ray.config import Config
from mage_ray.manifest import is_complete, join

__all__ = [
    "PreferencePair",
    "PreferenceTriple",
    "build_pairs",
    "build_triples",
    "collate_sequences",
    "ensure_rollouts",
    "objective_matrix",
    "usable_rows",
    "zscore_stats",
]


# ---------------------------------------------------------------------------------------------
# Data: scored rollouts -> pairs / triples


def objective_matrix(table: pa.Table, objectives: Sequence[str]) -> np.ndarray:
    """Scores of ``objectives`` as an (N, n) float64 matrix; ValueError naming a missing column."""
    missing = [o for o in objectives if o not in table.column_names]
    if missing:
        raise ValueError(
            f"objectives {missing} are not columns of the scored rollouts (columns: {table.column_names}); "
            "regenerate the rollouts with these task.objectives"
        )
    cols = [np.asarray(table.column(o).to_numpy(zero_copy_only=False), dtype=np.float64) for o in objectives]
    return np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0))  # (N, n)


def zscore_stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-objective mean and std (floored at 1e-6) of an (N, n) score matrix: two (n,) arrays."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (N, n) matrix, got shape {scores.shape}")
    return scores.mean(axis=0), np.maximum(scores.std(axis=0), 1e-6)


def usable_rows(table: pa.Table, scores: np.ndarray) -> np.ndarray:
    """Rows with a non-empty response and finite scores: (N,) bool."""
    nonempty = np.array([len(r) > 0 for r in table.column("response_ids").to_pylist()], dtype=bool)
    return nonempty & np.isfinite(scores).all(axis=1)


def _weighted(table: pa.Table, objectives: Sequence[str], weights: Sequence[float]):
    """(scores (N, n), usable rows (N,), h = scores @ w (N,)); ValueError unless one weight per objective."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(objectives),):
        raise ValueError(f"weights must have {len(objectives)} entries (one per objective), got {w.tolist()}")
    scores = objective_matrix(table, objectives)  # (N, n)
    return scores, usable_rows(table, scores), scores @ w


def _best_and_worst(table: pa.Table, h: np.ndarray, ok: np.ndarray, min_margin: float):
    """Per prompt (in order of first appearance) with >= 2 usable rows whose h differ by more than
    ``min_margin``: (prompt, argmax-h row, argmin-h row), ties to the first row."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(table.column("prompt").to_pylist()):
        groups.setdefault(p, []).append(i)
    for p, rows in groups.items():
        rows = [i for i in rows if ok[i]]
        if len(rows) < 2:
            continue
        best, worst = rows[int(np.argmax(h[rows]))], rows[int(np.argmin(h[rows]))]
        if h[best] - h[worst] > min_margin:
            yield p, best, worst


@dataclass
class PreferencePair:
    """One MODPO example: a prompt, its chosen and rejected responses, and their raw objective scores."""

    prompt: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_scores: np.ndarray
    """r(x, y_w), (n,) raw scores."""
    rejected_scores: np.ndarray
    """r(x, y_l), (n,) raw scores."""


def build_pairs(
    table: pa.Table, objectives: Sequence[str], weights: Sequence[float], *, min_margin: float = 0.0
) -> list[PreferencePair]:
    """Per prompt: chosen = argmax_y w^T r(x, y), rejected = argmin_y w^T r(x, y) over its responses.

    Prompts with fewer than two usable responses (non-empty, finite scores) or whose best and worst weighted
    scores differ by ``min_margin`` or less are skipped. Ties pick the first row. Prompts keep their order.
    """
    scores, ok, h = _weighted(table, objectives, weights)
    p_ids = table.column("prompt_ids").to_pylist()
    r_ids = table.column("response_ids").to_pylist()
    return [
        PreferencePair(p, list(p_ids[b]), list(r_ids[b]), list(r_ids[w]), scores[b], scores[w])
        for p, b, w in _best_and_worst(table, h, ok, min_margin)
    ]


@dataclass
class PreferenceTriple:
    """One WRPO example: (x, y_ws, y_wt, y_l) with their combined rewards h = w^T r."""

    prompt: str
    prompt_ids: list[int]
    source_ids: list[int]
    """y_ws: the best response among all source models' responses to x."""
    chosen_ids: list[int]
    """y_wt: the best of the target policy's responses to x."""
    rejected_ids: list[int]
    """y_l: the worst of the target policy's responses to x."""
    source: str
    """Name of the source model y_ws came from."""
    h_source: float
    h_chosen: float
    h_rejected: float


def build_triples(
    target: pa.Table,
    sources: Mapping[str, pa.Table],
    objectives: Sequence[str],
    weights: Sequence[float],
    *,
    min_margin: float = 0.0,
) -> list[PreferenceTriple]:
    """WRPO triples: per prompt of ``target``, y_ws = argmax h over every source response to the same prompt
    text, y_wt / y_l = argmax / argmin h over the target's responses, h = w^T r.

    Prompts without a usable source response, with fewer than two usable target responses, or with
    h(y_wt) - h(y_l) <= ``min_margin`` are skipped. Source tables must hold token ids in the target
    tokenizer (their ``prompt_ids`` are not used: the target's are).
    """
    best_source: dict[str, tuple[float, list[int], str]] = {}
    for name, table in sources.items():
        _, ok, h = _weighted(table, objectives, weights)
        ids = table.column("response_ids").to_pylist()
        for i, p in enumerate(table.column("prompt").to_pylist()):
            if ok[i] and (p not in best_source or h[i] > best_source[p][0]):
                best_source[p] = (float(h[i]), list(ids[i]), name)
    _, ok, h = _weighted(target, objectives, weights)
    p_ids = target.column("prompt_ids").to_pylist()
    r_ids = target.column("response_ids").to_pylist()
    triples = []
    for p, b, w in _best_and_worst(target, h, ok, min_margin):
        if p in best_source:
            hs, ids, name = best_source[p]
            chosen, rejected = list(r_ids[b]), list(r_ids[w])
            triples.append(
                PreferenceTriple(p, list(p_ids[b]), ids, chosen, rejected, name, hs, float(h[b]), float(h[w]))
            )
    return triples


# ---------------------------------------------------------------------------------------------
# Batches


def collate_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_id: int,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + response batch: input_ids, attention_mask, next_ids, mask, all [B, L].

    next_ids[b, j] = input_ids[b, j + 1]; mask[b, j] = 1 where that next token is a response token, i.e.
    j in [P - 1, P + T - 2] for a prompt of P and a response of T tokens. Longer than ``max_len``: prompt
    tokens go first (from the left, at least one stays), then the response's tail.
    """
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(
            f"need as many prompts as responses (> 0), got {len(prompt_ids)} and {len(response_ids)}"
        )
    seqs, spans = [], []
    for p, r in zip(prompt_ids, response_ids):
        p, r = list(p), list(r)
        if not p or not r:
            raise ValueError("every sequence needs at least one prompt token and one response token")
        if max_len is not None and len(p) + len(r) > max_len:
            keep = max(1, max_len - len(r))
            p, r = p[-keep:], r[: max_len - keep]
        seqs.append(p + r)
        spans.append((len(p), len(r)))
    B, L = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((B, L), dtype=torch.long)  # [B, L]
    mask = torch.zeros((B, L), dtype=torch.float32)  # [B, L]
    for b, (s, (P, T)) in enumerate(zip(seqs, spans)):
        input_ids[b, : len(s)] = torch.tensor(s)
        attention[b, : len(s)] = 1
        mask[b, P - 1 : P + T - 1] = 1.0
    next_ids = torch.cat([input_ids[:, 1:], torch.full((B, 1), pad_id, dtype=torch.long)], dim=1)  # [B, L]
    return {"input_ids": input_ids, "attention_mask": attention, "next_ids": next_ids, "mask": mask}


def ensure_rollouts(cfg: Config, rollouts_path: str | None = None) -> str:
    """Path of the scored rollouts of the base policy. An explicit ``rollouts_path`` (a rollouts directory or
    one Parquet file) is used as is; the default ``<run_dir>/rollouts`` is generated when not complete
    (``value.rollouts_per_prompt`` samples per training prompt; Ray Data when Ray is initialised)."""
    if rollouts_path is not None:
        return rollouts_path
    from mage_ray.train.rollouts import generate_rollouts

    path = join(cfg.storage.run_dir, "rollouts")
    if not is_complete(path):
        import ray

        generate_rollouts(cfg, path, use_ray=ray.is_initialized())
    return path
