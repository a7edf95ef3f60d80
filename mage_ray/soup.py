"""Bone Soup coefficient math (Stage 1 of MAGE): B(beta), lambda = B^-1 mu, extrapolation, grids.

Equation numbers are those of MAGE (arXiv 2510.03782); "BS" marks Bone Soups (arXiv 2502.10762).

- Eq. 11: backbone i is trained on h_i = w_i^T r, w_i on the simplex.
- Eq. 12: B(beta) = [w_1 .. w_n], beta on the diagonal and (1-beta)/(n-1) elsewhere. Column i is w_i.
- Sec 3.3.5: mu = B lambda, so lambda = B^-1 mu. Because every column of B sums to 1, 1^T B^-1 = 1^T and
  sum_i lambda_i = sum_j mu_j = 1 always; individual lambda_i may be negative (extrapolation).
  Rewarded Soups is B = I (beta = 1): lambda = mu.
- Eq. 13: theta_b = (1 + alpha) theta_hat - alpha theta_sft. With theta_hat = theta_sft + sum_i lambda_i dtheta_i
  (LoRA deltas, sum lambda = 1) this is theta_b = theta_sft + (1 + alpha) sum_i lambda_i dtheta_i, so the scale
  on the deltas is (1 + alpha). The authors' code uses one factor k_j per objective mixed by mu:
  theta_b = sum_j mu_j (k_j theta_hat + (1 - k_j) theta_sft), i.e. scale sum_j k_j mu_j, k_j = 1 / (1 - a_j).
- Example 1 / Theorem 1 (Sec 3.3.2 and 4.1.1, BS Sec 2.2 and A.2): quadratic toy used by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "PreferenceError",
    "parse_preference",
    "backbone_weights",
    "bone_soup_solution",
    "circulant_matrix",
    "extrapolation_scale",
    "k_from_alpha",
    "merge_coefficients",
    "preference_grid",
    "quadratic_optimum",
    "quadratic_reward",
    "soup_coefficients",
    "theorem1_interval",
    "validate_preference",
    "EXAMPLE1_CENTERS",
    "EXAMPLE1_HESSIANS",
]


class PreferenceError(ValueError):
    """A preference vector mu is not a valid point of the probability simplex."""


def circulant_matrix(n: int, beta: float) -> np.ndarray:
    """B(beta) of Eq. 12: beta on the diagonal, (1 - beta) / (n - 1) off it. Shape (n, n).

    Column i is the reward weight w_i of backbone i (Eq. 11). For beta in (1/n, 1] the columns lie on the
    simplex and B is invertible: its eigenvalues are 1 (eigenvector 1) and (n beta - 1) / (n - 1) > 0.
    beta = 1 gives the identity (Rewarded Soups).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (number of objectives), got {n!r}")
    beta = float(beta)
    if not (math.isfinite(beta) and 1.0 / n < beta <= 1.0):
        raise ValueError(f"beta must lie in (1/n, 1] = ({1.0 / n:.4g}, 1] for n = {n}, got {beta}")
    off = (1.0 - beta) / (n - 1)
    B = np.full((n, n), off)  # (n, n)
    np.fill_diagonal(B, beta)
    return B


def backbone_weights(n: int, beta: float) -> list[np.ndarray]:
    """The reward weights w_1..w_n (columns of B(beta), Eq. 12), each shape (n,)."""
    B = circulant_matrix(n, beta)
    return [B[:, i].copy() for i in range(n)]


def parse_preference(text: str, name: str = "--preference") -> list[float]:
    """A preference as the command line spells it: ``0.3,0.7`` or ``[0.3, 0.7]`` -> [0.3, 0.7] (not yet checked
    against the simplex: :func:`validate_preference`); PreferenceError naming ``name`` when it is not numbers."""
    try:
        return [float(x) for x in str(text).strip().strip("[]").split(",")]
    except ValueError:
        raise PreferenceError(f"{name} {text!r}: expected comma-separated numbers, e.g. 0.3,0.7") from None


