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

METRIC_COLUMNS = (
    "hv",
    "inner_product",
    "sparsity",
    "spacing",
    "controllability",
    "controllability_literal",
    "front_length",
)
_ARROWS = {
    "hv": "↑",
    "inner_product": "↑",
    "sparsity": "↓",
    "spacing": "↓",
    "controllability": "↑",
    "controllability_literal": "↑",
    "front_length": "↑",
}


DEGENERATE_TARGET = 0.05
"""Share of flagged responses above which a front point is drawn hollow, and the bound of the degenerate claim."""
MAGE_METHODS = tuple(m for m, spec in REGISTRY.items() if spec.family == "mage")


@dataclass
class MethodResult:
    method: str
    """The row's label: a registry method name, or a label of :func:`mage_ray.evaluate.evaluate`'s ``settings``."""
    preferences: np.ndarray  # (P, n)
    rewards: np.ndarray  # (P, n) mean reward per preference
    metrics: dict
    n_errors: int = 0
    per_prompt: np.ndarray | None = None  # (P, N, n) rewards per preference and prompt, NaN where it errored
    degenerate: np.ndarray | None = None  # (P,) fraction of the preference's responses flagged degenerate
    flags: np.ndarray | None = None  # (P, N) 1.0 / 0.0 degenerate flag per response, NaN where it errored
    base: str | None = None
    """The registry method the row decodes (None: ``method`` itself)."""

    @property
    def decodes(self) -> str:
        """The registry method behind the row."""
        return self.base or self.method


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content", "") for m in prompt)


def _band(b: dict, digits: int = 4) -> str:
    return f"{b['value']:.{digits}g} [{b['lo']:.{digits}g}, {b['hi']:.{digits}g}]"


def _setting(context: dict | None, label: str) -> dict:
    """The decode settings of a row (method, alpha, gamma) recorded by the evaluation, or {}."""
    return ((context or {}).get("settings") or {}).get(label) or {}


def setting_text(context: dict | None, label: str) -> str:
    """'alpha 0.4, gamma 3' for a row whose settings were recorded ('' otherwise); gamma only for guided methods."""
    st = _setting(context, label)
    if not st:
        return ""
    family = REGISTRY[st["method"]].family if st.get("method") in REGISTRY else ""
    uses_alpha = family == "mage" or st.get("method") in ("bs", "bs-wrpo")  # the Bone Soup policy (Eq. 13)
    parts = [f"alpha {st['alpha']:g}"] if st.get("alpha") is not None and uses_alpha else []
    if st.get("gamma") is not None and family in ("mage", "arm"):
        parts.append(f"gamma {st['gamma']:g}")
    return ", ".join(parts)


def mage_rows(results: list[MethodResult], context: dict | None = None) -> tuple[list[str], list[str]]:
    """(rows that are MAGE: a MAGE method decoded with guidance on, rows of a MAGE method at gamma 0). A row
    whose gamma was not recorded counts as MAGE."""
    on, off = [], []
    for r in results:
        if r.decodes in MAGE_METHODS:
            gamma = _setting(context, r.method).get("gamma")
            (off if gamma is not None and float(gamma) == 0.0 else on).append(r.method)
    return on, off


def degenerate_claim(r: MethodResult, boot: dict | None, confidence: float) -> dict | None:
    """The degenerate-rate bounds of a row (:func:`mage_ray.uncertainty.degenerate_bounds`): from the bootstrap
    summary when it carries them, else from the row's flags; None without flags."""
    from mage_ray.uncertainty import degenerate_bounds

    b = ((boot or {}).get("methods") or {}).get(r.method, {}).get("degenerate")
    if b is None and r.flags is not None:
        b = degenerate_bounds(r.flags, confidence=confidence, target=DEGENERATE_TARGET)
    return b


