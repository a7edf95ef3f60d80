"""Tests for mage_ray.uncertainty: paired percentile bootstrap over prompts. Expectations are hand-derived."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from mage_ray.metrics import controllability_changed, hypervolume
from mage_ray.soup import preference_grid
from mage_ray.uncertainty import (
    bootstrap_fronts,
    bootstrap_trials,
    cell_means,
    controllability_bounds,
    degenerate_bounds,
    front_stderr,
    pair_accuracy,
)

pytestmark = pytest.mark.filterwarnings("error")  # inf ratios and NaN cells must not warn

MU = preference_grid(2, 0.1)  # (11, 2)
REF = [-3.0, -3.0]
N = 40


def _front_rewards(rng: np.random.Generator, spread: float, noise: float, n_prompts: int = N) -> np.ndarray:
    """(11, n_prompts, 2): a concave front mu -> (sin, cos) of mu_0 pi / 2, plus a per-prompt difficulty
    (spread, shared by every preference and objective) and independent cell noise."""
    angle = MU[:, 0] * np.pi / 2
    front = np.stack([np.sin(angle), np.cos(angle)], axis=1)  # (11, 2)
    difficulty = rng.normal(0.0, spread, size=(1, n_prompts, 1))
    return front[:, None, :] + difficulty + rng.normal(0.0, noise, size=(11, n_prompts, 2))


def test_identical_methods_ratio_is_exactly_one():
    """Same data under two names: HV(a)/HV(b) = 1 on the full data and in every resample (the share
    x / (x + x) is exactly 0.5), so value = lo = hi = 1 exactly and holds (lo > 1) is False."""
    X = _front_rewards(np.random.default_rng(0), spread=0.3, noise=0.1)
    out = bootstrap_fronts({"a": X, "b": X.copy()}, MU, REF, ratios=[("a", "b")], n_resamples=300)
    r = out["ratios"]["a/b"]
    assert r["value"] == 1.0
    assert r["lo"] == 1.0 and r["hi"] == 1.0
    assert r["holds"] is False


def test_clear_domination_holds():
    """a = b + 0.2 on both objectives with noise 0.02: HV(a) > HV(b) in every resample, so the ratio interval
    lies above 1 (holds True); value equals the HV ratio computed directly from the cell means."""
    rng = np.random.default_rng(1)
    b = _front_rewards(rng, spread=0.0, noise=0.02)
    a = b + 0.2 + rng.normal(0.0, 0.02, size=b.shape)
    out = bootstrap_fronts({"a": a, "b": b}, MU, REF, ratios=[("a", "b")], n_resamples=300)
    r = out["ratios"]["a/b"]
    assert r["lo"] > 1.0 and r["holds"] is True
    expected = hypervolume(a.mean(axis=1), REF) / hypervolume(b.mean(axis=1), REF)
    assert r["value"] == pytest.approx(expected, rel=1e-12)
    assert out["methods"]["a"]["hv"]["lo"] > out["methods"]["b"]["hv"]["hi"]


def test_pairing_detects_small_shift_hidden_by_prompt_difficulty():
    """Prompt difficulty (sd 0.5, shared across preferences) moves both methods together; a = b + 0.05 exactly.
    Unpaired, each method's HV interval is wide (the mean difficulty of a resample of 40 prompts has sd about
    0.08 > 0.05), so the two HV intervals overlap. Paired, every resample shifts a's whole front by +0.05
    over b's, so HV(a) > HV(b) in every resample and the ratio interval lies above 1."""
    b = _front_rewards(np.random.default_rng(2), spread=0.5, noise=0.05)
    a = b + 0.05
    out = bootstrap_fronts({"a": a, "b": b}, MU, REF, ratios=[("a", "b")], n_resamples=300)
    ha, hb = out["methods"]["a"]["hv"], out["methods"]["b"]["hv"]
    assert ha["lo"] < hb["hi"] and hb["lo"] < ha["hi"]  # the unpaired intervals overlap
    gap = ha["value"] - hb["value"]  # about 0.4 in HV units, against interval widths of about 2
    assert min(ha["hi"] - ha["lo"], hb["hi"] - hb["lo"]) > 2 * gap  # each interval is wide against the gap
    assert out["ratios"]["a/b"]["lo"] > 1.0 and out["ratios"]["a/b"]["holds"] is True


