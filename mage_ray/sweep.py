"""Ray Tune sweeps of beta (trains backbones), then alpha and gamma (decode only), by hypervolume.

MAGE Sec 5.2.1: beta in {0.6, 0.7, 0.8} is chosen by the hypervolume of the Bone Soup front after
~20% of the training steps; alpha in {0.1..0.5} (Eq. 13) and gamma (Eq. 25) are chosen on validation
prompts. Tune's ``param_space`` keys are config field paths (``backbone.beta``, ``decode.alpha``,
``decode.gamma``): a trial is the job's own config with those fields overridden by :func:`trial_config`;
:func:`_beta_trial` and :func:`_decode_trial` are the trials, :func:`write_sweep_report` the report.
``mage_ray.pipeline`` runs the stages in order and keeps their records.

A sweep decides only what its validation prompts can resolve: every trial writes its per-prompt rewards
(``<run_dir>/sweep/<stage>/<value>.json``), and :func:`decide` bootstraps the trials' HV over the prompts,
paired (:func:`mage_ray.uncertainty.bootstrap_trials`). The best trial replaces the config's default only when
the interval of HV(best) - HV(default) lies above 0; otherwise the default is kept and the report says so.

Every Tune run keeps its state under ``<run_dir>/tune/<stage>``; a sweep that is killed and resubmitted
restores it with ``Tuner.restore`` and does not re-run finished trials. A trial that fails is reported
with its error and does not sink the sweep (the best of the successful trials wins).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.config import Config, config_from_dict
from mage_ray.guidance import method_spec
from mage_ray.manifest import join, read_json, write_json_atomic, write_text_atomic
from mage_ray.storage import is_file, storage_abs

log = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """Every trial of a sweep stage failed, or the sweep cannot start."""


def trial_config(base: dict, params: dict[str, Any]) -> Config:
    """The job config with a trial's ``section.field`` values applied (validated)."""
    overrides = [f"{k}={_yaml_scalar(v)}" for k, v in params.items() if "." in k]
    return config_from_dict(base, overrides)


def _yaml_scalar(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def storage_uri(cfg: Config) -> str:
    """Tune wants an absolute local path or a URI."""
    return storage_abs(cfg.storage.storage_path)


def run_tune_stage(
    cfg: Config,
    stage: str,
    trainable: Callable,
    param_space: dict,
    *,
    metric: str = "hv",
    resources: dict[str, float] | None = None,
    max_concurrent: int | None = None,
):
    """Run (or restore) one Tune stage; return (best_params, rows) where rows are per-trial dicts.

    ``trainable(trial_params: dict) -> None`` must call ``ray.tune.report({metric: ...})``.
    """
    from ray import tune

    storage = f"{storage_uri(cfg).rstrip('/')}/{cfg.storage.run_name}/tune"
    name = stage
    path = f"{storage}/{name}"
    from mage_ray.devices import note_request

    note_request("Tune trial", resources or {"CPU": 1}, count=len(_grid_values(param_space)), detail=stage)
    fn = tune.with_resources(trainable, resources or {"cpu": 1})
    if tune.Tuner.can_restore(path):
        log.warning("resuming Tune stage %r from %s (finished trials are not re-run)", stage, path)
        print(f"[sweep] resuming stage {stage!r} from {path}; finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            fn,
            param_space=param_space,
            # No metric here: Train-inside-Tune trials also forward every training step to Tune, and only
            # the trial's last report carries the HV; the best trial is picked below from the final results.
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent or cfg.sweep.max_concurrent_trials or None
            ),
            run_config=tune.RunConfig(
                storage_path=storage, name=name, verbose=1, failure_config=tune.FailureConfig(max_failures=0)
            ),
        )
    grid = tuner.fit()
    rows = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items()}
        row = {
            **params,
            metric: (r.metrics or {}).get(metric),
            "error": None
            if r.error is None
            else f"{type(r.error).__name__}: {str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else ''}",
        }
        for k, v in (r.metrics or {}).items():
            if k.startswith("hv_") or k in (
                "controllability",
                "inner_product",
                "train_seconds",
                "degenerate_max",
            ):
                row[k] = v
        rows.append(row)
    ok = [r for r in rows if r["error"] is None and r.get(metric) is not None and np.isfinite(r[metric])]
    for r in rows:
        if r["error"] is not None:
            print(f"[sweep] stage {stage!r}: trial {_params(r)} FAILED: {r['error']}", flush=True)
    if not ok:
        raise SweepError(
            f"every trial of sweep stage {stage!r} failed; first error: {rows[0]['error'] if rows else 'no trials'}"
        )
    best = max(ok, key=lambda r: r[metric])
    return {k: best[k] for k in param_space}, rows


