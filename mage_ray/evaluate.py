"""Evaluate methods over a preference grid: decode, score, metrics, Pareto-front plots, report.

For every method and every preference mu_p of the grid, the test prompts are decoded through the one
decode engine (:class:`mage_ray.decode.Engine`), every response is scored by every objective, and the
mean reward vector R_p (MAGE Sec 3.1.3, the "testing reward" per objective) is the point of that
preference on the method's front. Metrics (Sec 5.4, Definition 1) come from :mod:`mage_ray.metrics`
with one reference point shared by every method of the report.

Artifacts written to ``out_dir`` (each atomically):
  generations.parquet  one row per (method, preference, prompt): text and per-objective scores
  rewards.json         per-method list of {preference, mean rewards}
  metrics.json / metrics.md   the metric table (and the reference point used)
  front.png            Pareto fronts, one curve per method, points labelled with mu_0
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mage_ray import metrics as M

METRIC_COLUMNS = ("hv", "inner_product", "sparsity", "spacing", "controllability", "front_length")
_ARROWS = {
    "hv": "↑",
    "inner_product": "↑",
    "sparsity": "↓",
    "spacing": "↓",
    "controllability": "↑",
    "front_length": "↑",
}


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (too few prompts, bad grid, ...)."""


@dataclass
class MethodResult:
    method: str
    preferences: np.ndarray  # (P, n)
    rewards: np.ndarray  # (P, n) mean reward per preference
    metrics: dict
    n_errors: int = 0


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def decode_grid(
    engine,
    prompts: Sequence,
    grid: np.ndarray,
    methods: Sequence[str],
    *,
    batch_size: int = 16,
    request_kwargs: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
):
    """Decode every (method, preference, prompt) through the engine, in heterogeneous batches.

    Returns a list of dicts (method, pref_index, prompt_index, text, error), in request order.
    """
    from mage_ray.decode import Request

    kw = dict(request_kwargs or {})
    jobs = [(m, p, i) for m in methods for p in range(len(grid)) for i in range(len(prompts))]
    out: list[dict] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        reqs = [
            Request(prompt=prompts[i], preference=[float(x) for x in grid[p]], method=m, **kw)
            for m, p, i in chunk
        ]
        for (m, p, i), c in zip(chunk, engine.generate(reqs)):
            out.append({"method": m, "pref_index": p, "prompt_index": i, "text": c.text, "error": c.error})
        if progress is not None:
            progress(min(start + batch_size, len(jobs)), len(jobs))
    return out


def score_generations(rows: list[dict], prompts: Sequence, objectives) -> np.ndarray:
    """(N, n) scores of every generated text; rows that errored get NaN."""
    from mage_ray.tasks.objectives import score

    ok = [k for k, r in enumerate(rows) if r["error"] is None]
    scores = np.full((len(rows), len(objectives)), np.nan)
    if ok:
        texts = [rows[k]["text"] for k in ok]
        ps = [_prompt_text(prompts[rows[k]["prompt_index"]]) for k in ok]
        scores[ok] = score(objectives, ps, texts)
    return scores


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content", "") for m in prompt)


def summarise(
    rows: list[dict], scores: np.ndarray, grid: np.ndarray, methods: Sequence[str], ref_point: Sequence[float]
) -> list[MethodResult]:
    """Mean reward per (method, preference) and the metric row of every method."""
    results = []
    for m in methods:
        R = np.zeros_like(grid, dtype=float)
        errors = 0
        for p in range(len(grid)):
            idx = [k for k, r in enumerate(rows) if r["method"] == m and r["pref_index"] == p]
            good = [k for k in idx if not np.isnan(scores[k]).any()]
            errors += len(idx) - len(good)
            if not good:
                raise EvaluationError(
                    f"method {m!r} produced no valid generation at preference {grid[p].tolist()}: "
                    f"first error: {rows[idx[0]]['error'] if idx else 'no rows'}"
                )
            R[p] = scores[good].mean(axis=0)
        results.append(MethodResult(m, grid.copy(), R, M.all_metrics(R, grid, ref_point), errors))
    return results


