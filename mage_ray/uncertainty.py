"""Uncertainty of front metrics over test prompts: a paired percentile bootstrap for HV and inner product,
per-pair paired tests for controllability, exact binomial intervals for degenerate rates.

A method's front R (P, n) is the mean over N test prompts of the per-prompt rewards X (P, N, n) obtained
under each preference mu_p (NaN marks a generation that errored; a cell's mean skips them). The front
metrics of ``mage_ray.metrics`` are functions of these means, so their sampling error comes from which
prompts were drawn.

HV and inner product: one bootstrap resample is a vector of N prompt indices drawn with replacement; every
method's front is rebuilt from the same indices and every metric recomputed. Because the SAME resample is
applied to every method (and every sweep trial), a difference or ratio between two methods is judged on the
same prompts: prompt difficulty, which moves both methods together, cancels, and only the part of the gap that
varies across prompts widens the interval.

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

Controllability is NOT bootstrapped: it counts signs of differences of means, and resampling adds sign flips,
so resampled values sit below the estimate and the percentile interval misses the truth (a simulated
perfectly ordered 11-point front, 48 prompts, per-point s.e. ~0.014: mean estimate 0.91, 90% interval
containing 1 in 0 of 20 repeats). :func:`controllability_bounds` instead tests every pair of preferences: per
objective whose weight changes, a paired t-test over prompts of X[i, :, k] - X[j, :, k]; a pair is
*significantly in the right order* when every changed objective moves significantly with mu, *significantly in
the wrong order* when one moves significantly against it (Holm's procedure over the pairs for each side). The
statement "lo <= K <= hi", lo = share of pairs significantly right, hi = 1 - share significantly wrong, holds
with probability >= confidence for the population controllability K (the share of pairs whose true mean
rewards follow mu, :func:`mage_ray.metrics.controllability_changed`): it fails only if some pair is declared
in an order that is not its true one. The bounds are conservative, not an estimate's error bar: pairs of
neighbouring preferences whose fronts differ by less than the noise are declared neither way.

Degenerate rates (:func:`degenerate_bounds`): per preference, k flagged of m decoded responses, the exact
(Clopper-Pearson) interval, the one ``scipy.stats.binomtest(k, m).proportion_ci(method="exact")`` gives
(computed vectorised from the beta quantiles, :func:`clopper_pearson`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import beta as beta_dist
from scipy.stats import bootstrap
from scipy.stats import t as student_t

from mage_ray.metrics import controllability, controllability_changed, hypervolume, inner_product

__all__ = [
    "bootstrap_fronts",
    "bootstrap_trials",
    "cell_means",
    "controllability_bounds",
    "clopper_pearson",
    "degenerate_bounds",
    "front_stderr",
    "pair_accuracy",
]

METHOD = "percentile bootstrap over prompts, paired"
CONTROL_METHOD = (
    "per pair of preferences, paired t-tests over prompts per objective whose weight changes, Holm over the "
    "pairs; lo = share of pairs significantly in mu's order, hi = 1 - share significantly against it"
)
DEGENERATE_METHOD = "exact (Clopper-Pearson) binomial interval per preference"
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "hv": lambda R, mu, ref: hypervolume(R, ref),
    "inner_product": lambda R, mu, ref: inner_product(R, mu),
}
"""Bootstrapped front metrics (all larger-is-better) of one (P, n) front, called as f(R, mu, ref_point)."""


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


def _holm(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's step-down rejections of the hypotheses with p-values ``p`` (1-D), family-wise error <= alpha under
    any dependence: sort ascending, reject p_(i) while p_(i) <= alpha / (m - i) (i from 0), stop at the first
    that is not."""
    order = np.argsort(p, kind="stable")
    m = len(p)
    reject = np.zeros(m, dtype=bool)
    for i, k in enumerate(order):
        if p[k] > alpha / (m - i):
            break
        reject[k] = True
    return reject


