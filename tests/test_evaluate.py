"""Evaluation report: aggregation per (method, preference), metrics, artifacts, bad input."""

import json
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest

from mage_ray.evaluate import EvaluationError, evaluate, reference_point
from mage_ray.soup import preference_grid
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


WORDS = [
    _Obj("length", lambda r: min(1.0, len(r.split()) / 15), 0.0),
    _Obj("shortness", lambda r: 1 - min(1.0, len(r.split()) / 15), 0.0),
]


class NoisyEngine:
    """'fluent' (and 'rs', 'bs') answer with max(3, 4 + round(4 mu_0 + e)) words, e uniform on [-2.5, 2.5) from a
    hash of (prompt, preference): E[round(x + e)] = x exactly for a uniform e of integer width, and the floor of 3
    words keeps the mean increasing, so length rises strictly with mu_0 and shortness falls: a perfectly
    controlled method (true controllability 1) whose neighbouring grid points differ by 0.4 words against a
    per-prompt spread of ~1.4 words. 'babble' answers a glued token (degenerate)."""

    WORDS = "keep a regular bedtime and avoid screens before you go to sleep at night".split()

    def generate(self, requests):
        out = []
        for r in requests:
            seed = zlib.crc32(f"{r.prompt}|{r.preference[0]:.3f}".encode())
            e = np.random.default_rng(seed).uniform(-2.5, 2.5)
            k = 4 + int(np.floor(4 * r.preference[0] + e + 0.5))
            if r.method == "babble":
                out.append(_Done("zz" * (k + 3)))
            else:
                out.append(_Done(" ".join(self.WORDS[: max(k, 3)]) + "."))
        return out


def test_report_has_degenerate_rates_intervals_claims_and_samples(tmp_path):
    """A perfectly controlled but noisy method (:class:`NoisyEngine`, 11 preferences x 24 prompts): the
    controllability bounds contain the truth, 1 (hi = 1: no pair is significantly against mu; lo = 0.53), while
    the point estimate on noisy means is 0.98 and a percentile bootstrap of it, [0.89, 0.98], misses 1. rs and bs give the same answers: their HV ratio is exactly 1 in every resample, so its
    interval is [1, 1], not 'above 1'. Every 'babble' response is flagged by the quality gate (rate 1.0 at every
    preference, exact interval [0.88, 1] for 24 of 24), no 'bs' one is (0 of 24: upper bound 11.7%, so the
    claim '<= 5%' is 'no evidence', not 'holds': 24 prompts cannot show it, >= 59 are needed). The markdown shows
    both controllability columns, the degenerate column with its bound and the claims; samples.md shows texts
    at three preferences with the flag."""
    grid = preference_grid(2, 0.1)
    prompts = [f"question number {i}" for i in range(24)]
    s = evaluate(
        NoisyEngine(),
        WORDS,
        prompts,
        ["rs", "bs", "babble"],
        grid,
        ref_point=[0, 0],
        out_dir=tmp_path,
        batch_size=64,
        progress=False,
        n_resamples=200,
    )
    m = s["methods"]
    assert m["babble"]["degenerate"] == [1.0] * 11 and m["babble"]["degenerate_max"] == 1.0
    assert m["bs"]["degenerate"] == [0.0] * 11
    for name in ("rs", "bs"):
        c = m[name]["intervals"]["controllability"]
        assert c["lo"] <= 1.0 <= c["hi"], (name, c)  # the truth is inside the bounds
        assert c["hi"] == 1.0 and c["lo"] > 0.4, c
        assert m[name]["metrics"]["controllability"] == c["value"]
        assert np.array(m[name]["stderr"]).shape == (11, 2)
    bs_deg = m["bs"]["intervals"]["degenerate"]
    assert bs_deg["k"] == [0] * 11 and bs_deg["m"] == [24] * 11
    assert bs_deg["hi"][0] == pytest.approx(1 - 0.05 ** (1 / 24)) and bs_deg["verdict"] == "no evidence"
    babble_deg = m["babble"]["intervals"]["degenerate"]
    assert babble_deg["lo"][0] == pytest.approx(0.05 ** (1 / 24)) and babble_deg["verdict"] == "fails"
    r = s["bootstrap"]["ratios"]["bs/rs"]
    assert r["value"] == r["lo"] == r["hi"] == 1.0 and r["holds"] is False
    df = pq.read_table(tmp_path / "generations.parquet").to_pandas()
    assert df.groupby("method")["degenerate"].mean().to_dict() == {"babble": 1.0, "bs": 0.0, "rs": 0.0}
    md = (tmp_path / "metrics.md").read_text()
    assert "controllability_literal" in md and "100.0% (max 100.0%, upper bound 100.0%)" in md
    assert "| Bone Soup (bs) HV above Rewarded Soups | **no evidence** |" in md
    assert "| degenerate responses of bs <= 5% at every preference | **no evidence** |" in md
    samples = (tmp_path / "samples.md").read_text()
    assert samples.count("] DEGENERATE:") == 3 * 3 and "(0,1)" in samples and "(1,0)" in samples
    rewards = json.loads((tmp_path / "rewards.json").read_text())
    assert rewards["babble"][0]["degenerate"] == 1.0 and len(rewards["bs"][0]["stderr"]) == 2
    assert rewards["bs"][0]["degenerate_interval"] == [0.0, pytest.approx(1 - 0.05 ** (1 / 24))]


