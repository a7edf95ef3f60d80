"""Tests for mage_ray.metrics (MAGE Sec 5.4, Eq. 29-30, Definition 1). Expectations are hand-computed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mage_ray.metrics import (
    all_metrics,
    controllability,
    controllability_changed,
    default_reference_point,
    front_length,
    hypervolume,
    inner_product,
    pareto_mask,
    spacing,
    sparsity,
)
from mage_ray.soup import PreferenceError, preference_grid

MU3 = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
R3 = np.array([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])  # reward 0 rises and reward 1 falls with mu_0

# ----- hypervolume -----


def test_hypervolume_staircase_2d():
    """Points (1,3), (2,2), (3,1), ref (0,0): union of 1x3, 2x2, 3x1 rectangles = 3 + 2*1 + 1*1 = 6."""
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)


def test_hypervolume_ignores_points_not_dominating_ref_and_dominated_points():
    """Adding (0.5, 0.5) (dominated), (-1, 10) and (5, 0) (not strictly above ref (0,0)) keeps HV = 6."""
    R = [[1, 3], [2, 2], [3, 1], [0.5, 0.5], [-1, 10], [5, 0]]
    assert hypervolume(R, [0, 0]) == pytest.approx(6.0)
    assert hypervolume([[-1, -1]], [0, 0]) == 0.0


def test_hypervolume_ref_shift():
    """One point (2, 3), ref (1, -1): (2 - 1) * (3 + 1) = 4."""
    assert hypervolume([[2, 3]], [1, -1]) == pytest.approx(4.0)


def test_hypervolume_3d_hand():
    """(2,1,1) and (1,2,1), ref 0: 2 + 2 - overlap 1 = 3."""
    assert hypervolume([[2, 1, 1], [1, 2, 1]], [0, 0, 0]) == pytest.approx(3.0)


def test_hypervolume_2d_matches_an_exact_sweep_and_pymoo():
    """moocore's 2-D hypervolume agrees with a hand-written exact sweep and with pymoo (negated) on random
    fronts."""
    hv_mod = pytest.importorskip("pymoo.indicators.hv")

    def sweep(R, ref):  # exact 2-D area: x descending, each point adds the strip above the best y so far
        area, y_best = 0.0, ref[1]
        for x, y in R[np.lexsort((-R[:, 1], -R[:, 0]))]:
            if y > y_best:
                area, y_best = area + (x - ref[0]) * (y - y_best), y
        return area

    rng = np.random.default_rng(0)
    for _ in range(50):
        R = rng.normal(size=(int(rng.integers(1, 30)), 2))
        ref = rng.normal(size=2) - 1.0
        ours = hypervolume(R, ref)
        keep = R[np.all(R > ref, axis=1)]
        assert ours == pytest.approx(sweep(keep, ref), abs=1e-10)
        theirs = float(hv_mod.HV(ref_point=-ref)(-keep)) if len(keep) else 0.0
        assert ours == pytest.approx(theirs, abs=1e-10)


def test_hypervolume_3d_matches_pymoo():
    hv_mod = pytest.importorskip("pymoo.indicators.hv")
    rng = np.random.default_rng(1)
    R = rng.uniform(size=(25, 3))
    ref = np.full(3, -0.1)
    assert hypervolume(R, ref) == pytest.approx(float(hv_mod.HV(ref_point=-ref)(-R)), rel=1e-10)


def test_pareto_mask_matches_the_pairwise_definition():
    """moocore's mask equals the definition (no other row >= everywhere and > somewhere) on random fronts with
    ties and duplicates."""
    rng = np.random.default_rng(2)
    for _ in range(100):
        R = np.round(rng.uniform(size=(int(rng.integers(1, 12)), 2)), 1)
        ge = np.all(R[None, :, :] >= R[:, None, :], axis=-1)
        gt = np.any(R[None, :, :] > R[:, None, :], axis=-1)
        np.testing.assert_array_equal(pareto_mask(R), ~np.any(ge & gt, axis=1))


def test_hypervolume_errors():
    with pytest.raises(ValueError, match="ref_point is required"):
        hypervolume([[1, 2]], None)
    with pytest.raises(ValueError, match="ref_point must have 2 values"):
        hypervolume([[1, 2]], [0, 0, 0])
    with pytest.raises(ValueError, match=r"R\[0, 1\] = nan is not finite"):
        hypervolume([[1, float("nan")]], [0, 0])
    with pytest.raises(ValueError, match="2-D array"):
        hypervolume([1, 2], [0, 0])


# ----- inner product -----


def test_inner_product():
    """mu . R per row: (0*0 + 1*2) = 2, (0.5*1 + 0.5*1) = 1, (1*3 + 0*0) = 3; mean = 2."""
    assert inner_product(R3, MU3) == pytest.approx(2.0)


def test_inner_product_validates_mu():
    with pytest.raises(ValueError, match="shape of R"):
        inner_product(R3, MU3[:2])
    with pytest.raises(PreferenceError, match=r"mu\[1\] sums to 0.9"):
        inner_product(R3, [[0, 1], [0.4, 0.5], [1, 0]])


# ----- sparsity (Eq. 29) -----


def test_sparsity():
    """Consecutive squared distances: (0,2)->(1,1): 1 + 1 = 2; (1,1)->(3,0): 4 + 1 = 5; mean = 3.5."""
    assert sparsity(R3) == pytest.approx(3.5)


def test_sparsity_uses_row_order():
    """Reordered rows (0,2), (3,0), (1,1): 9 + 4 = 13 and 4 + 1 = 5; mean = 9 (preference order matters)."""
    assert sparsity(R3[[0, 2, 1]]) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        sparsity(R3[:1])


# ----- spacing (Eq. 30) -----


def test_spacing():
    """Nearest-neighbour L2 distances: d = (sqrt2, sqrt2, sqrt5) ((3,0) is sqrt5 from (1,1)). For values
    (a, a, b) the population std is |b - a| sqrt(2)/3 = (sqrt5 - sqrt2) sqrt(2)/3 ~ 0.38742."""
    expected = (math.sqrt(5) - math.sqrt(2)) * math.sqrt(2) / 3
    assert spacing(R3) == pytest.approx(expected)
    assert expected == pytest.approx(0.38742, abs=1e-5)


def test_spacing_uniform_front_is_zero():
    """Evenly spaced points: every d_i = sqrt(2), std = 0."""
    assert spacing([[0, 3], [1, 2], [2, 1], [3, 0]]) == pytest.approx(0.0, abs=1e-12)


# ----- controllability (Definition 1) -----


def test_controllability_perfect():
    """R3 under MU3: along mu_0 up / mu_1 down, reward 0 rises and reward 1 falls for every pair -> 1."""
    assert controllability(R3, MU3) == 1.0


def test_controllability_one_pair_out_of_order():
    """R = (0,2), (1,1), (0.5,0): pair (mu=.5 -> mu=1) has mu_0 up but R_0 1 -> 0.5 down: fails. The other
    two unordered pairs agree, so K = 4 ordered / 6 = 2/3."""
    R = np.array([[0.0, 2.0], [1.0, 1.0], [0.5, 0.0]])
    assert controllability(R, MU3) == pytest.approx(2 / 3)


def test_controllability_reward_tie_fails():
    """sgn(0) = 0 != sgn(dmu): rows 0 and 1 tie on reward 0 -> that pair fails, K = 4/6."""
    R = np.array([[1.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    assert controllability(R, MU3) == pytest.approx(2 / 3)


def test_controllability_equal_preference_entry():
    """n=3: mu = (.2, .3, .5) vs (.2, .5, .3) leave mu_0 unchanged. Literal Definition 1 needs R_0 equal
    (here 1 vs 2 -> K = 0); skip_equal_preference ignores objective 0 and the other two agree -> K = 1."""
    mu = np.array([[0.2, 0.3, 0.5], [0.2, 0.5, 0.3]])
    R = np.array([[1.0, 0.0, 5.0], [2.0, 1.0, 4.0]])
    assert controllability(R, mu) == 0.0
    assert controllability(R, mu, skip_equal_preference=True) == 1.0
    R_eq = np.array([[1.0, 0.0, 5.0], [1.0, 1.0, 4.0]])
    assert controllability(R_eq, mu) == 1.0


def test_controllability_rewarded_soup_grid():
    """11-point grid: R = (2 mu_0, mu_1) is increasing in each preference -> K = 1. R = (2 mu_0, mu_0) makes
    reward 1 rise while mu_1 falls, so every pair fails -> K = 0."""
    mu = preference_grid(2, 0.1)
    R = np.stack([2 * mu[:, 0], mu[:, 1]], axis=1)
    assert controllability(R, mu) == 1.0
    R[:, 1] = mu[:, 0]
    assert controllability(R, mu) == 0.0


@pytest.mark.parametrize(("n", "step", "literal"), [(2, 0.1, 1.0), (3, 0.25, 45 / 105), (4, 0.25, 133 / 595)])
def test_a_perfectly_controlled_method_scores_one_at_any_n(n, step, literal):
    """A synthetic perfectly controlled method: R = mu + 1e-6 noise, so every reward rises exactly with its
    weight and the rewards of an unchanged weight differ by noise. The variant over changed weights gives 1.0
    at n = 2, 3, 4; Definition 1 as written gives the share of pairs that change every weight: all 55 pairs
    of the 11-point grid (n = 2), 45 of the 105 pairs of the 15-point grid (n = 3: 0.429) and 133 of the 595
    pairs of the 35-point grid (n = 4: 0.224), whatever the method."""
    mu = preference_grid(n, step)
    R = mu + 1e-6 * np.random.default_rng(n).normal(size=mu.shape)
    assert controllability_changed(R, mu) == 1.0
    assert all_metrics(R, mu, np.full(n, -1.0))["controllability"] == 1.0
    assert controllability(R, mu) == pytest.approx(literal)
    assert all_metrics(R, mu, np.full(n, -1.0))["controllability_literal"] == pytest.approx(literal)


# ----- Pareto front -----


def test_pareto_mask_and_front_length():
    """(1,3), (2,2), (3,1) are non-dominated; (1,1) is dominated by (2,2); (2,2) twice both count -> 4."""
    R = np.array([[1, 3], [2, 2], [1, 1], [3, 1], [2, 2]], dtype=float)
    np.testing.assert_array_equal(pareto_mask(R), [True, True, False, True, True])
    assert front_length(R) == 4
    assert front_length([[1, 1], [1, 2]]) == 1  # weakly dominated (equal in one objective) drops out


# ----- reference point and all_metrics -----


def test_default_reference_point():
    """Two methods: mins (0, -1), maxes (3, 2) -> spans (3, 3); margin 0.1 -> ref (-0.3, -1.3).
    A constant objective (span 0) uses max(|min|, 1): min 5 -> ref 5 - 0.5 = 4.5."""
    ref = default_reference_point([R3, np.array([[1.0, -1.0]])], margin=0.1)
    np.testing.assert_allclose(ref, [-0.3, -1.3])
    np.testing.assert_allclose(default_reference_point(np.array([[5.0, 0.0], [5.0, 1.0]])), [4.5, -0.1])
    with pytest.raises(ValueError, match="disagree on the number of objectives"):
        default_reference_point([R3, np.zeros((2, 3))])
    with pytest.raises(ValueError, match="margin"):
        default_reference_point([R3], margin=0.0)


def test_all_metrics():
    """R3, MU3, ref (-1, -1). HV strips, x descending: (3,0): (3+1)*(0+1) = 4; (1,1): (1+1)*(1-0) = 2;
    (0,2): (0+1)*(2-1) = 1 -> 7. Inner product 2, sparsity 3.5, controllability 1, front length 3."""
    out = all_metrics(R3, MU3, [-1, -1])
    assert set(out) == {
        "hv",
        "inner_product",
        "sparsity",
        "spacing",
        "controllability",
        "controllability_literal",
        "front_length",
        "ref_point",
    }
    assert out["hv"] == pytest.approx(7.0)
    assert out["inner_product"] == pytest.approx(2.0)
    assert out["sparsity"] == pytest.approx(3.5)
    assert out["spacing"] == pytest.approx(spacing(R3))
    assert out["controllability"] == 1.0 and out["controllability_literal"] == 1.0
    assert out["front_length"] == 3
    assert out["ref_point"] == [-1.0, -1.0]
