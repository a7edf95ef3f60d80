"""Reports recomputed from a finished evaluation, without decoding: every table with the current instruments.

A finished report keeps what every number of it comes from: generations.parquet (one row per (row label,
preference, prompt) with the text, each objective's score and the degenerate flag) and metrics.json (objectives,
reference point, grid, the run's fields, the claims' context). :func:`recompute_report` reads them back
(:func:`read_generations`), recomputes the metrics, intervals, bounds and claims of :mod:`mage_ray.evaluate` and
:mod:`mage_ray.report`, and writes the report again; ``bench/rereport.py`` is its command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mage_ray.evaluate import (
    EvaluationError,
    attach_intervals,
    flag_generations,
    score_generations,
    summarise,
)
from mage_ray.report import METRIC_COLUMNS, write_report

__all__ = ["read_generations", "recompute_report"]


_WRITTEN = ("objectives", "ref_point", "grid", "n_prompts", "methods", "bootstrap", "claims", "context")
"""metrics.json keys that :func:`mage_ray.report.write_report` writes itself (the rest is the run's extra)."""


def _markdown_columns(md: str, known: Sequence[str]) -> dict[str, dict[str, str]]:
    """The columns of a metrics.md table that are not metrics (e.g. "train s"): column -> label -> cell."""
    lines = md.splitlines()
    head = next((k for k, line in enumerate(lines) if line.startswith("| method |")), None)
    if head is None:
        return {}
    names = [c.strip() for c in lines[head].strip("|").split("|")]
    skip = {"method", "settings", "degenerate"} | {c for c in known}
    keep = [(j, n) for j, n in enumerate(names) if n.split(" ")[0] not in skip and n not in skip]
    out: dict[str, dict[str, str]] = {n: {} for _, n in keep}
    for line in lines[head + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for j, n in keep:
            if j < len(cells):
                out[n][cells[0]] = cells[j]
    return out


def read_generations(report_dir: str | Path) -> tuple[list[dict], np.ndarray, np.ndarray | None, list, dict]:
    """A finished report's generations.parquet and metrics.json as the inputs of :func:`summarise`: (rows,
    scores (N, n), flags (N,) or None, prompts (text by prompt index), metrics.json)."""
    import json

    import pyarrow.parquet as pq

    out = Path(report_dir)
    meta = json.loads((out / "metrics.json").read_text())
    table = pq.read_table(out / "generations.parquet").to_pydict()
    grid = np.asarray(meta["grid"], dtype=float)
    index = {tuple(np.round(g, 9)): p for p, g in enumerate(grid)}
    rows = [
        {
            "method": m,
            "pref_index": index[tuple(np.round(np.asarray(pref, dtype=float), 9))],
            "prompt_index": int(i),
            "text": text,
            "error": err,
        }
        for m, pref, i, text, err in zip(
            table["method"], table["preference"], table["prompt_index"], table["response"], table["error"]
        )
    ]
    scores = np.array(
        [[np.nan if v is None else float(v) for v in table[o]] for o in meta["objectives"]], dtype=float
    ).T.reshape(len(rows), len(meta["objectives"]))
    flags = None
    if "degenerate" in table:
        flags = np.array([np.nan if v is None else float(v) for v in table["degenerate"]])
    prompts = [""] * int(meta.get("n_prompts") or 1 + max(r["prompt_index"] for r in rows))
    for r, text in zip(rows, table["prompt"]):
        prompts[r["prompt_index"]] = text
    return rows, scores, flags, prompts, meta


def _merge(base: tuple, other: tuple, where: str) -> tuple:
    """The rows of two read reports (:func:`read_generations`), the other's rows replacing the base's rows of the
    same label; both must share objectives, grid and prompts (so the paired intervals stay paired)."""
    rows, scores, flags, prompts, meta = base
    rows2, scores2, flags2, prompts2, meta2 = other
    for key in ("objectives", "grid"):
        if meta[key] != meta2[key]:
            raise EvaluationError(f"{where}: {key} {meta2[key]} differ from the report's {meta[key]}")
    if prompts != prompts2:
        raise EvaluationError(
            f"{where}: its test prompts differ from the report's (the comparison is paired)"
        )
    new = {r["method"] for r in rows2}
    keep = [k for k, r in enumerate(rows) if r["method"] not in new]
    if (flags is None) != (flags2 is None):
        raise EvaluationError(f"{where}: one report has degenerate flags and the other has none")
    rows = [rows[k] for k in keep] + rows2
    scores = np.concatenate([scores[keep], scores2])
    flags = None if flags is None else np.concatenate([flags[keep], flags2])
    settings = {**((meta.get("context") or {}).get("settings") or {})}
    settings.update((meta2.get("context") or {}).get("settings") or {})
    meta = {
        **meta,
        "context": {**(meta.get("context") or {}), **({"settings": settings} if settings else {})},
    }
    return rows, scores, flags, prompts, meta


def _rename(read: tuple, rename: dict[str, str]) -> tuple:
    """A read report (:func:`read_generations`) with row labels renamed old -> new (and their settings)."""
    rows, scores, flags, prompts, meta = read
    rows = [{**r, "method": rename.get(r["method"], r["method"])} for r in rows]
    ctx = dict(meta.get("context") or {})
    if ctx.get("settings"):
        ctx["settings"] = {rename.get(k, k): v for k, v in ctx["settings"].items()}
    return rows, scores, flags, prompts, {**meta, "context": ctx}


def recompute_report(
    report_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    confidence: float | None = None,
    n_resamples: int | None = None,
    objectives: Sequence | None = None,
    context: dict | None = None,
    add: Sequence[str | Path] = (),
    rename: dict[str, str] | None = None,
) -> dict:
    """Rebuild every table of a finished evaluation report with the current instruments, without decoding.

    Reads ``report_dir``/generations.parquet (text, per-objective score and degenerate flag of every (row,
    preference, prompt)) and metrics.json (objectives, reference point, grid, the run's extra fields, the
    context of the claims), recomputes metrics, intervals, bounds and claims, and writes the full report to
    ``out_dir`` (default: ``report_dir`` itself; samples.md and front.png come out the same when the scores
    do). ``confidence`` / ``n_resamples`` default to the report's own. ``objectives`` (loaded
    :class:`~mage_ray.tasks.objectives.Objective` objects) re-scores every text and re-flags it with the
    current quality gate (the scores then follow any change of the gate); without them the saved scores and
    flags are kept. ``context`` entries (e.g. ``mage_choice``; ``settings`` merged per label) are added to the
    report's own. ``add``: other reports of the same prompts and grid whose rows join this one, replacing rows of
    the same label (e.g. a MAGE variant decoded again at its claims gamma); ``rename`` (old -> new label) renames
    rows of ``report_dir`` first, so a row an added report replaces can stay under another name (``{"bs": "bs
    (alpha 0)"}``). Returns the summary.
    """
    read = read_generations(report_dir)
    if rename:
        read = _rename(read, rename)
    for other in add:
        read = _merge(read, read_generations(other), str(other))
    rows, scores, flags, prompts, meta = read
    if objectives is not None:
        names = [o.name for o in objectives]
        if names != list(meta["objectives"]):
            raise EvaluationError(f"objectives {names} differ from the report's {meta['objectives']}")
        scores = score_generations(rows, prompts, objectives)
        flags = flag_generations(rows, prompts)
    boot_meta = meta.get("bootstrap") or {}
    confidence = float(confidence if confidence is not None else boot_meta.get("confidence", 0.9))
    n_resamples = int(n_resamples if n_resamples is not None else boot_meta.get("n_resamples", 1000))
    grid = np.asarray(meta["grid"], dtype=float)
    ref = [float(v) for v in meta["ref_point"]]
    own = meta.get("context") or {}
    ctx = {**own, **(context or {})}
    if (context or {}).get("settings"):  # per label, over the report's own
        ctx["settings"] = {**(own.get("settings") or {}), **context["settings"]}
    ctx = ctx or None
    settings = (ctx or {}).get("settings")
    labels = list(dict.fromkeys(r["method"] for r in rows))
    results = summarise(rows, scores, grid, labels, ref, flags, settings)
    boot = (
        attach_intervals(results, ref, confidence=confidence, n_resamples=n_resamples)
        if n_resamples
        else None
    )
    out = Path(out_dir or report_dir)
    md = Path(report_dir, "metrics.md")
    columns = _markdown_columns(md.read_text(), METRIC_COLUMNS) if md.is_file() else {}
    extra = {k: v for k, v in meta.items() if k not in _WRITTEN}
    return write_report(
        out, rows, scores, prompts, grid, results, meta["objectives"], ref, extra, columns, flags, boot, ctx
    )
