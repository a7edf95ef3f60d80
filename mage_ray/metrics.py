"""Front metrics of MAGE Sec 5.4 (and BS Appendix): HV, inner product, sparsity, spacing, controllability, front.

Inputs: ``R`` (P, n) mean rewards, one row per preference, and ``mu`` (P, n) the preferences, row p of ``R``
produced under row p of ``mu``. Every objective is maximised. Rows are expected in preference-grid order
(``soup.preference_grid``), which is the order Sparsity (Eq. 29) walks.

- HV: volume dominated by the rows above a fixed reference point (same point for every method of a task).
- Inner product: mean_p mu_p . R_p.
- Sparsity (Eq. 29): 1/(N-1) sum_{i=2}^N ||r_i - r_{i-1}||^2 over consecutive preferences.
- Spacing (Eq. 30): sqrt(1/N sum_i (d_i - dbar)^2), d_i = min_{j != i} ||r_i - r_j||_2.
- Controllability (Definition 1, Sec 4.2.3): fraction of ordered pairs whose reward signs follow mu's, in two
  readings: ``controllability_literal`` (Definition 1 as written: an objective whose weight is the same in both
  preferences counts only where its rewards are exactly equal) and ``controllability`` (the same indicator over
  the objectives whose weight changes). They agree for n = 2 on a grid; for n >= 3 the literal reading cannot
  reach 1 for any method whose rewards carry noise (on the 15-point 3-objective grid only 45 of the 105 pairs
  change all three weights, so a perfectly ordered front with noise scores 45/105 = 0.429; 0.224 on the
  35-point 4-objective grid). Reports give both; claims use ``controllability``.
- Length of front: number of non-dominated rows.

MAGE = "Merge and Guide: Unifying Model Merging and Guided Decoding for Controllable Multi-Objective
Generation" (arXiv 2510.03782).
"""

from __future__ import annotations

from collections.abc import Sequence

import moocore
import numpy as np

from mage_ray.soup import validate_preference

__all__ = [
    "all_metrics",
    "controllability",
    "controllability_changed",
    "default_reference_point",
    "front_length",
    "hypervolume",
    "inner_product",
    "pareto_mask",
    "sparsity",
    "spacing",
]