def _mu2():
    return np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])


def test_claim_verdicts_follow_the_intervals():
    """holds: the whole interval on the claimed side; fails: all on the other side; else no evidence.
    Controllability: bs's bounds [0.6, 0.89] lie below 0.9 (fails), mage-e-m's [0.9, 1] on it (holds). MAGE is
    the variant chosen on validation (mage-i-m), not the one with the larger test HV (mage-e-m). Degenerate
    rates from the flags: bs flags 12 of 24 at one preference (simultaneous lower bound above 5%: fails)."""
    from mage_ray.report import MethodResult, claims

    mu = _mu2()
    flags = np.zeros((3, 24))
    flags[1, :12] = 1.0

    def res(name, hv, f=None):
        return MethodResult(name, mu, mu, {"hv": hv}, flags=flags if f is None else f)

    results = [res("rs", 1.0), res("bs", 1.2), res("mage-e-m", 1.3), res("mage-i-m", 1.25, np.zeros((3, 80)))]
    band = lambda v, lo, hi: {"value": v, "lo": lo, "hi": hi}  # noqa: E731
    boot = {
        "ratios": {
            "bs/rs": {**band(1.2, 1.05, 1.3), "holds": True},
            "mage-e-m/bs": {**band(1.08, 1.01, 1.2), "holds": True},
            "mage-i-m/bs": {**band(1.04, 0.97, 1.2), "holds": False},
        },
        "methods": {
            "bs": {"controllability": band(0.8, 0.6, 0.89)},
            "mage-e-m": {"controllability": band(0.95, 0.9, 1.0)},
            "mage-i-m": {"controllability": band(0.95, 0.9, 1.0)},
        },
    }
    context = {"mage_choice": {"method": "mage-i-m"}}
    got = {c["claim"]: c["verdict"] for c in claims(results, boot, context=context)}
    assert got["Bone Soup (bs) HV above Rewarded Soups"] == "holds"
    assert got["MAGE (mage-i-m, the variant chosen on validation HV) HV above Bone Soup"] == "no evidence"
    assert not any("mage-e-m" in c for c in got)  # not picked on the test prompts
    assert got["controllability of bs >= 0.9"] == "fails"
    assert got["controllability of mage-i-m >= 0.9"] == "holds"
    assert got["degenerate responses of bs <= 5% at every preference"] == "fails"
    assert got["degenerate responses of mage-i-m <= 5% at every preference"] == "holds"  # 0 of 80 everywhere
    # no validation choice: every variant carries its own claim
    got = {c["claim"]: c["verdict"] for c in claims(results, boot)}
    one_each = " (one claim per variant: none was chosen on validation)"
    assert got["MAGE (mage-e-m) HV above Bone Soup" + one_each] == "holds"
    assert got["MAGE (mage-i-m) HV above Bone Soup" + one_each] == "no evidence"


def test_a_mage_row_at_gamma_zero_is_bone_soup_not_mage():
    """With guidance strength 0 a MAGE method decodes as bs. Where the evaluation recorded its gamma (settings),
    the row carries no MAGE claim and the report says it is bs with guidance off; where it did not, the claim
    row says that it scored as bs instead of leaving a bare 'no evidence'."""
    from mage_ray.report import MethodResult, claims, metrics_markdown

    mu = np.array([[0.0, 1.0], [1.0, 0.0]])
    per = np.random.default_rng(0).uniform(size=(2, 4, 2))
    results = [
        MethodResult(m, mu, per.mean(1), {"hv": 1.0}, per_prompt=per.copy()) for m in ("rs", "bs", "mage-i-m")
    ]
    results[0].per_prompt = per + 0.1
    results[2].per_prompt = per + 1e-7  # float noise of batched scoring
    band = {"value": 1.0, "lo": 1.0, "hi": 1.0, "literal": 1.0}
    boot = {
        "ratios": {
            "bs/rs": {**band, "value": 0.9, "lo": 0.8, "hi": 0.95, "holds": False},
            "mage-i-m/bs": {**band, "holds": False},
        },
        "methods": {
            m: dict.fromkeys(("hv", "inner_product", "controllability"), band)
            for m in ("rs", "bs", "mage-i-m")
        },
        "confidence": 0.9,
        "method": "bootstrap",
        "n_resamples": 10,
        "n_prompts": 4,
    }
    rows = {c["claim"]: c for c in claims(results, boot)}
    mage = rows["MAGE (mage-i-m) HV above Bone Soup"]
    assert mage["verdict"] == "no evidence" and "scored as bs" in mage["numbers"]
    assert "scored as" not in rows["Bone Soup (bs) HV above Rewarded Soups"]["numbers"]
    settings = {m: {"method": m, "alpha": 0.0, "gamma": 0.0} for m in ("rs", "bs", "mage-i-m")}
    context = {"settings": settings, "serving": {"method": "mage-i-m", "alpha": 0.0, "gamma": 0.0}}
    rows = {c["claim"]: c for c in claims(results, boot, context=context)}
    assert not any(c.startswith("MAGE") or "of mage-i-m" in c for c in rows), rows
    md = metrics_markdown(results, ["a", "b"], [0, 0], boot=boot, context=context)
    assert "mage-i-m was decoded at gamma = 0: Bone Soup with guidance off, not MAGE" in md
    assert "serves mage-i-m at gamma = 0 (alpha 0): bs (guidance off)" in md
    assert "| mage-i-m | alpha 0, gamma 0 |" in md


