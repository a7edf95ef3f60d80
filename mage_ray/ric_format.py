"""RiC's prompt format and preference-to-target mapping (Rewards-in-Context, Yang et al. 2024, arXiv 2402.10207).

Shared by training (``mage_ray.train.ric`` writes each example's scores into its prompt) and decoding
(``mage_ray.guidance`` tags a request's prompt with the targets of its preference), so that decoding never
imports training. The format: ``"<prompt> <rm1_score> 0.8 <rm2_score> -0.3"`` (one decimal, appended to the
user message). The mapping (RiC Sec. 3.3, authors' ``map_rewards_from_preference`` method "linf"): for
preference mu over n objectives, with [lo_i, hi_i] the range of the normalised training scores of objective i,

    target_i = hi_i                                        if i = argmax_j mu_j
    target_i = lo_i + min(n * mu_i, 1) * (hi_i - lo_i)     otherwise

rounded to one decimal ("l2" and "linear" are the authors' alternatives).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DECIMALS",
    "MAPPINGS",
    "SCORE_TAG",
    "format_scores",
    "preference_to_targets",
    "ric_prompt_for_preference",
    "ric_user_prompt",
]

SCORE_TAG = "<rm{i}_score>"
"""Tag of objective i (1-based), as in the RiC code."""
DECIMALS = 1
"""Scores in prompts are rounded to one decimal (RiC)."""
MAPPINGS = ("linf", "l2", "linear")


def _fmt(v: float) -> str:
    return f"{round(float(v), DECIMALS) + 0.0:.{DECIMALS}f}"  # + 0.0 turns -0.0 into 0.0


def format_scores(scores: Sequence[float]) -> str:
    """``<rm1_score> 0.8 <rm2_score> -0.3`` (one decimal)."""
    return " ".join(f"{SCORE_TAG.format(i=i + 1)} {_fmt(v)}" for i, v in enumerate(scores))


def ric_user_prompt(prompt: str | list[dict], scores: Sequence[float]) -> str | list[dict]:
    """The prompt with its score tags appended to the user text (the last user message of a chat)."""
    tags = format_scores(scores)
    if isinstance(prompt, str):
        return f"{prompt.rstrip()} {tags}"
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"prompt must be a string or a non-empty list of chat messages, got {prompt!r}")
    msgs = copy.deepcopy(prompt)
    users = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role", "user") == "user"]
    i = users[-1] if users else len(msgs) - 1
    msgs[i]["content"] = f"{str(msgs[i].get('content', '')).rstrip()} {tags}"
    return msgs


def preference_to_targets(
    mu: Sequence[float], low: Sequence[float], high: Sequence[float], mapping: str = "linf"
) -> np.ndarray:
    """RiC's preference-to-reward mapping (module docstring), rounded to one decimal: (n,) targets."""
    mu = np.asarray(mu, dtype=np.float64)
    lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    n = mu.shape[0]
    if lo.shape != (n,) or hi.shape != (n,):
        raise ValueError(f"low / high need {n} values (one per objective), got {lo.tolist()} / {hi.tolist()}")
    if mapping == "linf":
        frac = np.minimum(n * mu, 1.0)
        frac[int(np.argmax(mu))] = 1.0
    elif mapping == "l2":
        frac = mu / max(float(np.linalg.norm(mu)), 1e-12)
    elif mapping == "linear":
        frac = mu
    else:
        raise ValueError(f"mapping = {mapping!r} is invalid: expected one of {list(MAPPINGS)}")
    return np.round(lo + frac * (hi - lo), DECIMALS)


def ric_prompt_for_preference(
    prompt: str | list[dict], mu: Sequence[float], manifest: Mapping[str, Any] | None
):
    """The prompt the decode engine sends for method ``ric``: tagged with mapping(mu) as in training."""
    if not manifest:
        raise ValueError(
            "method 'ric' needs the RiC adapter's manifest (bundle 'ric' entry) for its score ranges"
        )
    missing = [k for k in ("score_low", "score_high", "objectives") if k not in manifest]
    if missing:
        raise ValueError(f"RiC manifest lacks {missing}: retrain with mage_ray.train.ric (it stores them)")
    if len(mu) != len(manifest["objectives"]):
        raise ValueError(
            f"preference has {len(mu)} weights but the RiC adapter has {len(manifest['objectives'])} "
            f"objectives {manifest['objectives']}"
        )
    targets = preference_to_targets(
        mu, manifest["score_low"], manifest["score_high"], manifest.get("mapping", "linf")
    )
    return ric_user_prompt(prompt, targets)
