"""Offline grids (mage_ray.grid, jobs/grid.py): the BatchDecoder callable and the per-point summariser alone, then
the whole Ray Data job on the tiny bundle."""

import importlib.util
import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from bundle_factory import cached_tiny_bundle

from mage_ray.config import load_config
from mage_ray.decode import Engine, Request
from mage_ray.grid import BatchDecoder, point_summary
from mage_ray.metrics import pareto_mask
from mage_ray.tasks.objectives import get_objective, score
from mage_ray.tasks.quality import degenerate_mask

PROMPTS = ["Hello there", "Tell me a story about the sea"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return cached_tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def grid_job(repo_root):
    spec = importlib.util.spec_from_file_location("grid_job", repo_root / "jobs" / "grid.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batch_decoder_matches_engine_and_scores(bundle, repo_root):
    """A mixed batch (2 methods x 2 preferences) gives the engine's own completions, the score columns are the
    objectives' scores of those texts and ``degenerate`` is the quality gate's flag of each."""
    cfg = load_config(repo_root / "configs" / "smoke.yaml")
    dec = BatchDecoder(
        str(bundle),
        cfg.decode.__dict__,
        methods=["bs", "mage-e-m"],
        objectives=["conciseness", "readability"],
    )
    prefs = [[0.0, 1.0], [0.7, 0.3], [0.0, 1.0], [0.7, 0.3]]
    methods = ["bs", "bs", "mage-e-m", "mage-e-m"]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    batch = {
        "prompt": np.array(prompts, dtype=object),
        "preference": np.array(prefs),
        "method": np.array(methods),
    }
    out = dec(batch)
    ref = Engine.from_bundle(bundle, cfg.decode).generate(
        [Request(prompt=p, preference=mu, method=m) for p, mu, m in zip(prompts, prefs, methods)]
    )
    assert list(out["text"]) == [c.text for c in ref]
    assert list(out["completion_tokens"]) == [c.usage.completion_tokens for c in ref]
    assert set(out["finish_reason"]) <= {"length", "eos", "stop"}
    objs = [get_objective("conciseness"), get_objective("readability")]
    expect = score(objs, prompts, [c.text for c in ref])
    np.testing.assert_allclose(np.stack([out["score_conciseness"], out["score_readability"]], 1), expect)
    assert list(out["degenerate"]) == degenerate_mask(prompts, [c.text for c in ref]).tolist()
    assert [list(p) for p in out["preference"]] == prefs


def test_point_summary_means_degenerate_share_and_front():
    """2 points x 3 prompts x 2 objectives with one failed response: means over the decoded prompts, the flagged
    share of the decoded responses, and the front over the points with a mean (an all-failed point has none)."""
    nan = np.nan
    X = np.array(
        [
            [[1.0, 0.0], [3.0, 2.0], [nan, nan]],  # point 0: mean (2, 1)
            [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]],  # point 1: mean (1, 1), dominated by point 0
            [[nan, nan], [nan, nan], [nan, nan]],  # point 2: every response failed
        ]
    )
    D = np.array([[1.0, 0.0, nan], [0.0, 0.0, 1.0], [nan, nan, nan]])
    s = point_summary(X, D)
    np.testing.assert_allclose(s["means"][:2], [[2.0, 1.0], [1.0, 1.0]])
    assert np.isnan(s["means"][2]).all()
    np.testing.assert_allclose(s["degenerate"][:2], [0.5, 1 / 3])
    assert np.isnan(s["degenerate"][2])
    assert s["front"].tolist() == [True, False, False]
    assert point_summary(X)["degenerate"] is None


@pytest.mark.slow
def test_grid_job_end_to_end(bundle, grid_job, tmp_path, monkeypatch, repo_root):
    """main(): prompts from a jsonl file x 3 explicit points x 1 method on Ray Data -> Parquet + summary.json
    (slow: a local Ray cluster and a Ray Data actor pool start, about a minute on 2 busy cores).

    6 rows; summary has one entry per point whose mean rewards are the per-point means of the Parquet scores
    and whose front flags are pareto_mask of those means."""
    import ray

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "grid"
    points = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    argv = [
        "grid.py",
        "--config",
        str(repo_root / "configs" / "smoke.yaml"),
        "--bundle",
        str(bundle),
        "--prompts",
        str(prompts_file),
        "--preferences",
        json.dumps(points),
        "--methods",
        "bs",
        "--score",
        "--out",
        str(out),
        "decode.max_new_tokens=4",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid_job.main()
    finally:
        ray.shutdown()
    df = pq.read_table(out / "generations").to_pandas()
    assert len(df) == len(PROMPTS) * len(points)
    assert {
        "prompt",
        "preference",
        "method",
        "text",
        "finish_reason",
        "score_conciseness",
        "score_readability",
        "degenerate",
    } <= set(df.columns)
    assert sorted(df["prompt"].unique()) == sorted(PROMPTS)
    assert (df["method"] == "bs").all() and (df["completion_tokens"] <= 4).all()
    assert sorted(tuple(p) for p in df["preference"].map(list)) == sorted(
        tuple(p) for p in points for _ in PROMPTS
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objectives"] == ["conciseness", "readability"]
    assert len(summary["points"]) == 3
    df["key"] = df["preference"].map(lambda p: tuple(float(x) for x in p))
    means = np.array(
        [
            [
                df[df["key"] == tuple(s["preference"])][f"score_{n}"].mean()
                for n in ("conciseness", "readability")
            ]
            for s in summary["points"]
        ]
    )
    np.testing.assert_allclose([s["mean_rewards"] for s in summary["points"]], means)
    flagged = [df[df["key"] == tuple(s["preference"])]["degenerate"].mean() for s in summary["points"]]
    np.testing.assert_allclose([s["degenerate_fraction"] for s in summary["points"]], flagged)
    assert [s["front"] for s in summary["points"]] == list(pareto_mask(means))