def metrics_markdown(
    results: list[MethodResult],
    objectives: Sequence[str],
    ref_point: Sequence[float],
    extra_columns: dict[str, dict[str, str]] | None = None,
) -> str:
    cols = list(METRIC_COLUMNS) + list(extra_columns or {})
    head = "| method | " + " | ".join(f"{c} {_ARROWS.get(c, '')}".strip() for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in results:
        vals = []
        for c in cols:
            if c in METRIC_COLUMNS:
                v = r.metrics[c]
                vals.append(str(v) if isinstance(v, (int, np.integer)) else f"{v:.4g}")
            else:
                vals.append(extra_columns[c].get(r.method, ""))
        lines.append(f"| {r.method} | " + " | ".join(vals) + " |")
    lines.append("")
    lines.append(
        f"Objectives: {', '.join(objectives)}. Hypervolume reference point: {list(map(float, ref_point))}."
    )
    return "\n".join(lines) + "\n"


def plot_fronts(
    results: list[MethodResult], objectives: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """One curve per method in the plane of the first two objectives; each point labelled with mu_0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6), dpi=120)
    markers = "os^vD<>pPX*h"
    for k, r in enumerate(results):
        x, y = r.rewards[:, 0], r.rewards[:, 1]
        ax.plot(x, y, marker=markers[k % len(markers)], ms=5, lw=1.4, label=r.method, alpha=0.9)
        for p in range(len(x)):
            if len(x) <= 11 or p % 2 == 0:
                ax.annotate(
                    f"{r.preferences[p, 0]:.3g}",
                    (x[p], y[p]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                    alpha=0.7,
                )
    ax.set_xlabel(f"{objectives[0]} (mean reward)")
    ax.set_ylabel(f"{objectives[1]} (mean reward)")
    ax.set_title(title or f"Pareto fronts; labels: preference for {objectives[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(
    out_dir: str | Path,
    rows: list[dict],
    scores: np.ndarray,
    prompts: Sequence,
    grid: np.ndarray,
    results: list[MethodResult],
    objectives: Sequence[str],
    ref_point: Sequence[float],
    extra: dict | None = None,
    extra_columns: dict[str, dict[str, str]] | None = None,
) -> dict:
    """Write generations, rewards, metrics (JSON + Markdown) and the front plot; return the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = {
        "method": [r["method"] for r in rows],
        "preference": [[float(v) for v in grid[r["pref_index"]]] for r in rows],
        "prompt": [_prompt_text(prompts[r["prompt_index"]]) for r in rows],
        "response": [r["text"] for r in rows],
        "error": [r["error"] for r in rows],
    }
    for j, name in enumerate(objectives):
        cols[name] = [None if math.isnan(v) else float(v) for v in scores[:, j]]
    tmp = out / ".generations.parquet.tmp"
    pq.write_table(pa.table(cols), tmp)
    os.replace(tmp, out / "generations.parquet")
    summary = {
        "objectives": list(objectives),
        "ref_point": [float(v) for v in ref_point],
        "grid": grid.tolist(),
        "n_prompts": len(prompts),
        "methods": {
            r.method: {"rewards": r.rewards.tolist(), "metrics": _jsonable(r.metrics), "errors": r.n_errors}
            for r in results
        },
        **(extra or {}),
    }
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    atomic_write_text(
        out / "rewards.json",
        json.dumps(
            {
                r.method: [{"preference": g, "rewards": v} for g, v in zip(grid.tolist(), r.rewards.tolist())]
                for r in results
            },
            indent=2,
        ),
    )
    atomic_write_text(out / "metrics.md", metrics_markdown(results, objectives, ref_point, extra_columns))
    plot_fronts(results, objectives, out / "front.png")
    return summary


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, np.ndarray):
            out[k] = v.tolist()
        elif isinstance(v, (np.floating, np.integer)):
            out[k] = v.item()
        elif isinstance(v, (list, tuple)):
            out[k] = [float(x) for x in v]
        else:
            out[k] = v
    return out


def reference_point(objectives, override: Sequence[float] | None = None) -> list[float]:
    """The task's fixed HV reference point, the same for every method of a report.

    ``eval.ref_point`` when set, else each objective's lower bound (``Objective.bounds[0]``): the worst score
    the objective can give, so no method's point is ever cut off by the reference.
    """
    if override is not None:
        if len(override) != len(objectives):
            raise EvaluationError(
                f"eval.ref_point has {len(override)} values for {len(objectives)} objectives"
            )
        return [float(v) for v in override]
    missing = [o.name for o in objectives if getattr(o, "bounds", None) is None]
    if missing:
        raise EvaluationError(
            f"objectives {missing} are unbounded, so they have no recorded reference value; set "
            f"eval.ref_point (one value per objective, below every reward you expect)"
        )
    return [float(o.bounds[0]) for o in objectives]


def evaluate(
    engine,
    objectives,
    prompts: Sequence,
    methods: Sequence[str],
    grid: np.ndarray,
    *,
    ref_point: Sequence[float],
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    min_prompts: int = 1,
    request_kwargs: dict | None = None,
    progress: bool = True,
    extra: dict | None = None,
    extra_columns: dict[str, dict[str, str]] | None = None,
) -> dict:
    """Decode + score + metrics for ``methods`` over ``grid``; writes the report when ``out_dir`` is set."""
    if len(prompts) < min_prompts:
        raise EvaluationError(
            f"the test set has {len(prompts)} prompts; at least {min_prompts} are needed "
            f"(eval.min_test_prompts) for a meaningful front"
        )
    grid = np.asarray(grid, dtype=float)
    if grid.ndim != 2 or grid.shape[1] != len(objectives):
        raise EvaluationError(f"preference grid has shape {grid.shape}; expected (P, {len(objectives)})")
    bar = None
    cb = None
    if progress:
        from tqdm.auto import tqdm

        total = len(methods) * len(grid) * len(prompts)
        bar = tqdm(total=total, desc="evaluate", unit="gen", dynamic_ncols=True)

        def cb(done, total):
            bar.update(done - bar.n)

    t0 = time.time()
    rows = decode_grid(
        engine, prompts, grid, methods, batch_size=batch_size, request_kwargs=request_kwargs, progress=cb
    )
    if bar is not None:
        bar.close()
    decode_s = time.time() - t0
    scores = score_generations(rows, prompts, objectives)
    names = [o.name for o in objectives]
    results = summarise(rows, scores, grid, methods, ref_point)
    summary = {"decode_seconds": decode_s, **(extra or {})}
    if out_dir is not None:
        summary = write_report(
            out_dir, rows, scores, prompts, grid, results, names, ref_point, summary, extra_columns
        )
    else:
        summary = {
            "methods": {
                r.method: {"rewards": r.rewards.tolist(), "metrics": _jsonable(r.metrics)} for r in results
            },
            "ref_point": list(ref_point),
            **summary,
        }
    return summary