def test_stderr_and_cell_means_hand_computed_with_nan():
    """Cell (0, 0): [1, 2, 3] -> mean 2, std 1, stderr 1/sqrt(3). Cell (0, 1): [1, NaN, 3] -> mean 2, std
    sqrt(2), stderr sqrt(2)/sqrt(2) = 1. Cell (1, 0): [5, NaN, NaN] -> mean 5, stderr 0 (count < 2).
    Cell (1, 1): [4, 4, 4] -> mean 4, stderr 0."""
    X = np.array(
        [
            [[1.0, 1.0], [2.0, np.nan], [3.0, 3.0]],
            [[5.0, 4.0], [np.nan, 4.0], [np.nan, 4.0]],
        ]
    )  # (P=2, N=3, n=2)
    np.testing.assert_allclose(cell_means(X), [[2.0, 2.0], [5.0, 4.0]])
    np.testing.assert_allclose(front_stderr(X), [[1 / np.sqrt(3), 1.0], [0.0, 0.0]])


def test_nan_cells_ignored_in_fronts():
    """Cell (0, 0) keeps 1 valid prompt of 6: the full-data HV is that of the NaN-skipping cell means, its
    stderr is 0 (count < 2), and resamples that draw none of its valid prompt (about (5/6)^6 = 33% of them)
    keep its full-data mean, so every bound is finite and nothing warns."""
    X = _front_rewards(np.random.default_rng(3), spread=0.1, noise=0.05, n_prompts=6)
    X[0, :5, 0] = np.nan  # cell (0, 0) keeps one valid prompt: many resamples draw none of it
    out = bootstrap_fronts({"a": X}, MU, REF, n_resamples=200)
    assert out["methods"]["a"]["hv"]["value"] == pytest.approx(hypervolume(cell_means(X), REF))
    assert out["methods"]["a"]["stderr"][0][0] == 0.0
    assert np.all(
        np.isfinite([out["methods"]["a"][m]["lo"] for m in ("hv", "inner_product", "controllability")])
    )


def test_zero_hv_denominator_gives_inf_ratio():
    """b's front lies entirely below the reference point, so HV(b) = 0 in every resample while HV(a) > 0:
    value, lo and hi of a/b are inf (no warning), holds True; b/a is 0 and does not hold."""
    a = _front_rewards(np.random.default_rng(4), spread=0.1, noise=0.05)
    b = a - 10.0
    out = bootstrap_fronts({"a": a, "b": b}, MU, REF, ratios=[("a", "b"), ("b", "a")], n_resamples=200)
    assert out["ratios"]["a/b"] == {"value": np.inf, "lo": np.inf, "hi": np.inf, "holds": True}
    assert out["ratios"]["b/a"]["value"] == 0.0 and out["ratios"]["b/a"]["holds"] is False
    json.dumps(out)


def test_layout_and_determinism():
    """Same inputs and seed give an identical dict (and identical JSON); another seed moves the bounds but not
    the full-data values. The dict carries the documented keys."""
    rng = np.random.default_rng(5)
    pp = {"a": _front_rewards(rng, 0.3, 0.1), "b": _front_rewards(rng, 0.3, 0.1)}
    kw = dict(ratios=[("a", "b")], n_resamples=200)
    o1 = bootstrap_fronts(pp, MU, REF, seed=7, **kw)
    o2 = bootstrap_fronts(pp, MU, REF, seed=7, **kw)
    o3 = bootstrap_fronts(pp, MU, REF, seed=8, **kw)
    assert o1 == o2 and json.dumps(o1) == json.dumps(o2)
    assert o1["methods"]["a"]["hv"]["value"] == o3["methods"]["a"]["hv"]["value"]
    assert o1["methods"]["a"]["hv"]["lo"] != o3["methods"]["a"]["hv"]["lo"]
    assert o1["ratios"]["a/b"]["hi"] != o3["ratios"]["a/b"]["hi"]
    assert set(o1["methods"]["a"]) == {"hv", "inner_product", "controllability", "stderr"}
    assert o1["methods"]["a"]["controllability"] == controllability_bounds(pp["a"], MU)  # not bootstrapped
    assert np.asarray(o1["methods"]["a"]["stderr"]).shape == (11, 2)
    assert o1["n_prompts"] == N and o1["n_resamples"] == 200 and o1["confidence"] == 0.9
    assert o1["method"] == "percentile bootstrap over prompts, paired"


def test_single_prompt_returns_point_values_with_note():
    """N = 1: nothing to resample, so lo = hi = value for every metric and a note says so."""
    X = _front_rewards(np.random.default_rng(6), 0.1, 0.05, n_prompts=1)
    out = bootstrap_fronts({"a": X, "b": X + 0.1}, MU, REF, ratios=[("b", "a")], n_resamples=200)
    hv = out["methods"]["a"]["hv"]
    assert hv["lo"] == hv["value"] == hv["hi"]
    assert "note" in out and out["ratios"]["b/a"]["lo"] == out["ratios"]["b/a"]["value"]