def _grid_values(param_space: dict) -> list:
    """The values of the (one) grid-searched parameter of a Tune param_space (for the rehearsal's request count)."""
    for v in param_space.values():
        if isinstance(v, dict) and "grid_search" in v:
            return list(v["grid_search"])
    return [None]


def trial_rewards_path(cfg: Config, stage: str, value: float) -> str:
    """Where a trial of ``stage`` with parameter ``value`` keeps its per-prompt validation rewards."""
    return join(cfg.storage.run_dir, "sweep", stage, f"{float(value):g}.json")


def save_trial_rewards(cfg: Config, stage: str, value: float, per_prompt: list) -> None:
    """Keep a trial's (P, N, n) validation rewards (nested list) for :func:`decide`."""
    write_json_atomic(trial_rewards_path(cfg, stage, value), {"value": value, "per_prompt": per_prompt})


def best_positive(rows: list[dict], param: str, metric: str = "hv") -> tuple[float | None, float | None]:
    """(value, metric) of the trial with the largest validation ``metric`` among those whose ``param`` is > 0, or
    (None, None). The paper's candidate sets have no 0 (MAGE Sec 5.2.1: alpha in {0.1, ..., 0.5}, gamma in
    {0.1, 0.2, 1, 3, 5}): alpha = 0 is Bone Soup without extrapolation and gamma = 0 is Bone Soup with guidance
    off, so the claims use the best value > 0 while serving may keep 0 (:func:`decide`)."""
    ok = [
        r
        for r in rows
        if r.get("error") is None
        and r.get(metric) is not None
        and np.isfinite(r[metric])
        and float(r[param]) > 0
    ]
    if not ok:
        return None, None
    top = max(ok, key=lambda r: r[metric])  # first of equal values wins
    return float(top[param]), float(top[metric])


def claims_value(rec: dict | None, param: str, fallback: float) -> float:
    """The value of ``param`` the claims use from a stage record: its best trial > 0 on validation
    (:func:`best_positive`), else ``fallback`` (a single candidate, or no candidate > 0)."""
    value, _ = best_positive((rec or {}).get("rows") or [], param)
    return fallback if value is None else value


def decide(cfg: Config, stage: str, param: str, rows: list[dict], default: float) -> tuple[float, dict]:
    """The value a stage keeps: the best trial only when its validation HV beats the default's beyond prompt
    noise (paired bootstrap, ``eval.confidence``), else the default. Annotates ``rows`` in place with
    ``hv_lo`` / ``hv_hi`` (and ``diff_lo`` / ``diff_hi`` against the default); returns (value, decision)."""
    from mage_ray.soup import preference_grid
    from mage_ray.uncertainty import bootstrap_trials

    ok = [r for r in rows if r.get("error") is None and r.get("hv") is not None]
    per_prompt = {}
    for r in ok:
        path = trial_rewards_path(cfg, stage, r[param])
        if is_file(path):
            per_prompt[f"{float(r[param]):g}"] = np.asarray(read_json(path)["per_prompt"], dtype=float)
    best_row = max(ok, key=lambda r: r["hv"])
    if len(per_prompt) != len(ok) or len(ok) < 2:
        return float(best_row[param]), {
            "chosen": float(best_row[param]),
            "note": "per-prompt rewards missing for some trials (or a single trial): best by point estimate",
        }
    from mage_ray.evaluate import reference_point
    from mage_ray.tasks.objectives import load_objectives

    grid = preference_grid(cfg.n_objectives, cfg.sweep.grid_step)
    ref = reference_point(load_objectives(cfg.task, load=False), cfg.eval.ref_point)  # no model in the driver
    res = bootstrap_trials(
        per_prompt,
        grid,
        ref,
        default=f"{float(default):g}",
        confidence=cfg.eval.confidence,
        n_resamples=max(cfg.eval.n_resamples, 1),
    )
    for r in ok:
        t = res["trials"][f"{float(r[param]):g}"]
        r["hv_lo"], r["hv_hi"] = t["lo"], t["hi"]
        if "vs_default" in t:
            r["diff_lo"], r["diff_hi"] = t["vs_default"]["lo"], t["vs_default"]["hi"]
    chosen = float(res["chosen"])
    decision = {k: v for k, v in res.items() if k != "trials"}
    decision["chosen"] = chosen
    decision["default"] = float(default)
    decision["best_positive"] = best_positive(ok, param)[0]
    return chosen, decision


