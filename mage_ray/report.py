"""The evaluation report: the metric table with intervals and claims, the front plot, sample responses, and the
files an evaluation writes (generations.parquet, rewards.json, metrics.json / metrics.md, samples.md, front.png).

:mod:`mage_ray.evaluate` decodes and scores; this module turns its per-method results into what a reader sees.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mage_ray.guidance import REGISTRY
from mage_ray.manifest import atomic_file, join, write_text_atomic

METRIC_COLUMNS = ("hv", "inner_product", "sparsity", "spacing", "controllability", "front_length")
_ARROWS = {
    "hv": "↑",
    "inner_product": "↑",
    "sparsity": "↓",
    "spacing": "↓",
    "controllability": "↑",
    "front_length": "↑",
}


DEGENERATE_TARGET = 0.05
"""Fraction of flagged responses above which a front point is drawn hollow and a claim about it fails."""
MAGE_METHODS = tuple(m for m, spec in REGISTRY.items() if spec.family == "mage")


@dataclass
class MethodResult:
    method: str
    preferences: np.ndarray  # (P, n)
    rewards: np.ndarray  # (P, n) mean reward per preference
    metrics: dict
    n_errors: int = 0
    per_prompt: np.ndarray | None = None  # (P, N, n) rewards per preference and prompt, NaN where it errored
    degenerate: np.ndarray | None = None  # (P,) fraction of the preference's responses flagged degenerate


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content", "") for m in prompt)


def _band(b: dict, digits: int = 4) -> str:
    return f"{b['value']:.{digits}g} [{b['lo']:.{digits}g}, {b['hi']:.{digits}g}]"


def claims(results: list[MethodResult], boot: dict, target_control: float = 0.9) -> list[dict]:
    """The paper's claims checked on this report, each with its interval and a verdict.

    "holds" only when the whole interval is on the right side (ratio > 1, controllability >= target); "fails"
    when the whole interval is on the wrong side; otherwise "no evidence". The best MAGE variant is the one with
    the largest test HV (a choice made on the test prompts, said so in the row).
    """
    by = {r.method: r for r in results}
    out = []

    def ratio_claim(a: str, b: str, what: str) -> None:
        x = boot["ratios"].get(f"{a}/{b}")
        if x is None:
            return
        verdict = "holds" if x["lo"] > 1 else ("fails" if x["hi"] < 1 else "no evidence")
        numbers = f"HV {a}/{b} = {_band(x, 3)}"
        pa, pb = by[a].per_prompt, by[b].per_prompt
        # identical responses can differ in the last float bits of a batched embedding's score
        if pa is not None and pb is not None and np.allclose(pa, pb, rtol=0.0, atol=1e-5, equal_nan=True):
            numbers += f"; {a} scored as {b} on every prompt and preference (e.g. guidance strength 0)"
        out.append({"claim": what, "verdict": verdict, "numbers": numbers})

    mage = [m for m in MAGE_METHODS if m in by]
    best = max(mage, key=lambda m: by[m].metrics["hv"]) if mage else None
    ratio_claim("bs", "rs", "Bone Soup HV above Rewarded Soups")
    if best is not None:
        ratio_claim(best, "bs", f"MAGE (best variant on test HV: {best}) HV above Bone Soup")
    for m in [x for x in ("bs", best) if x in by]:
        c = boot["methods"][m]["controllability"]
        verdict = (
            "holds" if c["lo"] >= target_control else ("fails" if c["hi"] < target_control else "no evidence")
        )
        out.append(
            {
                "claim": f"controllability of {m} >= {target_control}",
                "verdict": verdict,
                "numbers": f"controllability = {_band(c, 3)}",
            }
        )
        if by[m].degenerate is not None:
            worst = float(np.max(by[m].degenerate))
            out.append(
                {
                    "claim": f"degenerate responses of {m} <= {DEGENERATE_TARGET:.0%} at every preference",
                    "verdict": "holds" if worst <= DEGENERATE_TARGET else "fails",
                    "numbers": f"worst preference {worst:.1%} (mean {float(np.mean(by[m].degenerate)):.1%})",
                }
            )
    return out


def metrics_markdown(
    results: list[MethodResult],
    objectives: Sequence[str],
    ref_point: Sequence[float],
    extra_columns: dict[str, dict[str, str]] | None = None,
    boot: dict | None = None,
) -> str:
    """The metric table (with the bootstrap intervals and degenerate rates when given) and the claims."""
    banded = {"hv", "inner_product", "controllability"} if boot else set()
    cols = list(METRIC_COLUMNS) + (["degenerate"] if results[0].degenerate is not None else [])
    cols += list(extra_columns or {})
    head = "| method | " + " | ".join(f"{c} {_ARROWS.get(c, '')}".strip() for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for r in results:
        vals = []
        for c in cols:
            if c in banded:
                vals.append(_band(boot["methods"][r.method][c]))
            elif c in METRIC_COLUMNS:
                v = r.metrics[c]
                vals.append(str(v) if isinstance(v, (int, np.integer)) else f"{v:.4g}")
            elif c == "degenerate":
                vals.append(f"{np.mean(r.degenerate):.1%} (max {np.max(r.degenerate):.1%})")
            else:
                vals.append(extra_columns[c].get(r.method, ""))
        lines.append(f"| {r.method} | " + " | ".join(vals) + " |")
    lines.append("")
    lines.append(
        f"Objectives: {', '.join(objectives)}. Hypervolume reference point: {list(map(float, ref_point))}."
    )
    if results[0].degenerate is not None:
        lines.append(
            "degenerate: share of responses flagged by the quality gate (mage_ray.tasks.quality), mean over "
            "the preferences (worst preference)."
        )
    if boot:
        lines.append(
            f"Brackets: {boot['confidence']:.0%} interval, {boot['method']} ({boot['n_resamples']} resamples "
            f"of the {boot['n_prompts']} prompts)."
        )
        if boot["ratios"]:
            lines += ["", "| HV ratio | value [interval] | interval above 1 |", "|---|---|---|"]
            for k, x in boot["ratios"].items():
                lines.append(f"| {k} | {_band(x, 3)} | {'yes' if x['holds'] else 'no'} |")
        rows = claims(results, boot)
        if rows:
            lines += ["", "| claim | verdict | numbers |", "|---|---|---|"]
            lines += [f"| {c['claim']} | **{c['verdict']}** | {c['numbers']} |" for c in rows]
            lines.append(
                "\n'holds' only when the whole interval is on the claimed side; 'fails' when it is all on the "
                "other side; 'no evidence' when it straddles."
            )
    return "\n".join(lines) + "\n"


def plot_fronts(
    results: list[MethodResult], objectives: Sequence[str], path: str | Path, title: str = ""
) -> dict:
    """Fronts with +-1 s.e. bars and hollow markers for degenerate points (:func:`mage_ray.plots.plot_fronts`)."""
    from mage_ray.plots import Front
    from mage_ray.plots import plot_fronts as draw
    from mage_ray.uncertainty import front_stderr

    fronts = [
        Front(
            r.method,
            r.preferences,
            r.rewards,
            None if r.per_prompt is None else front_stderr(r.per_prompt),
            r.degenerate,
        )
        for r in results
    ]
    return draw(fronts, objectives, path, title=title, degenerate_threshold=DEGENERATE_TARGET)


def samples_markdown(
    rows: list[dict],
    scores: np.ndarray,
    flags: np.ndarray | None,
    prompts: Sequence,
    grid: np.ndarray,
    objectives: Sequence[str],
    n_prompts: int = 3,
) -> str:
    """Responses of every method to the first ``n_prompts`` prompts at the grid's vertices (all weight on one
    objective) and its most central preference, with their scores: a reader sees the text, not only numbers."""
    from mage_ray.plots import preference_label

    vertices = [int(p) for j in range(grid.shape[1]) for p in np.flatnonzero(np.isclose(grid[:, j], 1.0))]
    centre = int(
        np.argmin(np.abs(grid - 1.0 / grid.shape[1]).sum(axis=1))
    )  # (.5,.5); (.25,.25,.5) at step .25
    picks = list(dict.fromkeys([*vertices, centre]))
    index = {(r["method"], r["pref_index"], r["prompt_index"]): k for k, r in enumerate(rows)}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = [
        "# Sample responses\n\n",
        f"Responses of each method at the preferences {', '.join(preference_label(grid[p]) for p in picks)} "
        f"over ({', '.join(objectives)}) for the first {n_prompts} prompts, scores in brackets; DEGENERATE "
        "marks a response the quality gate flags.\n",
    ]
    for i in range(min(n_prompts, len(prompts))):
        out.append(f"\n## Prompt {i + 1}: {prompt_text(prompts[i])!r}\n")
        for m in methods:
            out.append(f"\n**{m}**\n\n")
            for p in picks:
                k = index.get((m, p, i))
                if k is None:
                    continue
                r = rows[k]
                if r["error"] is not None:
                    out.append(f"- {preference_label(grid[p])}: error: {r['error']}\n")
                    continue
                sc = ", ".join(f"{o} {v:.2f}" for o, v in zip(objectives, scores[k]))
                flag = " DEGENERATE" if flags is not None and flags[k] == 1 else ""
                text = " ".join(r["text"].split())
                out.append(f"- {preference_label(grid[p])} [{sc}]{flag}: {text!r}\n")
    return "".join(out)


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
    flags: np.ndarray | None = None,
    boot: dict | None = None,
) -> dict:
    """Write generations, rewards, metrics (JSON + Markdown), samples and the front plot; return the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(out_dir)  # a local directory or a URI (mage_ray.storage); each file is written atomically
    cols = {
        "method": [r["method"] for r in rows],
        "preference": [[float(v) for v in grid[r["pref_index"]]] for r in rows],
        "prompt_index": [int(r["prompt_index"]) for r in rows],
        "prompt": [prompt_text(prompts[r["prompt_index"]]) for r in rows],
        "response": [r["text"] for r in rows],
        "error": [r["error"] for r in rows],
    }
    for j, name in enumerate(objectives):
        cols[name] = [None if math.isnan(v) else float(v) for v in scores[:, j]]
    if flags is not None:
        cols["degenerate"] = [None if math.isnan(v) else bool(v) for v in flags]
    with atomic_file(join(out, "generations.parquet")) as tmp:
        pq.write_table(pa.table(cols), tmp)
    summary = {
        "objectives": list(objectives),
        "ref_point": [float(v) for v in ref_point],
        "grid": grid.tolist(),
        "n_prompts": len(prompts),
        "methods": {r.method: _method_summary(r, boot) for r in results},
        **_boot_summary(results, boot),
        **(extra or {}),
    }
    write_text_atomic(join(out, "metrics.json"), json.dumps(summary, indent=2))
    write_text_atomic(join(out, "rewards.json"), json.dumps(_rewards_json(results), indent=2))
    write_text_atomic(
        join(out, "metrics.md"), metrics_markdown(results, objectives, ref_point, extra_columns, boot)
    )
    write_text_atomic(
        join(out, "samples.md"), samples_markdown(rows, scores, flags, prompts, grid, objectives)
    )
    plot_fronts(results, objectives, join(out, "front.png"))
    return summary