def claims(
    results: list[MethodResult], boot: dict, target_control: float = 0.9, context: dict | None = None
) -> list[dict]:
    """The paper's claims checked on this report, each with its interval and a verdict.

    "holds" only when the whole interval is on the claimed side (HV ratio > 1, controllability bounds >= target,
    every preference's degenerate upper bound <= 5%); "fails" when the whole interval is on the wrong side;
    otherwise "no evidence". MAGE is a MAGE method decoded with guidance on (gamma > 0 where the evaluation
    recorded its settings); a MAGE method at gamma 0 is Bone Soup with guidance off and carries no MAGE claim.
    When ``context["mage_choice"]`` names the variant chosen on validation, that variant carries the claim;
    otherwise every MAGE row carries its own (no variant is picked on the test prompts).
    Controllability claims use the bounds over the objectives whose weight changes
    (:func:`mage_ray.uncertainty.controllability_bounds`).
    """
    by = {r.method: r for r in results}
    confidence = float(boot.get("confidence", 0.9))
    out = []

    def named(label: str) -> str:
        st = setting_text(context, label)
        return f"{label} ({st})" if st else label

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

    on, _ = mage_rows(results, context)
    choice = ((context or {}).get("mage_choice") or {}).get("method")
    if "bs" in by and "rs" in by:
        ratio_claim("bs", "rs", f"Bone Soup ({named('bs')}) HV above Rewarded Soups")
    if choice in on:
        carriers = [choice]
        ratio_claim(
            choice, "bs", f"MAGE ({named(choice)}, the variant chosen on validation HV) HV above Bone Soup"
        )
    else:
        carriers = on
        for m in on:
            what = f"MAGE ({named(m)}) HV above Bone Soup"
            if len(on) > 1:
                what += " (one claim per variant: none was chosen on validation)"
            ratio_claim(m, "bs", what)
    for m in [x for x in ("bs", *carriers) if x in by]:
        c = boot["methods"][m]["controllability"]
        verdict = (
            "holds" if c["lo"] >= target_control else ("fails" if c["hi"] < target_control else "no evidence")
        )
        literal = f"; Definition 1 literal {c['literal']:.3g}" if c.get("literal") is not None else ""
        out.append(
            {
                "claim": f"controllability of {m} >= {target_control}",
                "verdict": verdict,
                "numbers": f"controllability = {_band(c, 3)}{literal}",
            }
        )
        d = degenerate_claim(by[m], boot, confidence)
        if d is not None:
            rates = [x for x in d["rate"] if x is not None]
            his = [x for x in d["hi"] if x is not None]
            k_worst = int(np.nanargmax([np.nan if x is None else x for x in d["rate"]]))
            out.append(
                {
                    "claim": f"degenerate responses of {m} <= {DEGENERATE_TARGET:.0%} at every preference",
                    "verdict": d["verdict"],
                    "numbers": (
                        f"worst preference {rates[k_worst] if rates else float('nan'):.1%} "
                        f"({d['k'][k_worst]}/{d['m'][k_worst]}, exact interval [{d['lo'][k_worst]:.1%}, "
                        f"{d['hi'][k_worst]:.1%}]); largest upper bound {max(his):.1%}; mean "
                        f"{float(np.mean(rates)):.1%}"
                        + (
                            f"; {d['m'][k_worst]} prompts per preference cannot show <= {DEGENERATE_TARGET:.0%} "
                            f"(needs >= {d['min_prompts']})"
                            if d["min_prompts"] and min(d["m"]) < d["min_prompts"]
                            else ""
                        )
                    ),
                }
            )
    return out


def _degenerate_cell(r: MethodResult, boot: dict | None) -> str:
    """Mean share of flagged responses (worst preference, and its exact upper bound when the flags are kept)."""
    cell = f"{np.mean(r.degenerate):.1%} (max {np.max(r.degenerate):.1%}"
    d = degenerate_claim(r, boot, float((boot or {}).get("confidence", 0.9)))
    if d is not None:
        cell += f", upper bound {max(h for h in d['hi'] if h is not None):.1%}"
    return cell + ")"