def _paired_t(X: np.ndarray, iu: np.ndarray, ju: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair (iu[q], ju[q]) and objective: mean of d = X[iu] - X[ju] over the prompts scored in both, and its
    t statistic (inf with the sign of the mean when d has no spread; 0 with fewer than 2 prompts). (pairs, n)."""
    d = X[iu] - X[ju]  # (pairs, N, n)
    valid = ~np.isnan(d)
    cnt = valid.sum(axis=1)  # (pairs, n)
    mean = np.divide(np.nansum(d, axis=1), cnt, out=np.zeros(cnt.shape), where=cnt > 0)
    ss = (np.where(valid, d - mean[:, None, :], 0.0) ** 2).sum(axis=1)
    se = np.sqrt(np.divide(ss, cnt * (cnt - 1), out=np.zeros(cnt.shape), where=cnt > 1))
    no_spread = np.where(mean > 0, np.inf, np.where(mean < 0, -np.inf, 0.0))  # d constant: its sign, surely
    t = np.divide(mean, se, out=no_spread, where=se > 0)
    return np.where(cnt > 1, t, 0.0), np.maximum(cnt - 1, 1)


def controllability_bounds(X: np.ndarray, mu: np.ndarray, *, confidence: float = 0.9) -> dict:
    """Bounds [lo, hi] on controllability (over the objectives whose weight changes) that hold together with
    probability >= ``confidence`` (module docstring).

    X: (P, N, n) per-prompt rewards (NaN where a generation errored), mu: (P, n). For each unordered pair
    i < j and objective k with mu_ik != mu_jk, the differences d = X[i, :, k] - X[j, :, k] over the prompts
    scored in both cells give a one-sample t statistic (:func:`_paired_t`) and two one-sided p-values: for
    "d moves with mu_ik - mu_jk" and for "d moves against it". Half the error, a = (1 - confidence) / 2, goes
    to each bound:

    - lo: a pair is *significantly right* when its p-value max_k p_k(with) (every changed objective must move
      with mu: an intersection-union test) is rejected by Holm's procedure over the pairs at level a.
    - hi: a pair is *significantly wrong* when its p-value min(1, m_pair * min_k p_k(against)) (one objective
      against mu suffices; Bonferroni over its m_pair changed objectives) is rejected by Holm over the pairs at
      level a.

    Each procedure controls the chance of any false declaration (under any dependence), so lo <= K <= hi
    fails with probability <= 1 - confidence. A pair that changes no weight counts as right (as in the point
    estimate). A t statistic with zero spread of d is +-inf (significant) when the mean is not 0; with fewer than
    2 prompts it is 0 (never significant). The t-test is asymptotic in the number of prompts.

    Returns {"value": controllability_changed of the cell means, "lo", "hi", "literal": Definition 1 as
    written on the cell means (no interval), "n_pairs", "n_tests", "method"}.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    X = np.asarray(X, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    if X.ndim != 3 or mu.ndim != 2 or X.shape[0] != mu.shape[0] or X.shape[2] != mu.shape[1]:
        raise ValueError(
            f"X must be (P, N, n) and mu (P, n) with the same P and n, got {X.shape} and {mu.shape}"
        )
    P = mu.shape[0]
    if P < 2:
        raise ValueError(f"controllability needs at least 2 preferences, got {P}")
    R = cell_means(X)  # (P, n)
    iu, ju = np.triu_indices(P, k=1)  # unordered pairs
    dmu = mu[iu] - mu[ju]  # (pairs, n)
    changed = np.abs(dmu) > 1e-12
    t, df = _paired_t(X, iu, ju)
    towards = np.where(changed, np.sign(dmu) * t, 0.0)  # t in the direction mu moves
    p_with = np.where(changed, student_t.sf(towards, df), 0.0)  # one-sided: moves with mu
    p_against = np.where(changed, student_t.sf(-towards, df), 1.0)  # one-sided: moves against mu
    a = (1.0 - confidence) / 2.0
    right = _holm(p_with.max(axis=1), a)
    m_pair = np.maximum(changed.sum(axis=1), 1)
    wrong = _holm(np.minimum(1.0, m_pair * p_against.min(axis=1)), a)
    n_pairs = len(iu)
    finite = bool(np.isfinite(R).all())
    return {
        "value": controllability_changed(R, mu) if finite else float("nan"),
        "lo": float(right.sum() / n_pairs),
        "hi": float(1.0 - wrong.sum() / n_pairs),
        "literal": controllability(R, mu) if finite else float("nan"),
        "n_pairs": int(n_pairs),
        "n_tests": int(changed.sum()),
        "method": CONTROL_METHOD,
    }


def clopper_pearson(k: np.ndarray, m: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial share k / m at ``confidence``, vectorised: the
    ``alpha / 2`` quantile of Beta(k, m - k + 1) and the ``1 - alpha / 2`` quantile of Beta(k + 1, m - k) (0 at
    k = 0, 1 at k = m), the bounds ``scipy.stats.binomtest(k, m).proportion_ci(method="exact")`` gives. m >= 1."""
    k, m = np.asarray(k, dtype=float), np.asarray(m, dtype=float)
    a = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, beta_dist.ppf(a, np.maximum(k, 1), m - k + 1), 0.0)
        hi = np.where(k < m, beta_dist.ppf(1 - a, k + 1, np.maximum(m - k, 1)), 1.0)
    return lo, hi


def pair_accuracy(wins: int, ties: int, n: int, *, confidence: float = 0.9) -> dict:
    """Held-out pair accuracy of a learned guide (value model, ARM, PARM) with its exact interval and a verdict.

    Of ``n`` held-out pairs, ``wins`` are ordered like the reward and ``ties`` get equal scores. value =
    (wins + ties / 2) / n; the interval runs from the Clopper-Pearson lower bound of wins / n (ties counted
    wrong) to the upper bound of (wins + ties) / n (ties counted right), at ``confidence``. The pairs are taken
    as independent (one pair per held-out prompt; with more they share prompts and the interval is too narrow).
    verdict: "above chance" (lo > 0.5), "below chance" (hi < 0.5), "at chance" (the interval holds 0.5: the
    guide is not shown to have learned anything), "no held-out pairs" (n = 0).

    Returns {"value", "lo", "hi", "n_pairs", "wins", "ties", "verdict", "confidence"}.
    """
    if n <= 0:
        return {
            "value": None,
            "lo": None,
            "hi": None,
            "n_pairs": 0,
            "wins": 0,
            "ties": 0,
            "verdict": "no held-out pairs",
            "confidence": confidence,
        }
    if not (0 <= wins and 0 <= ties and wins + ties <= n):
        raise ValueError(f"need 0 <= wins, ties and wins + ties <= n, got wins {wins}, ties {ties}, n {n}")
    lo, _ = clopper_pearson(wins, n, confidence)
    _, hi = clopper_pearson(wins + ties, n, confidence)
    lo, hi = float(lo), float(hi)
    verdict = "above chance" if lo > 0.5 else ("below chance" if hi < 0.5 else "at chance")
    return {
        "value": (wins + 0.5 * ties) / n,
        "lo": lo,
        "hi": hi,
        "n_pairs": int(n),
        "wins": int(wins),
        "ties": int(ties),
        "verdict": verdict,
        "confidence": confidence,
    }


def degenerate_bounds(flags: np.ndarray, *, confidence: float = 0.9, target: float = 0.05) -> dict:
    """Exact binomial intervals of the share of degenerate responses at each preference, and the verdict on
    "at most ``target`` at every preference".

    flags: (P, N) 1.0 / 0.0 per response, NaN where decoding failed. Per preference p: k flagged of m decoded,
    ``rate`` k / m and the two-sided Clopper-Pearson interval [lo, hi] at ``confidence``
    (:func:`clopper_pearson`). The verdict: "holds" when every hi <= target (each upper bound fails with
    probability <= (1 - confidence) / 2, and the claim can only be wrongly accepted through a preference that
    truly exceeds the target); "fails" when some preference's simultaneous lower bound is above the target
    (intervals at 1 - (1 - confidence) / P, Bonferroni over the P preferences, so that a wrong "fails" has
    probability <= (1 - confidence) / 2); otherwise "no evidence". ``min_prompts`` is the smallest m whose
    interval for 0 flagged lies within the target: below it the claim cannot hold.

    Returns {"rate", "lo", "hi", "lo_simultaneous", "k", "m" (lists over P; None for a preference with no
    decoded response), "verdict", "worst", "min_prompts", "confidence", "target", "method"}.
    """
    F = np.asarray(flags, dtype=np.float64)
    if F.ndim != 2:
        raise ValueError(f"flags must be a (P, N) array, got shape {F.shape}")
    P = F.shape[0]
    m = np.sum(~np.isnan(F), axis=1)  # (P,)
    k = np.nansum(F, axis=1).astype(int)
    ok = m > 0
    mm = np.maximum(m, 1)
    lo, hi = clopper_pearson(k, mm, confidence)
    lo_sim, _ = clopper_pearson(k, mm, 1.0 - (1.0 - confidence) / P)

    def listed(x: np.ndarray) -> list:
        return [float(v) if o else None for v, o in zip(x, ok)]

    if (lo_sim[ok] > target).any():
        verdict = "fails"
    elif ok.any() and (hi[ok] <= target).all():
        verdict = "holds"
    else:
        verdict = "no evidence"
    tail = (1.0 - confidence) / 2.0
    # 0 of m flagged: Clopper-Pearson upper bound 1 - tail^(1/m) <= target  <=>  m >= log(tail) / log(1 - target)
    min_prompts = int(np.ceil(np.log(tail) / np.log1p(-target))) if 0 < target < 1 else None
    rate = listed(k / mm)
    return {
        "rate": rate,
        "lo": listed(lo),
        "hi": listed(hi),
        "lo_simultaneous": listed(lo_sim),
        "k": [int(v) for v in k],
        "m": [int(v) for v in m],
        "verdict": verdict,
        "worst": max((r for r in rate if r is not None), default=None),
        "min_prompts": min_prompts,
        "confidence": confidence,
        "target": target,
        "method": DEGENERATE_METHOD,
    }


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
    """Paired bootstrap intervals of HV and inner product for each method, HV ratios, and controllability bounds.

    per_prompt: method -> rewards (P, N, n), NaN for errored generations; mu: (P, n) preferences, row p
    used for row p of every array; ref_point: (n,), the same for every method. ``ratios`` lists pairs
    (a, b) for HV(a) / HV(b); ``holds`` is True when the whole interval lies above 1.

    Returns a JSON-serialisable dict: ``methods`` -> name -> {"hv", "inner_product": {"value", "lo", "hi"},
    "controllability": :func:`controllability_bounds` (value, lo, hi, literal, ...), "stderr": (P, n) list},
    ``ratios`` -> "a/b" -> {"value", "lo", "hi", "holds"}, and "confidence", "n_resamples", "n_prompts",
    "method", "control_method", "ref_point" (plus "note" when N < 2).
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
        out["methods"][name]["controllability"] = controllability_bounds(
            arrays[name], mu, confidence=confidence
        )
        out["methods"][name]["stderr"] = front_stderr(arrays[name]).tolist()
        k += len(METRICS)
    for a, b in ratios:
        r_lo, r_hi = _ratio(lo[k]), _ratio(hi[k])
        out["ratios"][f"{a}/{b}"] = {"value": _ratio(value[k]), "lo": r_lo, "hi": r_hi, "holds": r_lo > 1.0}
        k += 1
    out.update(
        confidence=confidence,
        n_resamples=n_resamples,
        n_prompts=N,
        method=METHOD,
        control_method=CONTROL_METHOD,
    )
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
    metric: one of "hv", "inner_product" (larger is better; controllability has no bootstrap, see
    :func:`controllability_bounds`).

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