def _rewards_json(results: list[MethodResult]) -> dict:
    """method -> [{preference, rewards, stderr, degenerate}] per preference."""
    from mage_ray.uncertainty import front_stderr

    out = {}
    for r in results:
        se = front_stderr(r.per_prompt).tolist() if r.per_prompt is not None else [None] * len(r.rewards)
        deg = [None] * len(r.rewards) if r.degenerate is None else [float(d) for d in r.degenerate]
        out[r.method] = [
            {"preference": g, "rewards": v, "stderr": e, "degenerate": d}
            for g, v, e, d in zip(r.preferences.tolist(), r.rewards.tolist(), se, deg)
        ]
    return out


def _method_summary(r: MethodResult, boot: dict | None) -> dict:
    """metrics.json entry of one method: rewards, metrics, errors, degenerate per preference, intervals."""
    out = {"rewards": r.rewards.tolist(), "metrics": _jsonable(r.metrics), "errors": r.n_errors}
    if r.degenerate is not None:
        out["degenerate"] = [float(d) for d in r.degenerate]  # per preference
        out["degenerate_max"] = float(np.max(r.degenerate))
    if boot:
        b = boot["methods"][r.method]
        out["intervals"] = {k: b[k] for k in ("hv", "inner_product", "controllability")}
        out["stderr"] = b["stderr"]
    return out


def _boot_summary(results: list[MethodResult], boot: dict | None) -> dict:
    if not boot:
        return {}
    return {"bootstrap": {k: v for k, v in boot.items() if k != "methods"}, "claims": claims(results, boot)}


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