def test_recompute_report_rebuilds_every_table_without_decoding(tmp_path):
    """A report recomputed from its own generations.parquet and metrics.json is the same report (metrics.json,
    metrics.md, rewards.json, samples.md): recompute_report takes no engine and decodes nothing. A report of an older layout (no settings, no
    controllability_literal, a 'train s' column only in metrics.md) gets every new column, keeps 'train s', and
    takes settings from the caller: mage-i-m at gamma 0 then carries no MAGE claim. A second report's rows join
    (replacing the row of the same label; the replaced one kept under a new name)."""
    from mage_ray.rereport import _merge, read_generations, recompute_report

    grid = preference_grid(2, 0.25)
    prompts = [f"question number {i}" for i in range(6)]
    settings = {m: {"method": m, "alpha": 0.0, "gamma": 0.0} for m in ("rs", "bs", "mage-i-m")}
    kw = dict(ref_point=[0, 0], batch_size=128, progress=False, n_resamples=20)
    a, b = tmp_path / "a", tmp_path / "b"
    evaluate(
        NoisyEngine(), WORDS, prompts, ["rs", "bs", "mage-i-m"], grid, out_dir=a, settings=settings, **kw
    )

    recompute_report(a, b)
    for f in ("metrics.json", "metrics.md", "rewards.json", "samples.md"):
        assert (a / f).read_text() == (b / f).read_text(), f
    assert "decoded at gamma = 0: Bone Soup with guidance off" in (b / "metrics.md").read_text()

    # an older report: no context, no literal column, a 'train s' column in metrics.md only
    meta = json.loads((a / "metrics.json").read_text())
    del meta["context"]
    for m in meta["methods"].values():
        del m["metrics"]["controllability_literal"]
    (a / "metrics.json").write_text(json.dumps(meta))
    md = (a / "metrics.md").read_text().splitlines()
    md[0] += " train s |"
    md[1] += "---|"
    md[2:5] = [line + f" {k} |" for k, line in zip((11, 22, 33), md[2:5])]
    (a / "metrics.md").write_text("\n".join(md))
    out = recompute_report(a, b, context={"settings": {"mage-i-m": settings["mage-i-m"]}})
    text = (b / "metrics.md").read_text()
    assert "controllability_literal" in text and "| train s |" in text and "| 33 |" in text
    assert not any(c["claim"].startswith("MAGE") for c in out["claims"])
    assert out["context"]["settings"]["mage-i-m"]["gamma"] == 0.0

    # rows of another report join: mage-i-m again at gamma 3 replaces the gamma-0 row, bs kept renamed
    c = tmp_path / "c"
    again = {
        "bs": {"method": "bs", "alpha": 0.2, "gamma": 0.0},
        "mage-i-m": {"method": "mage-i-m", "gamma": 3.0},
    }
    evaluate(NoisyEngine(), WORDS, prompts, ["bs", "mage-i-m"], grid, out_dir=c, settings=again, **kw)
    rs_only = {"settings": {"rs": settings["rs"]}}
    out = recompute_report(a, tmp_path / "d", add=[c], rename={"bs": "bs (alpha 0)"}, context=rs_only)
    assert list(out["methods"]) == ["rs", "bs (alpha 0)", "bs", "mage-i-m"]
    assert out["context"]["settings"]["mage-i-m"]["gamma"] == 3.0  # the added report's own settings win
    assert any(c["claim"].startswith("MAGE (mage-i-m") for c in out["claims"])
    with pytest.raises(EvaluationError, match="prompts differ"):  # the comparison must stay paired
        rows, scores, flags, ps, meta = read_generations(c)
        _merge(read_generations(a), (rows, scores, flags, ["another prompt"] * len(ps), meta), "c")