def validate_preference(
    mu: Sequence[float] | np.ndarray,
    n: int,
    *,
    normalize: bool = False,
    tol: float = 1e-6,
    name: str = "preference",
) -> np.ndarray:
    """Check mu is a length-n point of the simplex and return it as float64, shape (n,).

    With ``normalize=True`` a non-negative mu with positive sum is rescaled to sum 1 instead of rejected.
    Raises PreferenceError (a ValueError) naming ``name``, the bad entry and what is allowed.
    """
    arr = np.asarray(mu, dtype=np.float64)
    if arr.ndim != 1:
        raise PreferenceError(f"{name} must be a 1-D vector of {n} weights, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise PreferenceError(f"{name} has {arr.shape[0]} values but the bundle has {n} objectives")
    for i, v in enumerate(arr):
        if not math.isfinite(v):
            raise PreferenceError(f"{name}[{i}] = {v} is not finite")
    for i, v in enumerate(arr):
        if v < 0:
            raise PreferenceError(f"{name}[{i}] = {v:g} is negative; weights must be >= 0")
    total = float(arr.sum())
    if normalize:
        if total <= 0:
            raise PreferenceError(f"{name} sums to {total:g}; cannot normalize a zero vector")
        return arr / total
    if abs(total - 1.0) > tol:
        raise PreferenceError(f"{name} sums to {total:.6g}, expected 1 (pass normalize=True to rescale)")
    return arr.copy()


def _as_preference(mu: Sequence[float] | np.ndarray) -> np.ndarray:
    """validate_preference with n taken from mu itself (which must be 1-D)."""
    arr = np.asarray(mu, dtype=np.float64)
    if arr.ndim != 1:
        raise PreferenceError(f"preference must be a 1-D vector, got shape {arr.shape}")
    return validate_preference(arr, arr.shape[0])


def merge_coefficients(
    mu: Sequence[float] | np.ndarray, beta: float | None = None, B: np.ndarray | None = None
) -> np.ndarray:
    """lambda = B^-1 mu (Sec 3.3.5), shape (n,). Give exactly one of ``beta`` (B = B(beta)) or ``B``.

    Solved with ``np.linalg.solve`` (no explicit inverse). sum(lambda) = 1 for any B with unit column sums;
    entries may be negative. beta = 1 (B = I) is Rewarded Soups: lambda = mu.
    """
    if (beta is None) == (B is None):
        raise ValueError("merge_coefficients needs exactly one of beta or B")
    if B is None:
        mu_arr = _as_preference(mu)
        B = circulant_matrix(mu_arr.shape[0], beta)
    else:
        B = np.asarray(B, dtype=np.float64)
        if B.ndim != 2 or B.shape[0] != B.shape[1]:
            raise ValueError(f"B must be a square (n, n) matrix, got shape {B.shape}")
        if not np.all(np.isfinite(B)):
            raise ValueError("B has non-finite entries")
        mu_arr = validate_preference(mu, B.shape[0])
    try:
        return np.linalg.solve(B, mu_arr)  # (n,)
    except np.linalg.LinAlgError as err:
        raise ValueError(
            f"B is singular; the backbone weights w_i must be linearly independent: {err}"
        ) from err


def k_from_alpha(a: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
    """Per-objective extrapolation factor of the bone-soups code: k = 1 / (1 - a), a in [0, 1)."""
    arr = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr >= 1):
        raise ValueError(f"a must lie in [0, 1) for k = 1 / (1 - a), got {a!r}")
    k = 1.0 / (1.0 - arr)
    return float(k) if k.ndim == 0 else k


def extrapolation_scale(
    mu: Sequence[float] | np.ndarray, alpha: float | None = None, k: Sequence[float] | None = None
) -> float:
    """Scale on the merged LoRA deltas from Eq. 13. Give exactly one of ``alpha`` or ``k``.

    alpha: theta_b = theta_sft + (1 + alpha) sum_i lambda_i dtheta_i  ->  scale = 1 + alpha (alpha > -1).
    k (one factor per objective, authors' variant): scale = sum_j k_j mu_j; the SFT weight is
    sum_j (1 - k_j) mu_j = 1 - scale, which is implicit in the delta form.
    """
    if (alpha is None) == (k is None):
        raise ValueError("extrapolation_scale needs exactly one of alpha or k")
    mu_arr = _as_preference(mu)
    if alpha is not None:
        alpha = float(alpha)
        if not (math.isfinite(alpha) and alpha > -1.0):
            raise ValueError(f"alpha must be a finite number > -1 (Eq. 13), got {alpha}")
        return 1.0 + alpha
    k_arr = np.asarray(k, dtype=np.float64)
    if k_arr.shape != mu_arr.shape:
        raise ValueError(f"k has shape {k_arr.shape} but the preference has {mu_arr.shape[0]} objectives")
    if not np.all(np.isfinite(k_arr)) or np.any(k_arr <= 0):
        raise ValueError(f"k must be finite and > 0 per objective, got {k_arr.tolist()}")
    return float(k_arr @ mu_arr)


def soup_coefficients(
    mu: Sequence[float] | np.ndarray,
    beta: float,
    alpha: float | None = 0.0,
    k: Sequence[float] | None = None,
) -> np.ndarray:
    """Final per-adapter coefficients c = scale * B(beta)^-1 mu, shape (n,).

    The merged model is W0 + sum_i c_i dW_i (Eq. 6 + Eq. 13 on LoRA deltas). Passing ``k`` switches to the
    per-objective extrapolation; ``alpha`` must then be left at 0 / None.
    """
    if k is not None:
        if alpha not in (None, 0.0):
            raise ValueError("soup_coefficients: pass alpha or k, not both")
        alpha = None
    lam = merge_coefficients(mu, beta=beta)  # (n,)
    return extrapolation_scale(mu, alpha=alpha, k=k) * lam


def _compositions(total: int, parts: int):
    """All tuples of ``parts`` non-negative ints summing to ``total``, lexicographically ascending."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def preference_grid(n: int, step: float = 0.1) -> np.ndarray:
    """Simplex lattice: all mu with entries in {0, step, 2 step, ..., 1} summing to 1. Shape (P, n).

    P = C(m + n - 1, n - 1) with m = 1 / step (n=2, step 0.1: 11; n=3: 66). Rows are in lexicographic
    ascending order of (mu_0, mu_1, ...): for n = 2 they run (0, 1), (0.1, 0.9), ..., (1, 0). Values are
    rounded to 12 decimals so 0.1 * 3 reads 0.3. 1 / step must be an integer (within 1e-9).

    These are pymoo's Das-Dennis reference directions (``get_reference_directions("das-dennis", n,
    n_partitions=m)``), in the same order and equal where 1/step is a decimal fraction (tests/test_soup.py); ours
    are kept because pymoo's differ by ~3e-13 for steps like 1/3 (we round to 12 decimals, so reports and JSON
    read 0.333333333333) and pymoo is a test-only dependency.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (number of objectives), got {n!r}")
    step = float(step)
    if not (math.isfinite(step) and 0.0 < step <= 1.0):
        raise ValueError(f"step must lie in (0, 1], got {step}")
    m = round(1.0 / step)
    if abs(m * step - 1.0) > 1e-9:
        raise ValueError(
            f"step must divide 1 exactly (1/step an integer), got step = {step} (1/step = {1 / step})"
        )
    counts = np.array(list(_compositions(m, n)), dtype=np.float64)  # (P, n)
    return np.round(counts / m, 12)


