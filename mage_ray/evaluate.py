"""Evaluate methods over a preference grid: decode, score, metrics, Pareto-front plots, report.

For every method and every preference mu_p of the grid, the test prompts are decoded through the one
decode engine (:class:`mage_ray.decode.Engine`), every response is scored by every objective, and the
mean reward vector R_p (MAGE Sec 3.1.3, the "testing reward" per objective) is the point of that
preference on the method's front. Metrics (Sec 5.4, Definition 1) come from :mod:`mage_ray.metrics`
with one reference point shared by every method of the report.

Every number that claims something carries its uncertainty: per-prompt rewards are kept, HV, inner product and
the HV ratios between methods get paired percentile-bootstrap intervals over the test prompts, controllability
bounds from paired tests per pair of preferences (:mod:`mage_ray.uncertainty`); every response is checked by the
quality gate (:mod:`mage_ray.tasks.quality`) and the share flagged degenerate is reported per method and
preference with its exact binomial interval.

A row of the report is a *label*: a registry method name, or a label of ``settings`` that decodes a method with
its own alpha / gamma (``{"bs (alpha 0)": {"method": "bs", "alpha": 0.0}}``), so one report can hold a method
at the sweep's serving choice and at the choice its claims use. :func:`mage_ray.rereport.recompute_report`
rebuilds every table of a finished report from its generations.parquet without decoding again.

Artifacts written to ``out_dir`` (each atomically):
  generations.parquet  one row per (method, preference, prompt): text, per-objective scores, degenerate flag
  rewards.json         per-method list of {preference, mean rewards, standard errors, degenerate fraction}
  metrics.json / metrics.md   the metric table with intervals, degenerate rates, HV ratios and the claims
  front.png            Pareto fronts (+-1 s.e. bars, hollow markers where > 5% of responses are degenerate)
  samples.md           sample responses at three preferences per method (read the texts, not only numbers)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mage_ray import metrics as M
from mage_ray.report import MethodResult, _boot_summary, _method_summary, prompt_text, write_report


class EvaluationError(ValueError):
    """The evaluation cannot run as asked (too few prompts, bad grid, ...)."""


def _request_overrides(settings: dict | None, label: str) -> tuple[str, dict]:
    """(registry method, request fields alpha / gamma) of a row label; a label without settings is its method."""
    st = (settings or {}).get(label) or {}
    return st.get("method", label), {k: float(st[k]) for k in ("alpha", "gamma") if st.get(k) is not None}


def decode_settings(decode, methods: Sequence[str]) -> dict[str, dict]:
    """What each method decodes with under the decode defaults ``decode`` (a DecodeConfig, e.g. a bundle's
    :func:`mage_ray.decode.decode_defaults`): label -> {"method", "alpha", "gamma"} (a method's own
    ``method_gammas`` entry, else ``gamma``)."""
    gammas = decode.method_gammas or {}
    return {
        m: {"method": m, "alpha": float(decode.alpha), "gamma": float(gammas.get(m, decode.gamma))}
        for m in methods
    }


def decode_grid(
    engine,
    prompts: Sequence,
    grid: np.ndarray,
    methods: Sequence[str],
    *,
    batch_size: int = 16,
    request_kwargs: dict | None = None,
    progress: Callable[[int, int], None] | None = None,
    settings: dict[str, dict] | None = None,
):
    """Decode every (label, preference, prompt) through the engine, in heterogeneous batches.

    ``methods`` are row labels; ``settings[label]`` = {"method", "alpha", "gamma"} decodes a label as that method
    with those request fields (over ``request_kwargs``). Returns a list of dicts (method = the label,
    pref_index, prompt_index, text, error), in request order.
    """
    from mage_ray.decode import Request

    kw = dict(request_kwargs or {})
    jobs = [(m, p, i) for m in methods for p in range(len(grid)) for i in range(len(prompts))]
    out: list[dict] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        reqs = []
        for m, p, i in chunk:
            method, own = _request_overrides(settings, m)
            pref = [float(x) for x in grid[p]]
            reqs.append(Request(prompt=prompts[i], preference=pref, method=method, **{**kw, **own}))
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
        ps = [prompt_text(prompts[rows[k]["prompt_index"]]) for k in ok]
        scores[ok] = score(objectives, ps, texts)
    return scores


def flag_generations(rows: list[dict], prompts: Sequence) -> np.ndarray:
    """(N,) 1.0 where the text is flagged degenerate by the quality gate, 0.0 where not, NaN where it errored."""
    from mage_ray.tasks.quality import degenerate_mask

    ok = [k for k, r in enumerate(rows) if r["error"] is None]
    flags = np.full(len(rows), np.nan)
    if ok:
        ps = [prompt_text(prompts[rows[k]["prompt_index"]]) for k in ok]
        flags[ok] = degenerate_mask(ps, [rows[k]["text"] for k in ok])
    return flags


def summarise(
    rows: list[dict],
    scores: np.ndarray,
    grid: np.ndarray,
    methods: Sequence[str],
    ref_point: Sequence[float],
    flags: np.ndarray | None = None,
    settings: dict[str, dict] | None = None,
) -> list[MethodResult]:
    """Per-prompt rewards (P, N, n), mean reward per (label, preference), degenerate flags and rate, metric row."""
    from mage_ray.grid import point_summary

    n_prompts = 1 + max(r["prompt_index"] for r in rows)
    results = []
    for m in methods:
        X = np.full((len(grid), n_prompts, scores.shape[1]), np.nan)  # (P, N, n)
        D = np.full((len(grid), n_prompts), np.nan)  # (P, N) degenerate flags
        errors = 0
        for k, r in enumerate(rows):
            if r["method"] == m:
                X[r["pref_index"], r["prompt_index"]] = scores[k]
                if flags is not None:
                    D[r["pref_index"], r["prompt_index"]] = flags[k]
        for p in range(len(grid)):
            bad = np.isnan(X[p]).any(axis=1)
            errors += int(bad.sum())
            if bad.all():
                first = next((r["error"] for r in rows if r["method"] == m and r["pref_index"] == p), None)
                raise EvaluationError(
                    f"method {m!r} produced no valid generation at preference {grid[p].tolist()}: "
                    f"first error: {first or 'no rows'}"
                )
        X[np.isnan(X).any(axis=2)] = np.nan  # a generation counts for all objectives or none
        s = point_summary(X, None if flags is None else D)
        R, deg = s["means"], s["degenerate"]  # (P, n), (P,)
        base = _request_overrides(settings, m)[0]
        results.append(
            MethodResult(
                m,
                grid.copy(),
                R,
                M.all_metrics(R, grid, ref_point),
                errors,
                X,
                deg,
                None if flags is None else D,
                None if base == m else base,
            )
        )
    return results


def claim_pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """HV ratios reported with intervals: bs/rs, and every other row (MAGE variants, the ARM methods, other
    labels) over bs."""
    pairs = [("bs", "rs")] if {"bs", "rs"} <= set(methods) else []
    if "bs" in methods:
        pairs += [(m, "bs") for m in methods if m not in ("bs", "rs")]
    return pairs


def attach_intervals(
    results: list[MethodResult],
    ref_point: Sequence[float],
    *,
    confidence: float = 0.9,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Paired bootstrap over prompts and controllability bounds (:func:`mage_ray.uncertainty.bootstrap_fronts`)
    for every row, plus the exact degenerate-rate intervals of the rows whose flags were kept."""
    from mage_ray.report import DEGENERATE_TARGET
    from mage_ray.uncertainty import bootstrap_fronts, degenerate_bounds

    boot = bootstrap_fronts(
        {r.method: r.per_prompt for r in results},
        results[0].preferences,
        ref_point,
        ratios=claim_pairs([r.method for r in results]),
        confidence=confidence,
        n_resamples=n_resamples,
        seed=seed,
    )
    for r in results:
        if r.flags is not None:
            boot["methods"][r.method]["degenerate"] = degenerate_bounds(
                r.flags, confidence=confidence, target=DEGENERATE_TARGET
            )
    return boot


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
    confidence: float = 0.9,
    n_resamples: int = 1000,
    settings: dict[str, dict] | None = None,
    context: dict | None = None,
) -> dict:
    """Decode + score + metrics for ``methods`` (row labels) over ``grid``; writes the report when ``out_dir`` is set.

    ``settings``: label -> {"method", "alpha", "gamma"} decode overrides (:func:`decode_grid`); ``context``: what
    the claims need to know (``mage_choice``, ``serving``; :func:`mage_ray.report.claims`), with ``settings``
    added. The summary has, per row, the mean rewards, the metric row and the degenerate rate per preference;
    with ``n_resamples > 0`` also the paired bootstrap intervals and the claims. Without ``out_dir`` it also
    carries ``per_prompt`` (label -> (P, N, n) nested list) for sweep decisions.
    """
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
        engine,
        prompts,
        grid,
        methods,
        batch_size=batch_size,
        request_kwargs=request_kwargs,
        progress=cb,
        settings=settings,
    )
    if bar is not None:
        bar.close()
    decode_s = time.time() - t0
    scores = score_generations(rows, prompts, objectives)
    flags = flag_generations(rows, prompts)
    names = [o.name for o in objectives]
    results = summarise(rows, scores, grid, methods, ref_point, flags, settings)
    context = {**(context or {}), **({"settings": settings} if settings else {})} or None
    cut = below_reference(results, ref_point)
    boot = None
    if n_resamples > 0:
        boot = attach_intervals(results, ref_point, confidence=confidence, n_resamples=n_resamples)
    summary = {"decode_seconds": decode_s, **(extra or {}), **({"below_ref_point": cut} if cut else {})}
    if out_dir is not None:
        return write_report(
            out_dir,
            rows,
            scores,
            prompts,
            grid,
            results,
            names,
            ref_point,
            summary,
            extra_columns,
            flags,
            boot,
            context,
        )
    return {
        "methods": {r.method: _method_summary(r, boot) for r in results},
        "per_prompt": {r.method: r.per_prompt.tolist() for r in results},
        "ref_point": list(ref_point),
        **_boot_summary(results, boot, context),
        **summary,
    }


