"""Evaluation report: aggregation per (method, preference), metrics, artifacts, bad input."""

import json
from dataclasses import dataclass

import numpy as np
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
