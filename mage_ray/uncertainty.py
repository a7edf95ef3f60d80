"""Uncertainty of front metrics: a paired percentile bootstrap over test prompts.

A method's front R (P, n) is the mean over N test prompts of the per-prompt rewards X (P, N, n) obtained
under each preference mu_p (NaN marks a generation that errored; a cell's mean skips them). The front
metrics of ``mage_ray.metrics`` (HV, inner product, controllability) are functions of these means, so
their sampling error comes from which prompts were drawn. One bootstrap resample is a vector of N prompt
indices drawn with replacement; every method's front is rebuilt from the same indices and every metric
recomputed. Because the SAME resample is applied to every method (and every sweep trial), a difference
or ratio between two methods is judged on the same prompts: prompt difficulty, which moves both methods
together, cancels, and only the part of the gap that varies across prompts widens the interval.

- ``value`` is always the metric on the full data; ``lo`` / ``hi`` are the percentile interval of the
  resampled metric at level ``confidence`` (``scipy.stats.bootstrap``, ``method="percentile"``).
- HV ratios a/b are bootstrapped as the share HV(a) / (HV(a) + HV(b)), which lies in [0, 1] and is
  increasing in the ratio, then mapped back by share / (1 - share). A resample where HV(b) = 0 < HV(a)
  gives share 1, i.e. ratio inf (written ``Infinity`` by ``json.dumps``), without warnings; both HVs 0
  counts as a tie (ratio 1). The interval ends are those of the share mapped back, so they are order
  statistics of the ratio up to the interpolation between two neighbouring resamples.
- In a resample a cell whose drawn prompts all errored keeps its full-data mean (a cell with no valid
  prompt at all is an input error).
- With N < 2 there is nothing to resample: lo = hi = value and a ``note`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import bootstrap

from mage_ray.metrics import controllability, hypervolume, inner_product

__all__ = ["bootstrap_fronts", "bootstrap_trials", "cell_means", "front_stderr"]

METHOD = "percentile bootstrap over prompts, paired"
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "hv": lambda R, mu, ref: hypervolume(R, ref),
    "inner_product": lambda R, mu, ref: inner_product(R, mu),
    "controllability": lambda R, mu, ref: controllability(R, mu),
}
"""Front metrics (all larger-is-better) of one (P, n) front, called as f(R, mu, ref_point)."""


def _sums_counts(X: np.ndarray, idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sum of the non-NaN rewards and their count per cell over the prompts ``idx`` (all if None): (P, n) each."""
    X = np.asarray(X, dtype=np.float64)
    if idx is not None:
        X = X[:, idx, :]
    valid = ~np.isnan(X)  # (P, N', n)
    return np.where(valid, X, 0.0).sum(axis=1), valid.sum(axis=1)


def cell_means(X: np.ndarray) -> np.ndarray:
    """Mean over prompts of X (P, N, n), skipping NaN: the front R, shape (P, n). NaN where a cell has no value."""
    sums, counts = _sums_counts(X)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def front_stderr(X: np.ndarray) -> np.ndarray:
    """Standard error of each cell mean of X (P, N, n): std (ddof=1) / sqrt(count) over the non-NaN prompts.

    Shape (P, n); 0 where a cell has fewer than 2 values.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = cell_means(X)[:, None, :]  # (P, 1, n)
    valid = ~np.isnan(X)
    counts = valid.sum(axis=1)  # (P, n)
    ss = np.where(valid, X - np.where(np.isnan(mean), 0.0, mean), 0.0) ** 2
    var = np.divide(ss.sum(axis=1), counts - 1, out=np.zeros(counts.shape), where=counts > 1)
    return np.sqrt(var / np.maximum(counts, 1))


def _check_inputs(per_prompt: Mapping[str, np.ndarray], mu: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """Per-prompt arrays as float64 (P, N, n), all with mu's (P, n) and one N; returns them and N."""
    if not per_prompt:
        raise ValueError("per_prompt is empty: pass at least one method's (P, N, n) rewards")
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 2:
        raise ValueError(f"mu must be a (P, n) array of preferences, got shape {mu.shape}")
    P, n = mu.shape
    arrays, first, N = {}, None, None
    for name, X in per_prompt.items():
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 3 or X.shape[0] != P or X.shape[2] != n:
            raise ValueError(
                f"method {name!r}: per-prompt rewards must have shape (P={P}, N, n={n}) to match mu, "
                f"got {X.shape}"
            )
        if N is None:
            first, N = name, X.shape[1]
        elif X.shape[1] != N:
            raise ValueError(
                f"method {name!r} has {X.shape[1]} prompts but {first!r} has {N}: the bootstrap is paired, "
                "so every method must be scored on the same prompts in the same order"
            )
        empty = np.argwhere(_sums_counts(X)[1] == 0)
        if empty.size:
            p, j = empty[0]
            raise ValueError(f"method {name!r}: cell (preference {p}, objective {j}) has no non-NaN prompt")
        arrays[name] = X
    return arrays, N