def metrics_markdown(
    results: list[MethodResult],
    objectives: Sequence[str],
    ref_point: Sequence[float],
    extra_columns: dict[str, dict[str, str]] | None = None,
    boot: dict | None = None,
    context: dict | None = None,
) -> str:
    """The metric table (with the intervals, the controllability bounds and degenerate rates when given) and the
    claims. ``context``: the evaluation's ``settings`` (label -> method, alpha, gamma), ``mage_choice`` and
    ``serving`` (the sweep's serving choice), when known."""
    banded = {"hv", "inner_product", "controllability"} if boot else set()
    cols = list(METRIC_COLUMNS) + (["degenerate"] if results[0].degenerate is not None else [])
    cols += list(extra_columns or {})
    with_settings = any(setting_text(context, r.method) for r in results)
    head = (
        "| method | "
        + ("settings | " if with_settings else "")
        + " | ".join(f"{c} {_ARROWS.get(c, '')}".strip() for c in cols)
        + " |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 1 + with_settings)]
    for r in results:
        vals = [setting_text(context, r.method)] if with_settings else []
        for c in cols:
            if c in banded:
                vals.append(_band(boot["methods"][r.method][c]))
            elif c in METRIC_COLUMNS:
                v = r.metrics.get(c)
                vals.append("" if v is None else str(v) if isinstance(v, (int, np.integer)) else f"{v:.4g}")
            elif c == "degenerate":
                vals.append(_degenerate_cell(r, boot))
            else:
                vals.append(extra_columns[c].get(r.method, ""))
        lines.append(f"| {r.method} | " + " | ".join(vals) + " |")
    lines.append("")
    lines.append(
        f"Objectives: {', '.join(objectives)}. Hypervolume reference point: {list(map(float, ref_point))}."
    )
    lines.append(
        "controllability: Definition 1 of MAGE (arXiv 2510.03782) over the objectives whose weight changes between "
        "the two preferences (what the claims use); controllability_literal: Definition 1 as written, where an "
        "objective whose weight is unchanged must have exactly equal rewards (the two agree for 2 objectives)."
    )
    if results[0].degenerate is not None:
        lines.append(
            "degenerate: share of responses flagged by the quality gate (mage_ray.tasks.quality), mean over the "
            "preferences (worst preference; the largest exact upper bound over the preferences)."
        )
    _, off = mage_rows(results, context)
    for m in off:
        lines.append(f"{m} was decoded at gamma = 0: Bone Soup with guidance off, not MAGE (no MAGE claim).")
    serving = (context or {}).get("serving") or {}
    if (
        serving.get("method") in MAGE_METHODS
        and serving.get("gamma") is not None
        and float(serving["gamma"]) == 0
    ):
        lines.append(
            f"The sweep serves {serving['method']} at gamma = 0 (alpha {serving.get('alpha', 0):g}): bs (guidance "
            "off). The MAGE rows above are each variant at its best gamma > 0 on validation."
        )
    if boot:
        lines.append(
            f"Brackets: hv and inner_product: {boot['confidence']:.0%} interval, {boot['method']} "
            f"({boot['n_resamples']} resamples of the {boot['n_prompts']} prompts). controllability: bounds that "
            f"hold together with probability >= {boot['confidence']:.0%} ({boot.get('control_method', '')}); "
            "not centred on the point estimate."
        )
        if boot["ratios"]:
            lines += ["", "| HV ratio | value [interval] | interval above 1 |", "|---|---|---|"]
            for k, x in boot["ratios"].items():
                lines.append(f"| {k} | {_band(x, 3)} | {'yes' if x['holds'] else 'no'} |")
        rows = claims(results, boot, context=context)
        if rows:
            lines += ["", "| claim | verdict | numbers |", "|---|---|---|"]
            lines += [f"| {c['claim']} | **{c['verdict']}** | {c['numbers']} |" for c in rows]
            lines.append(
                "\n'holds' only when the whole interval is on the claimed side; 'fails' when it is all on the "
                "other side; 'no evidence' when it straddles. Degenerate: 'holds' when every preference's exact "
                "upper bound is <= 5%, 'fails' when one preference's lower bound (simultaneous over the "
                "preferences) is above 5%."
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
    context: dict | None = None,
) -> dict:
    """Write generations, rewards, metrics (JSON + Markdown), samples and the front plot; return the summary.

    ``context`` (settings, mage_choice, serving: see :func:`metrics_markdown`) is kept in metrics.json, so a
    report recomputed from the saved rewards (:func:`mage_ray.rereport.recompute_report`) has it too."""
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
        **_boot_summary(results, boot, context),
        **({"context": context} if context else {}),
        **(extra or {}),
    }
    write_text_atomic(join(out, "metrics.json"), json.dumps(summary, indent=2))
    write_text_atomic(join(out, "rewards.json"), json.dumps(_rewards_json(results, boot), indent=2))
    write_text_atomic(
        join(out, "metrics.md"),
        metrics_markdown(results, objectives, ref_point, extra_columns, boot, context),
    )
    write_text_atomic(
        join(out, "samples.md"), samples_markdown(rows, scores, flags, prompts, grid, objectives)
    )
    plot_fronts(results, objectives, join(out, "front.png"))
    return summary


def _rewards_json(results: list[MethodResult], boot: dict | None = None) -> dict:
    """method -> [{preference, rewards, stderr, degenerate, degenerate_interval}] per preference."""
    from mage_ray.uncertainty import front_stderr

    out = {}
    for r in results:
        P = len(r.rewards)
        se = front_stderr(r.per_prompt).tolist() if r.per_prompt is not None else [None] * P
        deg = [None] * P if r.degenerate is None else [float(d) for d in r.degenerate]
        d = degenerate_claim(r, boot, float((boot or {}).get("confidence", 0.9)))
        ci = [None] * P if d is None else [[lo, hi] for lo, hi in zip(d["lo"], d["hi"])]
        out[r.method] = [
            {"preference": g, "rewards": v, "stderr": e, "degenerate": dg, "degenerate_interval": c}
            for g, v, e, dg, c in zip(r.preferences.tolist(), r.rewards.tolist(), se, deg, ci)
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
        out["intervals"] = {k: b[k] for k in ("hv", "inner_product", "controllability") if k in b}
        if "degenerate" in b:
            out["intervals"]["degenerate"] = b["degenerate"]
        out["stderr"] = b["stderr"]
    return out


def _boot_summary(results: list[MethodResult], boot: dict | None, context: dict | None = None) -> dict:
    if not boot:
        return {}
    return {
        "bootstrap": {k: v for k, v in boot.items() if k != "methods"},
        "claims": claims(results, boot, context=context),
    }


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