def _check_rewards(
    R: np.ndarray | Sequence[Sequence[float]], name: str = "R", min_rows: int = 1
) -> np.ndarray:
    """R as float64 (P, n) with P >= min_rows, n >= 1, all finite."""
    arr = np.asarray(R, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array (P preferences, n objectives), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows (solutions), got {arr.shape[0]}")
    bad = np.argwhere(~np.isfinite(arr))
    if bad.size:
        p, j = bad[0]
        raise ValueError(f"{name}[{p}, {j}] = {arr[p, j]} is not finite")
    return arr


def _check_mu(mu: np.ndarray | Sequence[Sequence[float]], R: np.ndarray) -> np.ndarray:
    """mu as float64 with the shape of R and every row on the simplex."""
    arr = np.asarray(mu, dtype=np.float64)
    if arr.shape != R.shape:
        raise ValueError(f"mu must have the shape of R {R.shape} (one preference per row), got {arr.shape}")
    for p in range(arr.shape[0]):
        validate_preference(arr[p], R.shape[1], name=f"mu[{p}]")
    return arr


def _check_ref(ref_point: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    if ref_point is None:
        raise ValueError("ref_point is required (one value per objective); see default_reference_point()")
    ref = np.asarray(ref_point, dtype=np.float64)
    if ref.shape != (n,):
        raise ValueError(f"ref_point must have {n} values (one per objective), got shape {ref.shape}")
    if not np.all(np.isfinite(ref)):
        raise ValueError(f"ref_point must be finite, got {ref.tolist()}")
    return ref


def hypervolume(R: np.ndarray | Sequence[Sequence[float]], ref_point: Sequence[float] | np.ndarray) -> float:
    """Hypervolume dominated by the rows of R (maximised) and bounded below by ``ref_point``, shape (n,).

    Rows that do not strictly dominate ref_point contribute nothing. moocore computes it (``maximise=True``).
    """
    R = _check_rewards(R)
    ref = _check_ref(ref_point, R.shape[1])
    R = R[np.all(R > ref, axis=1)]  # (P', n)
    if R.shape[0] == 0:
        return 0.0
    if R.shape[1] == 1:
        return float(R[:, 0].max() - ref[0])
    return float(moocore.hypervolume(R, ref=ref, maximise=True))


def inner_product(
    R: np.ndarray | Sequence[Sequence[float]], mu: np.ndarray | Sequence[Sequence[float]]
) -> float:
    """mean_p mu_p . R_p (Sec 5.4): the average testing reward g_mu (Eq. 5) over the grid."""
    R = _check_rewards(R)
    mu = _check_mu(mu, R)
    return float(np.mean(np.sum(mu * R, axis=1)))


def sparsity(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Eq. 29: 1/(N-1) sum_{i=2}^N ||r_i - r_{i-1}||_2^2, rows in preference order (consecutive preferences).

    The paper walks "solutions corresponding to the consecutive preference vectors", so rows are not
    re-sorted and dominated rows are kept. Needs N >= 2.
    """
    R = _check_rewards(R, min_rows=2)
    diffs = np.diff(R, axis=0)  # (N-1, n)
    return float(np.mean(np.sum(diffs**2, axis=1)))


def spacing(R: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Eq. 30: sqrt(1/N sum_i (d_i - dbar)^2) with d_i = min_{j != i} ||r_i - r_j||_2 and dbar = mean d_i.

    Euclidean distance as written in Eq. 30 (Schott's original uses L1) and the population (1/N) std, over
    all N rows. Needs N >= 2.
    """
    R = _check_rewards(R, min_rows=2)
    dist = np.linalg.norm(R[:, None, :] - R[None, :, :], axis=-1)  # (N, N)
    np.fill_diagonal(dist, np.inf)
    d = dist.min(axis=1)  # (N,)
    return float(np.sqrt(np.mean((d - d.mean()) ** 2)))


def controllability(
    R: np.ndarray | Sequence[Sequence[float]],
    mu: np.ndarray | Sequence[Sequence[float]],
    *,
    skip_equal_preference: bool = False,
) -> float:
    """Definition 1: K = 1/(N(N-1)) sum_{i != j} 1[for all k: sgn(mu_ik - mu_jk) = sgn(R_ik - R_jk)].

    Literal reading (default): sgn(0) = 0, so an objective whose preference is unchanged (|dmu| <= 1e-12)
    counts only if its rewards are exactly equal, and a reward tie under a changed preference fails.
    With n = 2 on a grid every pair of distinct preferences changes both entries, so this never bites; with
    n >= 3 ``skip_equal_preference=True`` ignores the objectives whose preference is unchanged instead.
    The indicator is symmetric in (i, j), so K is also the fraction of unordered pairs. Needs N >= 2.
    """
    R = _check_rewards(R, min_rows=2)
    mu = _check_mu(mu, R)
    dmu = mu[:, None, :] - mu[None, :, :]  # (N, N, n)
    s_mu = np.where(np.abs(dmu) <= 1e-12, 0.0, np.sign(dmu))
    s_r = np.sign(R[:, None, :] - R[None, :, :])  # (N, N, n)
    agree = s_mu == s_r
    if skip_equal_preference:
        agree |= s_mu == 0
    ok = np.all(agree, axis=-1)  # (N, N)
    N = R.shape[0]
    ok[np.arange(N), np.arange(N)] = False
    return float(ok.sum() / (N * (N - 1)))


def controllability_changed(
    R: np.ndarray | Sequence[Sequence[float]], mu: np.ndarray | Sequence[Sequence[float]]
) -> float:
    """Controllability over the objectives whose weight changes: Definition 1's indicator with every k where
    mu_ik = mu_jk left out (``controllability(..., skip_equal_preference=True)``). A front whose rewards
    rise strictly with each weight scores 1 at any n, whatever its noise in the objectives a pair leaves alone."""
    return controllability(R, mu, skip_equal_preference=True)


def pareto_mask(R: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Bool (P,): True where no other row dominates (>= in every objective and > in one). Duplicates stay."""
    R = _check_rewards(R)
    return np.asarray(moocore.is_nondominated(R, maximise=True, keep_weakly=True), dtype=bool)


def front_length(R: np.ndarray | Sequence[Sequence[float]]) -> int:
    """Length of front (Sec 5.4): the number of non-dominated rows of R (identical rows each count)."""
    return int(pareto_mask(R).sum())


def default_reference_point(R_all: Sequence[np.ndarray] | np.ndarray, margin: float = 0.1) -> np.ndarray:
    """A reference point strictly below every observed reward: ref_j = min_j - margin * span_j, shape (n,).

    min_j / span_j are the minimum and the range (max - min) of objective j over all rows of all arrays
    (pass every method's R for a task so HV compares like with like; store the result with the task).
    A zero span is replaced by max(|min_j|, 1). margin must be > 0.
    """
    arrays = [R_all] if isinstance(R_all, np.ndarray) and R_all.ndim == 2 else list(R_all)
    if not arrays:
        raise ValueError("R_all must hold at least one (P, n) reward array")
    stacked = [_check_rewards(a, name=f"R_all[{i}]") for i, a in enumerate(arrays)]
    widths = {a.shape[1] for a in stacked}
    if len(widths) != 1:
        raise ValueError(f"R_all arrays disagree on the number of objectives: {sorted(widths)}")
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0, got {margin}")
    allr = np.concatenate(stacked, axis=0)  # (sum P, n)
    lo, hi = allr.min(axis=0), allr.max(axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1.0))
    return lo - margin * span


def all_metrics(
    R: np.ndarray | Sequence[Sequence[float]],
    mu: np.ndarray | Sequence[Sequence[float]],
    ref_point: Sequence[float] | np.ndarray,
) -> dict:
    """Every Sec 5.4 metric for one method: keys hv, inner_product, sparsity, spacing, controllability (over the
    objectives whose weight changes: :func:`controllability_changed`), controllability_literal (Definition 1 as
    written), front_length, ref_point (the list used, so reports record it)."""
    R = _check_rewards(R, min_rows=2)
    ref = _check_ref(ref_point, R.shape[1])
    return {
        "hv": hypervolume(R, ref),
        "inner_product": inner_product(R, mu),
        "sparsity": sparsity(R),
        "spacing": spacing(R),
        "controllability": controllability_changed(R, mu),
        "controllability_literal": controllability(R, mu),
        "front_length": front_length(R),
        "ref_point": [float(v) for v in ref],
    }