def decision_text(param: str, decision: dict) -> str:
    """One sentence on what a sweep stage decided and why."""
    if "note" in decision and "distinguishable" not in decision:
        return f"{param} = {decision['chosen']:g}: {decision['note']}."
    best, default, chosen = decision.get("best"), decision.get("default"), decision["chosen"]
    level = f"{decision.get('confidence', 0.9):.0%}"
    if decision.get("distinguishable") is None:
        return f"{param} = {chosen:g} (best by point estimate; {decision.get('note', '')})."
    if decision["distinguishable"]:
        return (
            f"{param} = {chosen:g}: its validation HV is above the default {default:g}'s beyond prompt noise "
            f"(the {level} paired interval of the difference lies above 0)."
        )
    if float(best) == float(default):
        return f"{param} = {chosen:g}: the default is also the best trial."
    return (
        f"{param} = {chosen:g} (the default): the best trial, {float(best):g}, is not distinguishable from it "
        f"(the {level} paired interval of the HV difference includes 0), so the default is kept."
    )


def _params(row: dict) -> dict:
    return {k: v for k, v in row.items() if "." in k}


def plot_sweep(rows: list[dict], param: str, path: str | Path, metric: str = "hv", **marks) -> None:
    """HV vs one swept parameter with its intervals, default and chosen value (:func:`mage_ray.plots.plot_sweep`)."""
    from mage_ray.plots import plot_sweep as draw

    draw(rows, param, path, metric=metric, **marks)


