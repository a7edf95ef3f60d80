"""Evaluation report: aggregation per (method, preference), metrics, artifacts, bad input."""

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest

from mage_ray.evaluate import EvaluationError, evaluate, reference_point
from mage_ray.tasks.objectives import FunctionObjective


@dataclass
class _Done:
    text: str
    error: str | None = None


class FakeEngine:
    """Answers with a text whose length follows mu_0 (so the 'length' objective tracks the preference)."""

    def __init__(self):
        self.calls = 0

    def generate(self, requests):
        self.calls += 1
        out = []
        for r in requests:
            if r.method == "broken":
                out.append(_Done("", "method: unknown"))
                continue
            k = int(round(10 * r.preference[0])) + (1 if r.method == "good" else 0)
            out.append(_Done("x" * k))
        return out


def _Obj(name, fn, lower):
    return FunctionObjective(
        name, lambda ps, rs: [fn(r) for r in rs], bounds=None if lower is None else (lower, 1.0)
    )


OBJS = [_Obj("length", lambda r: len(r) / 10, -1.0), _Obj("shortness", lambda r: 1 - len(r) / 10, -1.0)]


def test_evaluate_writes_report(tmp_path):
    """mu_0 = p/2 -> text length 10*mu_0 (+1 for 'good'): R_p = (mu_0, 1 - mu_0) for 'plain'."""
    grid = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    eng = FakeEngine()
    s = evaluate(
        eng,
        OBJS,
        ["a", "b"],
        ["plain", "good"],
        grid,
        ref_point=[-1, -1],
        out_dir=tmp_path,
        batch_size=4,
        progress=False,
    )
    R = np.array(s["methods"]["plain"]["rewards"])
    np.testing.assert_allclose(R, [[0, 1], [0.5, 0.5], [1, 0]])
    # 2 methods x 3 prefs x 2 prompts = 12 requests in batches of 4 -> 3 engine calls
    assert eng.calls == 3
    m = s["methods"]["plain"]["metrics"]
    assert m["controllability"] == 1.0 and m["front_length"] == 3
    # HV w.r.t. (-1,-1) of {(0,1),(0.5,0.5),(1,0)}: 2*1 + 1.5*1 ... computed by hand = 3.25
    assert m["hv"] == pytest.approx(3.25)
    for f in ("generations.parquet", "metrics.json", "metrics.md", "rewards.json", "front.png"):
        assert (tmp_path / f).exists(), f
    assert json.loads((tmp_path / "metrics.json").read_text())["ref_point"] == [-1.0, -1.0]
    md = (tmp_path / "metrics.md").read_text()
    assert "| plain |" in md and "| good |" in md and "reference point" in md


def test_too_few_prompts_and_bad_grid():
    with pytest.raises(EvaluationError, match="at least 4"):
        evaluate(
            FakeEngine(),
            OBJS,
            ["a"],
            ["plain"],
            np.array([[0.5, 0.5]]),
            ref_point=[0, 0],
            min_prompts=4,
            progress=False,
        )
    with pytest.raises(EvaluationError, match="shape"):
        evaluate(
            FakeEngine(),
            OBJS,
            ["a"],
            ["plain"],
            np.array([[0.2, 0.3, 0.5]]),
            ref_point=[0, 0],
            progress=False,
        )


def test_method_that_only_errors_is_reported():
    with pytest.raises(EvaluationError, match="broken.*method: unknown"):
        evaluate(
            FakeEngine(), OBJS, ["a"], ["broken"], np.array([[0.5, 0.5]]), ref_point=[0, 0], progress=False
        )


def test_reference_point_rules():
    assert reference_point(OBJS) == [-1.0, -1.0]
    assert reference_point(OBJS, [0, 0]) == [0.0, 0.0]
    with pytest.raises(EvaluationError, match="2 objectives"):
        reference_point(OBJS, [0])
    with pytest.raises(EvaluationError, match="eval.ref_point"):
        reference_point([_Obj("x", len, None), OBJS[0]])


class FluentEngine:
    """'fluent' answers an English sentence whose length grows with mu_0 and the prompt; 'babble' a glued token."""

    def generate(self, requests):
        out = []
        for r in requests:
            k = int(round(10 * r.preference[0])) + len(r.prompt)
            if r.method == "babble":
                out.append(_Done("zz" * (k + 3)))
            else:
                words = "keep a regular bedtime and avoid screens before you go to sleep at night".split()
                out.append(_Done(" ".join(words[: 3 + k % 12]) + "."))
        return out


WORDS = [
    _Obj("length", lambda r: min(1.0, len(r.split()) / 15), 0.0),
    _Obj("shortness", lambda r: 1 - min(1.0, len(r.split()) / 15), 0.0),
]