def _resampled_means(X: np.ndarray, full: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Front (P, n) from the prompts ``idx``; a cell with no valid drawn prompt keeps its full-data mean."""
    sums, counts = _sums_counts(X, idx)
    return np.divide(sums, counts, out=full.copy(), where=counts > 0)


def _paired_bootstrap(
    arrays: Mapping[str, np.ndarray],
    evaluate: Callable[[dict[str, np.ndarray]], np.ndarray],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``evaluate`` (name -> (P, n) front, giving a vector of K statistics) on the full data, and the
    percentile interval of each statistic when every front is rebuilt from one shared resample of the N
    prompt indices. Returns value, lo, hi, each shape (K,); lo = hi = value when N < 2."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    fronts = {name: cell_means(X) for name, X in arrays.items()}  # name -> (P, n)
    value = evaluate(fronts)
    N = next(iter(arrays.values())).shape[1]
    if N < 2:
        return value, value, value

    def statistic(idx: np.ndarray) -> np.ndarray:  # idx: (N,) prompt indices drawn with replacement
        return evaluate({name: _resampled_means(X, fronts[name], idx) for name, X in arrays.items()})

    res = bootstrap(
        (np.arange(N),),
        statistic,
        n_resamples=n_resamples,
        vectorized=False,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return value, np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)


def _band(value: np.ndarray, lo: np.ndarray, hi: np.ndarray, i: int, key: str = "value") -> dict:
    """{key: value[i], "lo": lo[i], "hi": hi[i]} as plain floats."""
    return {key: float(value[i]), "lo": float(lo[i]), "hi": float(hi[i])}


def _share(hv_a: float, hv_b: float) -> float:
    """HV(a) / (HV(a) + HV(b)) in [0, 1]; 0.5 (a tie) when both are 0."""
    total = hv_a + hv_b
    return 0.5 if total == 0 else hv_a / total


def _ratio(share: float) -> float:
    """share / (1 - share) = HV(a) / HV(b); inf for share 1."""
    return float("inf") if share >= 1.0 else float(share / (1.0 - share))


def bootstrap_fronts(
    per_prompt: Mapping[str, np.ndarray],
    mu: np.ndarray,
    ref_point: Sequence[float] | np.ndarray,
    *,
    ratios: Sequence[tuple[str, str]] = (),
    confidence: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap intervals of HV, inner product and controllability for each method, and HV ratios.

    per_prompt: method -> rewards (P, N, n), NaN for errored generations; mu: (P, n) preferences, row p
    used for row p of every array; ref_point: (n,), the same for every method. ``ratios`` lists pairs
    (a, b) for HV(a) / HV(b); ``holds`` is True when the whole interval lies above 1.

    Returns a JSON-serialisable dict: ``methods`` -> name -> {"hv", "inner_product", "controllability":
    {"value", "lo", "hi"}, "stderr": (P, n) list}, ``ratios`` -> "a/b" -> {"value", "lo", "hi", "holds"},
    and "confidence", "n_resamples", "n_prompts", "method", "ref_point" (plus "note" when N < 2).
    """
    arrays, N = _check_inputs(per_prompt, mu)
    mu = np.asarray(mu, dtype=np.float64)
    ref = np.asarray(ref_point, dtype=np.float64)
    for a, b in ratios:
        for name in (a, b):
            if name not in arrays:
                raise ValueError(f"ratio {a}/{b}: method {name!r} is not in per_prompt ({sorted(arrays)})")
    names = list(arrays)

    def evaluate(front: Mapping[str, np.ndarray]) -> np.ndarray:
        """[metric for each method and metric name] + [share for each ratio]."""
        values = {(name, m): f(front[name], mu, ref) for name in names for m, f in METRICS.items()}
        shares = [_share(values[a, "hv"], values[b, "hv"]) for a, b in ratios]
        return np.array(list(values.values()) + shares)

    value, lo, hi = _paired_bootstrap(arrays, evaluate, confidence, n_resamples, seed)

    out: dict = {"methods": {}, "ratios": {}}
    k = 0
    for name in names:
        out["methods"][name] = {m: _band(value, lo, hi, k + i) for i, m in enumerate(METRICS)}
        out["methods"][name]["stderr"] = front_stderr(arrays[name]).tolist()
        k += len(METRICS)
    for a, b in ratios:
        r_lo, r_hi = _ratio(lo[k]), _ratio(hi[k])
        out["ratios"][f"{a}/{b}"] = {"value": _ratio(value[k]), "lo": r_lo, "hi": r_hi, "holds": r_lo > 1.0}
        k += 1
    out.update(confidence=confidence, n_resamples=n_resamples, n_prompts=N, method=METHOD)
    out["ref_point"] = [float(v) for v in ref]
    if N < 2:
        out["note"] = f"only {N} prompt(s): no resampling possible, lo = hi = value"
    return out


def bootstrap_trials(
    per_prompt: Mapping[str, np.ndarray],
    mu: np.ndarray,
    ref_point: Sequence[float] | np.ndarray,
    *,
    default: str | None,
    metric: str = "hv",
    confidence: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Pick a sweep trial only when it beats the default beyond prompt noise (paired bootstrap).

    per_prompt: trial key (e.g. "0.6") -> rewards (P, N, n) on the same validation prompts; mu (P, n);
    metric: one of "hv", "inner_product", "controllability" (larger is better).

    Returns a JSON-serialisable dict: ``trials`` -> key -> {"value", "lo", "hi"} of the metric, plus
    "vs_default": {"diff", "lo", "hi"} for metric(trial) - metric(default) when the default is among the
    trials; "best" (largest value), "distinguishable" (the interval of best - default lies entirely above
    0), "chosen" (best if distinguishable else default), "default", "metric", "confidence",
    "n_resamples", "n_prompts", "method". When default is None or not a trial: chosen = best,
    distinguishable = None, and a "note" says why.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    arrays, N = _check_inputs(per_prompt, mu)
    mu = np.asarray(mu, dtype=np.float64)
    ref = np.asarray(ref_point, dtype=np.float64)
    f = METRICS[metric]
    keys = list(arrays)
    paired = default is not None and default in arrays

    def evaluate(front: Mapping[str, np.ndarray]) -> np.ndarray:
        """[metric per trial] + [metric(trial) - metric(default) per trial when paired]."""
        values = np.array([f(front[key], mu, ref) for key in keys])
        if not paired:
            return values
        return np.concatenate([values, values - values[keys.index(default)]])

    value, lo, hi = _paired_bootstrap(arrays, evaluate, confidence, n_resamples, seed)

    T = len(keys)
    trials = {key: _band(value, lo, hi, i) for i, key in enumerate(keys)}
    best = keys[int(np.argmax(value[:T]))]  # first of equal values wins
    out: dict = {"trials": trials, "default": default, "best": best, "metric": metric}
    notes = []
    if paired:
        for i, key in enumerate(keys):
            trials[key]["vs_default"] = _band(value, lo, hi, T + i, key="diff")
        distinguishable = trials[best]["vs_default"]["lo"] > 0.0
        out.update(distinguishable=bool(distinguishable), chosen=best if distinguishable else default)
    else:
        why = "no default given" if default is None else f"default {default!r} is not among the trials"
        notes.append(f"{why}: chosen = best by point estimate, nothing to compare against")
        out.update(distinguishable=None, chosen=best)
    if N < 2:
        notes.append(f"only {N} prompt(s): no resampling possible, lo = hi = value")
    out.update(confidence=confidence, n_resamples=n_resamples, n_prompts=N, method=METHOD)
    if notes:
        out["note"] = "; ".join(notes)
    return out