def below_reference(results, ref_point: Sequence[float]) -> dict[str, int]:
    """Per method, how many preference points have a mean reward below the reference point in some objective: they
    add nothing to the hypervolume (the reference cuts them off). Printed as a warning, kept in the summary: a
    reference point set too high (``eval.ref_point``) hides part of a front. (A bounded objective's default
    reference is its floor, which no reward is below.)"""
    ref = np.asarray(ref_point, dtype=float)
    cut = {}
    for r in results:
        k = int(np.sum(np.any(np.asarray(r.rewards, dtype=float) < ref, axis=1)))
        if k:
            cut[r.method] = k
            print(
                f"[evaluate] warning: {k} of {len(r.rewards)} preference points of {r.method} lie below the "
                f"reference point {ref.tolist()} in some objective and add nothing to its hypervolume; lower "
                "eval.ref_point if they should count",
                flush=True,
            )
    return cut


# ---------------------------------------------------------------------------------------------
# Where batch decoding runs


def on_decode_worker(decode, fn: Callable, /, *args, **kwargs):
    """``fn(*args, **kwargs)`` run where a batch decode worker of ``decode`` (a DecodeConfig) runs, and its result.

    A config that decodes on CPU (``decode.num_gpus`` = 0) runs it in this process, as before. One that decodes on
    GPUs runs it as a Ray task holding ``decode.ray_resources()``, so the engine and the reward models are on a
    GPU Ray assigned (:func:`mage_ray.devices.place`) and a job's driver, often on a GPU-less head node, loads no
    GPU model. An error inside the task is raised here as itself (not wrapped in Ray's RayTaskError).
    """
    if decode.num_gpus == 0:
        return fn(*args, **kwargs)
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mage_ray.devices import note_request

    note_request("decode worker (task)", decode.ray_resources())
    task = ray.remote(_decode_task).options(
        num_cpus=decode.num_cpus,
        num_gpus=decode.num_gpus,
        max_retries=0,
        # not inside the caller's placement group: a Tune trial that only drives Train runs reserved no GPU there
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    try:
        return ray.get(task.remote(fn, args, kwargs))
    except ray.exceptions.RayTaskError as e:
        if e.cause is not None:
            raise e.cause from None
        raise


def _decode_task(fn: Callable, args: tuple, kwargs: dict):
    from mage_ray.devices import note_process

    note_process("decode worker (task)")
    return fn(*args, **kwargs)