def test_report_has_degenerate_rates_intervals_claims_and_samples(tmp_path):
    """Every 'babble' response is flagged by the quality gate (rate 1.0 at every preference, hollow in the plot),
    no 'fluent' one is (0.0); every metric has a bootstrap interval around its value; the markdown shows the
    degenerate column, the brackets and the claims; samples.md shows texts at three preferences with the flag."""
    grid = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    s = evaluate(
        FluentEngine(),
        WORDS,
        prompts,
        ["rs", "bs", "babble"],
        grid,
        ref_point=[0, 0],
        out_dir=tmp_path,
        batch_size=8,
        progress=False,
        n_resamples=200,
    )
    m = s["methods"]
    assert m["babble"]["degenerate"] == [1.0, 1.0, 1.0] and m["babble"]["degenerate_max"] == 1.0
    assert m["bs"]["degenerate"] == [0.0, 0.0, 0.0]
    for name in ("rs", "bs", "babble"):
        for k in ("hv", "inner_product", "controllability"):
            b = m[name]["intervals"][k]
            assert b["lo"] <= b["value"] <= b["hi"], (name, k, b)
        assert np.array(m[name]["stderr"]).shape == (3, 2)
    # rs and bs are the same engine answers: ratio exactly 1, interval [1, 1], not "above 1"
    assert s["bootstrap"]["ratios"]["bs/rs"]["value"] == pytest.approx(1.0)
    assert s["bootstrap"]["ratios"]["bs/rs"]["holds"] is False
    df = pq.read_table(tmp_path / "generations.parquet").to_pandas()
    assert df.groupby("method")["degenerate"].mean().to_dict() == {"babble": 1.0, "bs": 0.0, "rs": 0.0}
    md = (tmp_path / "metrics.md").read_text()
    assert "degenerate" in md and "100.0% (max 100.0%)" in md and "90% interval" in md
    assert "| Bone Soup HV above Rewarded Soups | **no evidence** |" in md
    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("] DEGENERATE:") == 3 * 3 and "(0,1)" in samples and "(1,0)" in samples
    rewards = json.loads((tmp_path / "rewards.json").read_text())
    assert rewards["babble"][0]["degenerate"] == 1.0 and len(rewards["bs"][0]["stderr"]) == 2


def test_claim_verdicts_follow_the_intervals():
    """holds: the whole interval on the claimed side; fails: all on the other side; else no evidence. The best
    MAGE variant is the one with the largest HV."""
    from mage_ray.report import MethodResult, claims

    mu = np.array([[0.0, 1.0], [1.0, 0.0]])

    def res(name, hv):
        return MethodResult(name, mu, mu, {"hv": hv}, degenerate=np.array([0.0, 0.1]))

    results = [res("rs", 1.0), res("bs", 1.2), res("mage-e-m", 1.3), res("mage-i-m", 1.25)]
    band = lambda v, lo, hi: {"value": v, "lo": lo, "hi": hi}  # noqa: E731
    boot = {
        "ratios": {
            "bs/rs": {**band(1.2, 1.05, 1.3), "holds": True},
            "mage-e-m/bs": {**band(1.08, 0.97, 1.2), "holds": False},
        },
        "methods": {
            "bs": {"controllability": band(0.8, 0.6, 0.89)},
            "mage-e-m": {"controllability": band(0.95, 0.9, 1.0)},
        },
    }
    got = {c["claim"]: c["verdict"] for c in claims(results, boot)}
    assert got["Bone Soup HV above Rewarded Soups"] == "holds"
    assert got["MAGE (best variant on test HV: mage-e-m) HV above Bone Soup"] == "no evidence"
    assert got["controllability of bs >= 0.9"] == "fails"
    assert got["controllability of mage-e-m >= 0.9"] == "holds"
    assert got["degenerate responses of bs <= 5% at every preference"] == "fails"


def test_claim_says_when_a_mage_variant_scored_exactly_as_bone_soup():
    """With guidance strength 0 the best MAGE variant decodes as bs: the ratio's interval is [1, 1] and the
    claim row says why instead of leaving a bare 'no evidence'."""
    from mage_ray.report import MethodResult, claims

    mu = np.array([[0.0, 1.0], [1.0, 0.0]])
    per = np.random.default_rng(0).uniform(size=(2, 4, 2))
    results = [
        MethodResult(m, mu, per.mean(1), {"hv": 1.0}, per_prompt=per.copy()) for m in ("rs", "bs", "mage-i-m")
    ]
    results[0].per_prompt = per + 0.1
    results[2].per_prompt = per + 1e-7  # float noise of batched scoring
    band = {"value": 1.0, "lo": 1.0, "hi": 1.0}
    boot = {
        "ratios": {"bs/rs": {**band, "value": 0.9, "lo": 0.8, "hi": 0.95}, "mage-i-m/bs": band},
        "methods": {m: {"controllability": band} for m in ("bs", "mage-i-m")},
    }
    rows = {c["claim"]: c for c in claims(results, boot)}
    mage = rows["MAGE (best variant on test HV: mage-i-m) HV above Bone Soup"]
    assert mage["verdict"] == "no evidence" and "scored as bs" in mage["numbers"]
    assert "scored as" not in rows["Bone Soup HV above Rewarded Soups"]["numbers"]