# ----- Example 1 and Theorem 1: quadratic rewards r_j(theta) = -(theta - c_j)^T H_j (theta - c_j) -----

EXAMPLE1_HESSIANS = np.array([np.diag([1.0, 1.0]), np.diag([1.0, 4.0])])  # (2, 2, 2), Eq. 9-10
"""H_j of r1 = -(x-1)^2 - (y-1)^2 and r2 = -(x-3)^2 - 4(y+1)^2."""
EXAMPLE1_CENTERS = np.array([[1.0, 1.0], [3.0, -1.0]])  # (2, 2): argmax of r1, r2
"""c_j, the maximisers theta_1 = (1, 1) and theta_2 = (3, -1)."""


def quadratic_reward(theta: np.ndarray, hessian: np.ndarray, center: np.ndarray) -> float:
    """r(theta) = -(theta - c)^T H (theta - c); theta, c shape (d,), H shape (d, d)."""
    diff = np.asarray(theta, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    return float(-diff @ np.asarray(hessian, dtype=np.float64) @ diff)


def quadratic_optimum(
    hessians: np.ndarray, centers: np.ndarray, w: Sequence[float] | np.ndarray
) -> np.ndarray:
    """argmax_theta sum_j w_j r_j(theta) for quadratic rewards, shape (d,).

    Setting the gradient -2 sum_j w_j H_j (theta - c_j) to zero gives
    theta* = (sum_j w_j H_j)^-1 sum_j w_j H_j c_j. hessians (n, d, d) positive definite, centers (n, d),
    w (n,) non-negative and not all zero.
    """
    H = np.asarray(hessians, dtype=np.float64)  # (n, d, d)
    C = np.asarray(centers, dtype=np.float64)  # (n, d)
    w_arr = np.asarray(w, dtype=np.float64)  # (n,)
    if H.ndim != 3 or H.shape[1] != H.shape[2] or C.shape != H.shape[:2] or w_arr.shape != H.shape[:1]:
        raise ValueError(
            f"need hessians (n, d, d), centers (n, d), w (n,); got {H.shape}, {C.shape}, {w_arr.shape}"
        )
    if np.any(w_arr < 0) or w_arr.sum() <= 0:
        raise ValueError(f"w must be non-negative with a positive sum, got {w_arr.tolist()}")
    A = np.einsum("j,jab->ab", w_arr, H)  # (d, d)
    b = np.einsum("j,jab,jb->a", w_arr, H, C)  # (d,)
    return np.linalg.solve(A, b)


def bone_soup_solution(
    hessians: np.ndarray, centers: np.ndarray, mu: Sequence[float] | np.ndarray, beta: float
) -> tuple[np.ndarray, np.ndarray]:
    """Bone Soup on quadratic rewards: backbones theta_i^bone = argmax w_i^T r, merged with lambda = B^-1 mu.

    Returns (merged theta (d,), backbones (n, d)); backbone i is trained on column i of B(beta).
    beta = 1 gives the soup-like (Rewarded Soups) solution sum_i mu_i theta_i.
    """
    n = np.asarray(centers).shape[0]
    backbones = np.stack(
        [quadratic_optimum(hessians, centers, w) for w in backbone_weights(n, beta)]
    )  # (n, d)
    lam = merge_coefficients(mu, beta=beta)  # (n,)
    return lam @ backbones, backbones


def theorem1_interval(beta: float) -> tuple[float, float]:
    """Preference interval of Theorem 1 (Sec 4.1.1; BS A.2) where Bone Soup beats the soup for mu = (m, 1-m).

    For r_i = r_i(theta_i) - k_i ||theta - theta_i||^2 (k_1 != k_2 > 0), B = [[beta, 1-beta], [1-beta, beta]],
    beta in (1/2, 1): g_mu(theta_soup) < g_mu(theta_bone) for every m in ((1 - s) / 2, (1 + s) / 2),
    s = sqrt(2 beta^2 - 2 beta + 1) >= sqrt(2)/2. (The proof's factorisation (beta - mu^2)(...) has a typo:
    [(1-m)m]^2 - [(beta-m)(beta+m-1)]^2 = beta (1 - beta)(-2m^2 + 2m + beta^2 - beta); the interval is the same.)
    """
    beta = float(beta)
    if not (math.isfinite(beta) and 0.5 < beta < 1.0):
        raise ValueError(f"beta must lie in the open interval (1/2, 1) for Theorem 1, got {beta}")
    s = math.sqrt(2 * beta**2 - 2 * beta + 1)
    return (1 - s) / 2, (1 + s) / 2