def test_mismatched_prompts_or_preferences_raise_naming_method():
    """A method with N - 1 prompts, or with 10 preferences instead of 11, raises ValueError naming it; so does
    a ratio naming an unknown method."""
    X = _front_rewards(np.random.default_rng(7), 0.1, 0.05)
    with pytest.raises(ValueError, match="'short'"):
        bootstrap_fronts({"a": X, "short": X[:, :-1]}, MU, REF, n_resamples=200)
    with pytest.raises(ValueError, match="'fewP'"):
        bootstrap_fronts({"a": X, "fewP": X[:-1]}, MU, REF, n_resamples=200)
    with pytest.raises(ValueError, match="'short'"):
        bootstrap_trials({"0.5": X, "short": X[:, :-1]}, MU, REF, default="0.5", n_resamples=200)
    with pytest.raises(ValueError, match="'zz'"):
        bootstrap_fronts({"a": X}, MU, REF, ratios=[("a", "zz")], n_resamples=200)


def test_trials_keep_default_when_indistinguishable():
    """Pure noise: three trials share the prompt difficulty and differ only by independent cell noise (sd 0.05,
    40 prompts). A 90% interval lies above 0 by chance about 5% of the time per comparison, so about 10% for
    the best of two challengers (measured: 6.5% over 200 datasets); over 10 seeded datasets the default is
    kept in at least 8, and the default's own paired difference is exactly 0 in every resample."""
    rng = np.random.default_rng(8)
    kept = 0
    for _ in range(10):
        base = _front_rewards(rng, spread=0.3, noise=0.0)
        pp = {k: base + rng.normal(0.0, 0.05, size=base.shape) for k in ("0.5", "0.6", "0.7")}
        out = bootstrap_trials(pp, MU, REF, default="0.5", n_resamples=200)
        assert out["trials"]["0.5"]["vs_default"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
        assert out["distinguishable"] is (out["trials"][out["best"]]["vs_default"]["lo"] > 0.0)
        kept += out["chosen"] == "0.5" and out["distinguishable"] is False
    assert kept >= 8


def test_trials_choose_clearly_better():
    """Trial "0.7" = default + 0.1 on every cell: its paired difference interval lies above 0, so it is both
    best and chosen."""
    rng = np.random.default_rng(9)
    base = _front_rewards(rng, spread=0.3, noise=0.05)
    pp = {"0.5": base, "0.6": base + rng.normal(0.0, 0.05, size=base.shape), "0.7": base + 0.1}
    out = bootstrap_trials(pp, MU, REF, default="0.5", n_resamples=300)
    assert out["best"] == "0.7" and out["distinguishable"] is True and out["chosen"] == "0.7"
    assert out["trials"]["0.7"]["vs_default"]["lo"] > 0.0


@pytest.mark.parametrize("default", [None, "missing"])
def test_trials_without_default_choose_best(default):
    """No usable default: chosen = best by point estimate, distinguishable None, no vs_default, and a note."""
    rng = np.random.default_rng(10)
    base = _front_rewards(rng, spread=0.3, noise=0.05)
    out = bootstrap_trials({"a": base, "b": base + 0.1}, MU, REF, default=default, n_resamples=200)
    assert out["best"] == out["chosen"] == "b" and out["distinguishable"] is None
    assert "note" in out and "vs_default" not in out["trials"]["a"]


# ----- controllability bounds: paired tests per pair of preferences -----

_STEPS = np.cumsum(np.r_[0.0, np.tile([0.06, 0.002], 5)])
PERFECT = np.stack([0.4 + _STEPS, 0.9 - _STEPS], axis=1)
"""(11, 2) true front of a perfectly controlled method: along mu_0 relevance rises and readability falls by
0.06 and 0.002 in turn, so half of the neighbouring points are near ties (0.002 against a per-point s.e. of
0.014 for a per-prompt sd of 0.097 over 48 prompts)."""
FOLD = np.stack([np.minimum(0.2 + 0.1 * np.arange(11), 0.7), 1.0 - 0.08 * np.arange(11)], axis=1)
FOLD[9:, 1] = FOLD[8, 1] + 0.12
"""(11, 2) true front of an imperfect method: relevance flat from mu_0 = 0.5 on (15 pairs tie: truly not in
order) and readability folding back at mu_0 = 0.9, 1 (true controllability 40/55)."""


@pytest.mark.parametrize(("front", "truth"), [(PERFECT, 1.0), (FOLD, 40 / 55)], ids=["perfect", "imperfect"])
def test_controllability_bounds_cover_the_truth(front, truth):
    """Simulation, seeded: 200 data sets of 11 preferences x 48 prompts, rewards = true front + N(0, 0.097^2)
    per prompt and objective. The 90% statement lo <= K <= hi contains the true controllability K (of the true
    front, over the changed weights) in at least 85% of them (measured: all 200 for both; the binomial s.e. of a
    coverage near 0.9 over 200 repeats is 0.02). Broken on purpose (each pair tested at 5% with no
    multiplicity correction) coverage falls to 0.82 (perfect: near-tied pairs declared out of order) and 0.70
    (imperfect: tied pairs declared in order). The bounds are informative (lo ~0.70 for both) and the point
    estimate on noisy means is not the truth (mean 0.93 for the perfect front, 0.83 > 0.73 for the other)."""
    assert controllability_changed(front, MU) == pytest.approx(truth)
    rng = np.random.default_rng(11)
    X = front[None, :, None, :] + rng.normal(0.0, 0.097, size=(200, 11, 48, 2))
    bounds = [controllability_bounds(x, MU, confidence=0.9) for x in X]
    covered = np.mean([b["lo"] <= truth <= b["hi"] for b in bounds])
    assert covered >= 0.85, covered
    assert np.mean([b["lo"] for b in bounds]) > 0.6  # not covering by saying nothing
    assert abs(np.mean([b["value"] for b in bounds]) - truth) > 0.05  # the plug-in estimate is biased


def test_controllability_bounds_three_objectives_perfect_method():
    """n = 3, the 15-point grid, a perfectly controlled method (rewards 0.5 + 0.3 mu, per-prompt sd 0.097,
    48 prompts; 100 seeded data sets): the bounds contain 1 in at least 85% of them (every one), while
    Definition 1 as written gives 45/105 = 0.429 on every one."""
    mu = preference_grid(3, 0.25)
    X = (0.5 + 0.3 * mu)[None, :, None, :] + np.random.default_rng(12).normal(0, 0.097, size=(100, 15, 48, 3))
    bounds = [controllability_bounds(x, mu) for x in X]
    assert np.mean([b["lo"] <= 1.0 <= b["hi"] for b in bounds]) >= 0.85
    assert all(b["literal"] == pytest.approx(45 / 105) for b in bounds)


def test_controllability_bounds_hand_computed():
    """3 preferences (0,1), (.5,.5), (1,0), 4 prompts. Objective 0 = mu_0 + prompt offset (0, .1, .2, .3):
    every difference is constant over prompts (no spread: t = +-inf, significant). Objective 1 = mu_1 except
    that preference 1 equals preference 2 on prompt... : rewards (1, .5, 0) plus offsets. Every pair is then
    significantly in order: lo = hi = 1. Reversing objective 1 at preference 2 (reward 0.6 > 0.5) makes pair
    (1, 2) significantly wrong (its objective-1 difference is -0.1 on every prompt): hi = 2/3; lo = 2/3."""
    mu = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    off = np.array([0.0, 0.1, 0.2, 0.3])
    X = mu[:, None, :] + off[None, :, None]  # (3, 4, 2)
    b = controllability_bounds(X, mu)
    assert (b["lo"], b["hi"], b["value"], b["n_pairs"], b["n_tests"]) == (1.0, 1.0, 1.0, 3, 6)
    X[2, :, 1] = 0.6 + off
    b = controllability_bounds(X, mu)
    assert (
        b["lo"] == pytest.approx(2 / 3)
        and b["hi"] == pytest.approx(2 / 3)
        and b["value"] == pytest.approx(2 / 3)
    )
    X[:, :2, :] = np.nan  # 2 prompts left: constant differences, still significant
    assert controllability_bounds(X, mu)["hi"] == pytest.approx(2 / 3)
    X[:, 2, :] = np.nan  # 1 prompt left: nothing is significant
    assert (controllability_bounds(X, mu)["lo"], controllability_bounds(X, mu)["hi"]) == (0.0, 1.0)


# ----- degenerate rates: exact binomial intervals -----


def test_degenerate_bounds_hand_computed():
    """0 of 24 flagged: Clopper-Pearson 90% interval [0, 1 - 0.05^(1/24)] = [0, 0.1170]; 24 of 24: [0.05^(1/24),
    1]. The upper bound of 0 of m is <= 5% only from m = 59 (1 - 0.05^(1/59) = 0.0495; m = 58: 0.0503)."""
    F = np.zeros((2, 24))
    F[1] = 1.0
    d = degenerate_bounds(F)
    assert d["k"] == [0, 24] and d["m"] == [24, 24] and d["rate"] == [0.0, 1.0]
    assert d["lo"][0] == 0.0 and d["hi"][0] == pytest.approx(1 - 0.05 ** (1 / 24))
    assert d["lo"][1] == pytest.approx(0.05 ** (1 / 24)) and d["hi"][1] == 1.0
    assert d["min_prompts"] == 59 and d["verdict"] == "fails" and d["worst"] == 1.0
    assert degenerate_bounds(np.zeros((11, 59)))["verdict"] == "holds"
    assert degenerate_bounds(np.zeros((11, 58)))["verdict"] == "no evidence"
    F = np.full((1, 4), np.nan)
    F[0, :2] = [1.0, 0.0]  # errored responses are not counted
    assert degenerate_bounds(F)["k"] == [1] and degenerate_bounds(F)["m"] == [2]


def test_degenerate_verdict_error_rates():
    """Simulation, seeded, 2000 runs of 11 preferences x 48 prompts. A method whose true rate is 2% at every
    preference: the verdict says 'fails' in at most 5% of runs (the old rule, 'the worst observed share is above
    5%', failed it in ~56%: P(some preference has >= 3 of 48) = 1 - (1 - 0.0712)^11). A method at 25% at one
    preference: 'fails' in at least 85% of runs, and never 'holds'. The Clopper-Pearson bounds are those of
    ``scipy.stats.binomtest(k, m).proportion_ci(method="exact")``."""
    for k, m in ((0, 48), (3, 48), (17, 24), (5, 5)):
        ci = binomtest(k, m).proportion_ci(confidence_level=0.9, method="exact")
        d = degenerate_bounds(np.r_[np.ones(k), np.zeros(m - k)][None, :])
        assert (d["lo"][0], d["hi"][0]) == (
            pytest.approx(ci.low, abs=1e-12),
            pytest.approx(ci.high, abs=1e-12),
        )
    rng = np.random.default_rng(13)
    ok = (rng.uniform(size=(2000, 11, 48)) < 0.02).astype(float)
    verdicts = [degenerate_bounds(f)["verdict"] for f in ok]
    assert np.mean([v == "fails" for v in verdicts]) <= 0.05
    assert np.mean([(f.sum(axis=1) >= 3).any() for f in ok]) > 0.45  # what the old rule flagged
    bad = (rng.uniform(size=(300, 11, 48)) < np.r_[0.25, np.full(10, 0.02)][None, :, None]).astype(float)
    verdicts = [degenerate_bounds(f)["verdict"] for f in bad]
    assert np.mean([v == "fails" for v in verdicts]) >= 0.85 and "holds" not in verdicts


def test_pair_accuracy_hand_computed():
    """(Intervals: scipy's exact binomtest interval.) 17 wins of 24 pairs: 0.708 with the 90% Clopper-Pearson interval [0.5213, 0.8543] (lower bound > 0.5:
    above chance). 7 wins + 2 ties of 12 (the '0.58' of a value model): value (7 + 1) / 12 = 0.667, lower bound of
    7/12, upper of 9/12: the interval holds 0.5, at chance. 4 of 12 (the '0.33'): [0.1229, 0.6091], at chance,
    not below it. 1 of 24: below chance. No pairs: no verdict."""
    a = pair_accuracy(17, 0, 24)
    assert a["value"] == pytest.approx(17 / 24) and a["verdict"] == "above chance"
    assert (a["lo"], a["hi"]) == (pytest.approx(0.5213, abs=1e-4), pytest.approx(0.8543, abs=1e-4))
    b = pair_accuracy(7, 2, 12)
    ci7 = binomtest(7, 12).proportion_ci(confidence_level=0.9, method="exact")
    ci9 = binomtest(9, 12).proportion_ci(confidence_level=0.9, method="exact")
    assert (
        b["value"] == pytest.approx(8 / 12)
        and b["lo"] == pytest.approx(ci7.low)
        and b["hi"] == pytest.approx(ci9.high)
    )
    assert b["verdict"] == "at chance"
    c = pair_accuracy(4, 0, 12)
    assert (c["lo"], c["hi"]) == (pytest.approx(0.1229, abs=1e-4), pytest.approx(0.6091, abs=1e-4))
    assert c["verdict"] == "at chance"
    assert pair_accuracy(1, 0, 24)["verdict"] == "below chance"
    assert pair_accuracy(0, 0, 0)["verdict"] == "no held-out pairs"
    with pytest.raises(ValueError, match="wins"):
        pair_accuracy(5, 3, 6)