def rows_markdown(rows: list[dict], params: list[str], metric: str = "hv") -> str:
    """Trial table: parameters, validation metric with its interval, difference to the default, the worst
    preference's share of degenerate responses, error."""
    head = (
        "| " + " | ".join(params) + f" | validation {metric} [interval] | vs default [interval] | degenerate "
        "(worst preference) | error |"
    )
    lines = [head, "|" + "---|" * (len(params) + 4)]
    for r in sorted(rows, key=lambda r: tuple(r[p] for p in params)):
        v = r.get(metric)
        cell = "" if v is None else f"{v:.4g}"
        if v is not None and r.get(f"{metric}_lo") is not None:
            cell += f" [{r[f'{metric}_lo']:.4g}, {r[f'{metric}_hi']:.4g}]"
        diff = ""
        if r.get("diff_lo") is not None:
            diff = f"[{r['diff_lo']:+.3g}, {r['diff_hi']:+.3g}]"
        degenerate = "" if r.get("degenerate_max") is None else f"{100 * r['degenerate_max']:.1f}%"
        lines.append(
            "| "
            + " | ".join(str(r[p]) for p in params)
            + f" | {cell} | {diff} | {degenerate} | "
            + (r.get("error") or "")
            + " |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Trials: each builds its config with trial_config (the job's config + the trial's field paths).
# Their names are part of every saved Tune experiment: Tuner.restore refuses a trainable with another name, so
# renaming them would stop runs of earlier versions from resuming their sweep.


def decode_trial_resources(cfg: Config) -> dict[str, float]:
    """What a decode-only Tune trial (alpha, gamma, an ARM method's gamma) reserves: one batch decode worker
    (``decode.num_cpus`` / ``decode.num_gpus``), since it loads the engine and the reward models itself."""
    return cfg.decode.ray_resources()


def short_steps(cfg: Config) -> int:
    """Steps of a beta trial's backbones: ``sweep.beta_step_fraction`` of ``backbone.steps`` (paper: 20%)."""
    return max(1, int(round(cfg.backbone.steps * cfg.sweep.beta_step_fraction)))


def validation_hv(
    cfg: Config, bundle_dir: str, method: str, *, alpha: float | None = None, gamma: float | None = None
) -> dict:
    """Decode the validation prompts over the sweep grid with ``method``: HV and friends, and ``per_prompt``
    ((P, N, n) nested list: the rewards behind them, for the paired bootstrap of :func:`decide`).
    ``alpha`` / ``gamma`` default to ``cfg.decode``'s. Runs in a process that holds a decode worker's resources
    (a decode trial reserves them; the beta trial calls it through :func:`mage_ray.evaluate.on_decode_worker`):
    the engine goes on ``cfg.decode.device``, the reward models on ``task.reward_device``."""
    from mage_ray.bundle import load_bundle
    from mage_ray.decode import Engine
    from mage_ray.evaluate import evaluate, reference_point
    from mage_ray.soup import preference_grid
    from mage_ray.tasks.objectives import load_objectives
    from mage_ray.tasks.prompts import load_prompts

    objectives = load_objectives(cfg.task)
    prompts = load_prompts(cfg.task, "validation")
    engine = Engine(load_bundle(bundle_dir), cfg.decode, device=cfg.decode.device)
    grid = preference_grid(cfg.n_objectives, cfg.sweep.grid_step)
    kw = {
        "alpha": float(cfg.decode.alpha if alpha is None else alpha),
        "gamma": float(cfg.decode.gamma if gamma is None else gamma),
    }
    summary = evaluate(
        engine,
        objectives,
        prompts,
        [method],
        grid,
        ref_point=reference_point(objectives, cfg.eval.ref_point),
        batch_size=cfg.decode.batch_size,
        request_kwargs=kw,
        progress=False,
        n_resamples=0,
    )
    m = summary["methods"][method]
    return {
        "hv": float(m["metrics"]["hv"]),
        "controllability": float(m["metrics"]["controllability"]),
        "inner_product": float(m["metrics"]["inner_product"]),
        "degenerate_max": m.get("degenerate_max"),
        "per_prompt": summary["per_prompt"][method],
    }


def _report_trial(cfg: Config, stage: str, value: float, res: dict, **more) -> None:
    """Keep the trial's per-prompt rewards on disk (for the paired decision) and report its scalars to Tune."""
    from ray import tune

    save_trial_rewards(cfg, stage, value, res.pop("per_prompt"))
    tune.report({**{k: v for k, v in res.items() if v is not None}, **more})


def _beta_trial(params: dict, *, base: dict) -> None:
    """Tune trial: train the n backbones of B(beta) briefly, build a bs bundle, report validation HV."""
    import time

    import ray

    from mage_ray.bundle import build_bundle
    from mage_ray.devices import note_process, note_request
    from mage_ray.evaluate import on_decode_worker
    from mage_ray.soup import backbone_weights
    from mage_ray.train.ray_train import backbone_dir, train_backbone_ray

    note_process("beta trial")
    cfg = trial_config(base, params)
    beta = cfg.backbone.beta
    steps = short_steps(cfg)
    names = [f"b{i}_s{steps}" for i in range(cfg.n_objectives)]
    dirs = [backbone_dir(cfg, beta, nm) for nm in names]
    t0 = time.time()
    # Train-inside-Tune: this trial drives one TorchTrainer per backbone, all at once (each driver is a
    # zero-CPU task; the trainers' workers wait for resources when the cluster is full).
    drive = ray.remote(num_cpus=0, max_retries=0)(train_backbone_ray)
    note_request("beta trial's backbone run drivers (tasks)", {}, count=cfg.n_objectives)
    refs = [
        drive.remote(
            cfg,
            w.tolist(),
            name=nm,
            out_dir=d,
            steps=steps,
            extra_manifest={"kind": "backbone", "beta": beta, "index": i, "sweep_trial": True},
        )
        for i, (w, nm, d) in enumerate(zip(backbone_weights(cfg.n_objectives, beta), names, dirs))
    ]
    ray.get(refs)  # a failed backbone raises here and fails the trial (reported, the sweep goes on)
    train_s = time.time() - t0
    bdir = join(cfg.storage.run_dir, "sweep", f"beta_{beta:g}", "bundle")
    build_bundle(
        bdir,
        model=cfg.model,
        objectives=cfg.task.objectives,
        beta=beta,
        backbones=dirs,
        alpha=0.0,
        gamma=0.0,
        default_method="bs",
    )
    # the backbones alone (no extrapolation), decoded where a decode worker may hold a GPU (this trial holds none)
    res = on_decode_worker(cfg.decode, validation_hv, cfg, bdir, "bs", alpha=0.0)
    _report_trial(cfg, "beta", beta, res, train_seconds=train_s)


def _decode_trial(params: dict, *, base: dict, bundle_dir: str, method: str, stage: str, param: str) -> None:
    """Tune trial of a decode-only parameter (``decode.alpha``, ``decode.gamma``): validation HV of ``method``. The
    trial holds a decode worker's resources (:func:`decode_trial_resources`) and decodes in its own process."""
    from mage_ray.devices import note_process

    note_process("decode trial")
    cfg = trial_config(base, params)
    res = validation_hv(cfg, bundle_dir, method)
    _report_trial(cfg, stage, float(params[param]), res)


# ---------------------------------------------------------------------------------------------
# Report


STAGES = (("beta", "backbone.beta"), ("alpha", "decode.alpha"), ("gamma", "decode.gamma"))
"""The sweep's stages and the config field each one decides."""


def arm_gamma_default(cfg: Config) -> float:
    """The gamma an ARM method keeps unless a candidate of ``arm.gammas`` beats it: 1.0 (the weight PARM's
    evaluation code gives its reward model) when it is a candidate, else the first candidate."""
    return 1.0 if 1.0 in cfg.arm.gammas else float(cfg.arm.gammas[0])


def write_sweep_report(
    cfg: Config,
    summary: dict,
    records: dict[str, dict | None],
    values: dict | None,
    method_records: dict[str, dict | None] | None = None,
) -> str:
    """Markdown table of every trial + HV-vs-parameter plots under ``<run_dir>/report/``.

    ``records``: the stage records of ``beta``, ``alpha``, ``gamma``; ``values``: the value-model stage's record;
    ``method_records``: method -> the record of its own gamma stage (``gamma_<method>``: the ARM methods', and
    the MAGE variants' other than ``sweep.gamma_method``).
    """
    out = join(cfg.storage.run_dir, "report")  # local or URI: files written locally, then moved/uploaded
    parts = [
        f"# Sweep report: {cfg.storage.run_name}\n",
        f"Chosen (serving): beta = {summary['beta']}, alpha = {summary['alpha']}, gamma = {summary['gamma']}"
        + "".join(f", gamma of {m} = {g}" for m, g in (summary.get("method_gammas") or {}).items())
        + ".\n",
    ]
    if summary.get("claims_gammas") or summary.get("alpha_claims") is not None:
        choice = (summary.get("mage_choice") or {}).get("method")
        parts.append(
            f"\nClaims (the best value > 0 of each candidate set on validation HV): alpha = "
            f"{summary.get('alpha_claims')}"
            + "".join(f", gamma of {m} = {g}" for m, g in (summary.get("claims_gammas") or {}).items())
            + (f"; MAGE variant with the largest validation HV: {choice}" if choice else "")
            + ".\n"
        )
    defaults = {"beta": cfg.backbone.beta, "alpha": cfg.decode.alpha, "gamma": cfg.decode.gamma}
    stages = [(stage, param, defaults[stage]) for stage, param in STAGES]
    for m, rec in (method_records or {}).items():
        if rec:
            records = {**records, f"gamma_{m}": rec}
            arm = method_spec(m).family == "arm"
            stages.append((f"gamma_{m}", "decode.gamma", arm_gamma_default(cfg) if arm else cfg.decode.gamma))
    for stage, param, default in stages:
        rec = records.get(stage) or {}
        rows = rec.get("rows") or []
        parts.append(f"\n## {stage}" + (f" ({rec.get('method')})" if rec.get("method") else "") + "\n\n")
        if rows:
            parts.append(rows_markdown(rows, [param]))
            if rec.get("decision"):
                parts.append("\n" + decision_text(param, rec["decision"]) + "\n")
            png = join(out, f"sweep_{stage}.png")
            plot_sweep(rows, param, png, default=default, chosen=rec["best"][param])
            parts.append(f"\n![HV vs {param}](sweep_{stage}.png)\n")
        else:
            parts.append(f"single candidate: {rec.get('best')}\n")
    from mage_ray.train.guides import guide_accuracy, guides_markdown

    guides = guide_accuracy(cfg)
    if guides:
        parts.append(guides_markdown(guides))
    write_text_atomic(join(out, "sweep.md"), "".join(parts))
    write_json_atomic(join(out, "sweep.json"), {**summary, "guides": guides})
    return join(out, "sweep.md")
