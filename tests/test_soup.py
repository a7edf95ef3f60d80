"""Tests for mage_ray.soup: B(beta), lambda = B^-1 mu, extrapolation, grids, Example 1, Theorem 1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mage_ray.soup import (
    EXAMPLE1_CENTERS,
    EXAMPLE1_HESSIANS,
    PreferenceError,
    backbone_weights,
    bone_soup_solution,
    circulant_matrix,
    extrapolation_scale,
    k_from_alpha,
    merge_coefficients,
    preference_grid,
    quadratic_optimum,
    quadratic_reward,
    soup_coefficients,
    theorem1_interval,
    validate_preference,
)

# ----- B(beta), Eq. 12 -----


def test_circulant_matrix_values():
    """n=3, beta=0.6: diagonal 0.6, off-diagonal (1-0.6)/2 = 0.2."""
    B = circulant_matrix(3, 0.6)
    np.testing.assert_allclose(B, [[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]])


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("frac", [0.01, 0.5, 0.99, 1.0])
def test_circulant_matrix_columns_on_simplex_and_invertible(n, frac):
    """Columns sum to 1 and are >= 0; eigenvalues are 1 and (n beta - 1)/(n - 1) > 0."""
    beta = 1 / n + frac * (1 - 1 / n)
    B = circulant_matrix(n, beta)
    np.testing.assert_allclose(B.sum(axis=0), 1.0)
    assert np.all(B >= 0)
    eig = np.sort(np.linalg.eigvalsh(B))
    np.testing.assert_allclose(eig[0], (n * beta - 1) / (n - 1), atol=1e-12)
    assert eig[0] > 0
    for i, w in enumerate(backbone_weights(n, beta)):
        np.testing.assert_array_equal(w, B[:, i])


def test_circulant_matrix_beta_one_is_identity():
    np.testing.assert_array_equal(circulant_matrix(4, 1.0), np.eye(4))


@pytest.mark.parametrize("n,beta", [(2, 0.5), (3, 1 / 3), (2, 1.2), (2, float("nan")), (3, 0.2)])
def test_circulant_matrix_rejects_beta(n, beta):
    with pytest.raises(ValueError, match=r"beta must lie in \(1/n, 1\]"):
        circulant_matrix(n, beta)


@pytest.mark.parametrize("n", [1, 0, 2.0, True])
def test_circulant_matrix_rejects_n(n):
    with pytest.raises(ValueError, match="n must be an integer >= 2"):
        circulant_matrix(n, 0.9)


# ----- preferences -----


def test_validate_preference_ok_and_normalize():
    np.testing.assert_allclose(validate_preference([0.3, 0.7], 2), [0.3, 0.7])
    np.testing.assert_allclose(validate_preference([1, 3], 2, normalize=True), [0.25, 0.75])


@pytest.mark.parametrize(
    "mu,msg",
    [
        ([0.2, 0.3, 0.5], "preference has 3 values but the bundle has 2 objectives"),
        ([0.5, float("nan")], r"preference\[1\] = nan is not finite"),
        ([-0.1, 1.1], r"preference\[0\] = -0.1 is negative"),
        ([0.4, 0.5], r"preference sums to 0.9, expected 1 \(pass normalize=True to rescale\)"),
        ([[0.5, 0.5]], "must be a 1-D vector"),
    ],
)
def test_validate_preference_errors(mu, msg):
    with pytest.raises(PreferenceError, match=msg):
        validate_preference(mu, 2)
    assert issubclass(PreferenceError, ValueError)


def test_validate_preference_normalize_zero_and_name():
    with pytest.raises(PreferenceError, match="mu sums to 0"):
        validate_preference([0.0, 0.0], 2, normalize=True, name="mu")


# ----- lambda = B^-1 mu -----


def test_merge_coefficients_rewarded_soups_is_mu():
    """beta = 1 (B = I): lambda = mu."""
    np.testing.assert_allclose(merge_coefficients([0.3, 0.7], beta=1.0), [0.3, 0.7])


def test_merge_coefficients_two_objectives_closed_form():
    """n=2: lambda_1 = (beta + mu - 1)/(2 beta - 1) (Theorem 1 proof). beta=0.8, mu=0.5 -> 0.5;
    mu=0.9 -> 0.7/0.6 = 7/6, lambda_2 = -1/6 (extrapolation, negative coefficient)."""
    np.testing.assert_allclose(merge_coefficients([0.5, 0.5], beta=0.8), [0.5, 0.5])
    np.testing.assert_allclose(merge_coefficients([0.9, 0.1], beta=0.8), [7 / 6, -1 / 6])


def test_merge_coefficients_inverts_B_and_sums_to_one():
    rng = np.random.default_rng(0)
    for n in (2, 3, 4):
        for _ in range(20):
            mu = rng.dirichlet(np.ones(n))
            beta = rng.uniform(1 / n + 0.01, 1.0)
            lam = merge_coefficients(mu, beta=beta)
            np.testing.assert_allclose(circulant_matrix(n, beta) @ lam, mu, atol=1e-12)
            assert math.isclose(lam.sum(), 1.0, abs_tol=1e-12)
            np.testing.assert_allclose(merge_coefficients(mu, B=circulant_matrix(n, beta)), lam)


def test_merge_coefficients_mu_equal_to_backbone_weight_selects_that_backbone():
    """mu = w_2 = (0.4, 0.6) with beta = 0.6 -> lambda = (0, 1) (Example 1, mu')."""
    np.testing.assert_allclose(merge_coefficients([0.4, 0.6], beta=0.6), [0.0, 1.0], atol=1e-12)


def test_merge_coefficients_errors():
    with pytest.raises(ValueError, match="exactly one of beta or B"):
        merge_coefficients([0.5, 0.5])
    with pytest.raises(ValueError, match="exactly one of beta or B"):
        merge_coefficients([0.5, 0.5], beta=0.7, B=np.eye(2))
    with pytest.raises(ValueError, match="singular"):
        merge_coefficients([0.5, 0.5], B=np.ones((2, 2)) / 2)
    with pytest.raises(PreferenceError, match="has 2 values but the bundle has 3"):
        merge_coefficients([0.5, 0.5], B=np.eye(3))


# ----- extrapolation, Eq. 13 -----


def test_extrapolation_scale_alpha():
    """Eq. 13: scale on the deltas is 1 + alpha."""
    assert extrapolation_scale([0.5, 0.5], alpha=0.3) == pytest.approx(1.3)
    assert extrapolation_scale([0.5, 0.5], alpha=0.0) == 1.0


def test_extrapolation_scale_k_matches_full_weight_formula():
    """Per-objective: theta_b = sum_j mu_j (k_j theta_hat + (1 - k_j) theta_sft). With a = (0.2, 0.5),
    k = (1.25, 2), mu = (0.4, 0.6): scale = 0.5 + 1.2 = 1.7, SFT weight 1 - 1.7 = -0.7."""
    k = k_from_alpha([0.2, 0.5])
    np.testing.assert_allclose(k, [1.25, 2.0])
    mu = np.array([0.4, 0.6])
    scale = extrapolation_scale(mu, k=k)
    assert scale == pytest.approx(1.7)
    rng = np.random.default_rng(1)
    theta_sft, theta_hat = rng.normal(size=5), rng.normal(size=5)
    full = sum(mu[j] * (k[j] * theta_hat + (1 - k[j]) * theta_sft) for j in range(2))
    np.testing.assert_allclose(full, theta_sft + scale * (theta_hat - theta_sft))


def test_extrapolation_scale_errors():
    with pytest.raises(ValueError, match="exactly one of alpha or k"):
        extrapolation_scale([0.5, 0.5])
    with pytest.raises(ValueError, match="exactly one of alpha or k"):
        extrapolation_scale([0.5, 0.5], alpha=0.1, k=[1.0, 1.0])
    with pytest.raises(ValueError, match="alpha must be a finite number > -1"):
        extrapolation_scale([0.5, 0.5], alpha=-1.0)
    with pytest.raises(ValueError, match="k has shape"):
        extrapolation_scale([0.5, 0.5], k=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"a must lie in \[0, 1\)"):
        k_from_alpha(1.0)


def test_soup_coefficients_equals_weight_space_merge():
    """c = (1 + alpha) B^-1 mu; applying c to deltas equals Eq. 13 on the weight-space merge Eq. 6."""
    mu, beta, alpha = np.array([0.2, 0.3, 0.5]), 0.7, 0.25
    c = soup_coefficients(mu, beta, alpha=alpha)
    lam = merge_coefficients(mu, beta=beta)
    np.testing.assert_allclose(c, 1.25 * lam)
    rng = np.random.default_rng(2)
    theta_sft = rng.normal(size=4)
    thetas = theta_sft + rng.normal(size=(3, 4))  # backbone full weights
    theta_hat = lam @ thetas  # Eq. 6
    theta_b = (1 + alpha) * theta_hat - alpha * theta_sft  # Eq. 13
    np.testing.assert_allclose(theta_sft + c @ (thetas - theta_sft), theta_b)
    np.testing.assert_allclose(soup_coefficients(mu, 1.0), mu)  # Rewarded Soups
    np.testing.assert_allclose(soup_coefficients(mu, beta, k=[2.0, 1.0, 1.0]), 1.2 * lam)
    with pytest.raises(ValueError, match="alpha or k, not both"):
        soup_coefficients(mu, beta, alpha=0.1, k=[1.0, 1.0, 1.0])


# ----- preference grid -----


def test_preference_grid_two_objectives():
    """n=2, step 0.1: 11 rows (0, 1), (0.1, 0.9), ..., (1, 0), exact decimals."""
    g = preference_grid(2, 0.1)
    assert g.shape == (11, 2)
    expected = np.array([[i / 10, 1 - i / 10] for i in range(11)]).round(12)
    np.testing.assert_array_equal(g, expected)
    assert g[3, 0] == 0.3 and g[3, 1] == 0.7


def test_preference_grid_three_objectives():
    """n=3, step 0.1: C(12, 2) = 66 distinct simplex points, lexicographic order."""
    g = preference_grid(3, 0.1)
    assert g.shape == (66, 3)
    np.testing.assert_allclose(g.sum(axis=1), 1.0, atol=1e-12)
    assert len({tuple(r) for r in g}) == 66
    np.testing.assert_array_equal(g[0], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(g[-1], [1.0, 0.0, 0.0])
    assert [tuple(r) for r in g] == sorted(tuple(r) for r in g)
    assert preference_grid(3, 0.25).shape == (15, 3)
    assert preference_grid(4, 0.5).shape == (10, 4)


@pytest.mark.parametrize("step", [0.3, 0.0, 1.5, -0.1])
def test_preference_grid_rejects_step(step):
    with pytest.raises(ValueError, match="step"):
        preference_grid(2, step)


# ----- Example 1 (Sec 3.3.2, BS Sec 2.2) -----


def test_example1_exact_optimum():
    """argmax 0.5 r1 + 0.5 r2: x = (0.5*1 + 0.5*3)/1 = 2, y = (0.5*1 - 0.5*4)/(0.5 + 2) = -0.6."""
    np.testing.assert_allclose(quadratic_optimum(EXAMPLE1_HESSIANS, EXAMPLE1_CENTERS, [0.5, 0.5]), [2, -0.6])


def test_example1_rewarded_soup():
    """Single-reward optima (1, 1) and (3, -1); the soup 0.5 theta_1 + 0.5 theta_2 = (2, 0)."""
    merged, experts = bone_soup_solution(EXAMPLE1_HESSIANS, EXAMPLE1_CENTERS, [0.5, 0.5], beta=1.0)
    np.testing.assert_allclose(experts, [[1, 1], [3, -1]])
    np.testing.assert_allclose(merged, [2, 0], atol=1e-12)


def test_example1_bone_soup():
    """beta=0.6: column w_1 = (0.6, 0.4) gives (1.8, -5/11) (the paper's h_2, 'prefer objective 1');
    w_2 = (0.4, 0.6) gives (2.2, -5/7) (paper's h_1). lambda = B^-1 (0.5, 0.5) = (0.5, 0.5), so the merge is
    (2, -(5/7 + 5/11)/2) = (2, -45/77) ~ (2, -0.584), closer to (2, -0.6) than the soup (2, 0)."""
    merged, bones = bone_soup_solution(EXAMPLE1_HESSIANS, EXAMPLE1_CENTERS, [0.5, 0.5], beta=0.6)
    np.testing.assert_allclose(bones, [[1.8, -5 / 11], [2.2, -5 / 7]])
    np.testing.assert_allclose(merged, [2, -45 / 77])
    assert abs(merged[1] - (-0.58)) < 0.005
    exact = np.array([2, -0.6])
    assert np.linalg.norm(merged - exact) < np.linalg.norm(np.array([2, 0]) - exact)


def test_example1_mu_prime_recovers_backbone_exactly():
    """mu' = (0.4, 0.6) = w_2: lambda = (0, 1) and the merge is the optimum of g_mu' itself."""
    merged, bones = bone_soup_solution(EXAMPLE1_HESSIANS, EXAMPLE1_CENTERS, [0.4, 0.6], beta=0.6)
    exact = quadratic_optimum(EXAMPLE1_HESSIANS, EXAMPLE1_CENTERS, [0.4, 0.6])
    np.testing.assert_allclose(merged, exact, atol=1e-12)
    np.testing.assert_allclose(merged, bones[1], atol=1e-12)


def test_quadratic_helpers():
    assert quadratic_reward([2.0, 0.0], EXAMPLE1_HESSIANS[1], EXAMPLE1_CENTERS[1]) == -(1 + 4)
    with pytest.raises(ValueError, match="non-negative"):
        quadratic_optimum(EXAMPLE1_HESSIANS, EXAMPLE1_CENTERS, [-1.0, 2.0])


# ----- Theorem 1 (Sec 4.1.1, BS A.2) -----


def _g(theta, hessians, centers, mu):
    """Testing reward g_mu = sum_j mu_j r_j (Eq. 5); the r_j(theta_j) constants cancel in comparisons."""
    return sum(m * quadratic_reward(theta, H, c) for m, H, c in zip(mu, hessians, centers, strict=True))


def test_theorem1_interval_values():
    """beta=0.6: s = sqrt(0.72 - 1.2 + 1) = sqrt(0.52), interval ((1-s)/2, (1+s)/2) ~ (0.1394, 0.8606)."""
    lo, hi = theorem1_interval(0.6)
    s = math.sqrt(0.52)
    assert (lo, hi) == pytest.approx(((1 - s) / 2, (1 + s) / 2))
    for beta in np.linspace(0.501, 0.999, 50):
        lo, hi = theorem1_interval(beta)
        assert hi - lo >= math.sqrt(2) / 2 - 1e-12 and 0 < lo < hi < 1
    with pytest.raises(ValueError, match=r"\(1/2, 1\)"):
        theorem1_interval(1.0)


def test_theorem1_bone_soup_beats_soup_inside_interval():
    """For r_i = -k_i ||theta - theta_i||^2 (k_1 != k_2), beta in (1/2, 1), mu = (m, 1-m) with m strictly
    inside theorem1_interval(beta): g_mu(theta_soup) < g_mu(theta_bone). 300 random cases x 15 m each.
    Also checks the proof's closed forms E(beta, m) and E(1, m) against the numerical merges."""
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        d = int(rng.integers(1, 5))
        k1 = rng.uniform(0.1, 10.0)
        ratio = rng.uniform(1.05, 20.0)  # k1 != k2, either one larger
        k2 = k1 * ratio if rng.random() < 0.5 else k1 / ratio
        beta = rng.uniform(0.505, 0.995)
        centers = rng.normal(scale=3.0, size=(2, d))
        hessians = np.stack([k1 * np.eye(d), k2 * np.eye(d)])
        lo, hi = theorem1_interval(beta)
        for m in np.linspace(lo, hi, 17)[1:-1]:
            mu = np.array([m, 1 - m])
            soup, _ = bone_soup_solution(hessians, centers, mu, beta=1.0)
            bone, _ = bone_soup_solution(hessians, centers, mu, beta=beta)
            exact = quadratic_optimum(hessians, centers, mu)
            g_soup, g_bone = _g(soup, hessians, centers, mu), _g(bone, hessians, centers, mu)
            assert g_soup < g_bone, (k1, k2, beta, m)
            # closed forms from the proof
            dist2 = float(np.sum((centers[0] - centers[1]) ** 2))
            den = (m * k1 + (1 - m) * k2) * (beta * k1 + (1 - beta) * k2) * ((1 - beta) * k1 + beta * k2)
            e_bone = (k1 * k2 * (k1 - k2) * (beta - m) * (beta + m - 1) / den) ** 2 * dist2
            e_soup = ((k1 - k2) * (1 - m) * m / (m * k1 + (1 - m) * k2)) ** 2 * dist2
            assert np.sum((bone - exact) ** 2) == pytest.approx(e_bone, rel=1e-7, abs=1e-12)
            assert np.sum((soup - exact) ** 2) == pytest.approx(e_soup, rel=1e-7, abs=1e-12)
            checked += 1
    assert checked == 300 * 15


def test_theorem1_interval_is_not_vacuous():
    """Outside the interval the soup can win: k = (1, 1.1), beta = 0.6, m = 0.05 < 0.139. There
    |(beta - m)(beta + m - 1)| = 0.55 * 0.35 = 0.1925 > m(1 - m) = 0.0475 and k1 k2 / den ~ 1."""
    hessians = np.stack([np.eye(2), 1.1 * np.eye(2)])
    centers = np.array([[0.0, 0.0], [1.0, 2.0]])
    mu = np.array([0.05, 0.95])
    assert mu[0] < theorem1_interval(0.6)[0]
    soup, _ = bone_soup_solution(hessians, centers, mu, beta=1.0)
    bone, _ = bone_soup_solution(hessians, centers, mu, beta=0.6)
    assert _g(soup, hessians, centers, mu) > _g(bone, hessians, centers, mu)


@pytest.mark.parametrize("n, m", [(2, 10), (3, 10), (3, 4), (4, 5), (2, 3), (3, 6), (2, 7)])
def test_preference_grid_is_pymoos_das_dennis(n, m):
    """The simplex lattice equals pymoo's Das-Dennis reference directions, row for row: exactly where 1/m is a
    decimal fraction, within 1e-12 elsewhere (ours are rounded to 12 decimals; the reason we keep our own)."""
    from pymoo.util.ref_dirs import get_reference_directions

    from mage_ray.soup import preference_grid

    ours, theirs = preference_grid(n, 1.0 / m), get_reference_directions("das-dennis", n, n_partitions=m)
    assert ours.shape == theirs.shape
    if m in (2, 4, 5, 10):
        assert np.array_equal(ours, theirs)
    else:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        assert not np.array_equal(ours, theirs)
