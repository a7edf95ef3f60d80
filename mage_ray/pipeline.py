"""The end-to-end chain on one config: backbones -> rollouts -> value models -> sweep -> bundle -> report.

Each stage is a plain function that writes its artifacts under ``<run_dir>`` and a stage record
``<run_dir>/stages/<stage>.json`` when it is done; a rerun (after a crash, ``ray job stop``, or on purpose)
skips finished stages, and the stages themselves skip finished artifacts (complete manifests, rollout
shards, finished Tune trials), so nothing is lost and nothing is redone.

Stages (MAGE Sec 5.2):
  beta       Tune: one trial per beta in sweep.betas; each trains its n backbones for
             sweep.beta_step_fraction of backbone.steps and reports the validation HV of Bone Soup.
  backbones  the chosen beta trained in full, and the beta = 1 (Rewarded Soups) backbones that the
             rs / mod baselines need.
  rollouts   Ray Data: base-policy samples on training prompts, scored by every objective (Parquet).
  values     one explicit value model per objective (Ray Train).
  alpha      Tune: Bone Soup extrapolation alpha (Eq. 13) by validation HV (decode only).
  gamma      Tune: guidance strength gamma (Eq. 25) of sweep.gamma_method by validation HV (decode only), at the
             claims' alpha; gamma_<variant>: the same for every other MAGE variant of eval.methods.

Two choices come out of the alpha and gamma stages. *Serving* keeps the config's default unless a trial beats it
beyond prompt noise (:func:`mage_ray.sweep.decide`; it may be 0: no extrapolation, guidance off). The *claims*
use the best value > 0 on validation HV (:func:`mage_ray.sweep.best_positive`; the paper's candidate sets have no
0), each MAGE variant at its own gamma, and the MAGE variant with the largest validation HV carries the MAGE
claim: the evaluation decodes bs and the MAGE variants at those values, and bs at the serving alpha as its own
row when it differs (:func:`evaluation_rows`).
  bundle     the servable bundle with the chosen beta, alpha, gamma, + the sweep report.
  morlhf     (pipeline, when backbone.morlhf) one model per evaluation-grid preference.
  evaluate   (pipeline) every method of eval.methods on the test prompts over the eval grid.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import numpy as np

from mage_ray.baseline_stages import backbone_dirs, stage_baselines, stage_morlhf
from mage_ray.config import Config, config_from_dict
from mage_ray.guidance import TRAINING_STAGES, method_spec, stages_for
from mage_ray.manifest import join
from mage_ray.stages import StageClock, _banner, _finish, set_clock, skip_done, stage_done
from mage_ray.storage import exists
from mage_ray.sweep import (
    STAGES,
    _beta_trial,
    _decode_trial,
    arm_gamma_default,
    best_positive,
    claims_value,
    decide,
    decode_trial_resources,
    run_tune_stage,
    short_steps,
    write_sweep_report,
)

ONE = 1.0  # beta of Rewarded Soups backbones (B = I)


def planned_stages(cfg: Config, evaluate: bool = True) -> list[str]:
    """The recorded stages a run of ``cfg`` goes through, in order: :func:`run_sweep`'s, and with ``evaluate``
    :func:`run_pipeline`'s (MORLHF, the baselines the evaluated methods need, the evaluation)."""
    stages = ["beta", "backbones"]
    if _needs(cfg, "values"):
        stages += ["rollouts", "values"]
    stages += ["alpha", "gamma"] + [f"gamma_{m}" for m in mage_variants(cfg)]
    if evaluate:
        needed = stages_for(list(cfg.eval.methods))
        if cfg.backbone.morlhf or "morlhf" in needed:
            stages.append("morlhf")
        stages += [st for st in ("ric", "modpo", "wrpo", "arms", "parm") if st in needed]
        stages += [f"gamma_{m}" for m in arm_methods(cfg.eval.methods)]
        stages.append("evaluate")
    return stages


# ---------------------------------------------------------------------------------------------
# Stages


def stage_beta(cfg: Config) -> dict:
    rec = stage_done(cfg, "beta")
    if skip_done(cfg, "beta", rec):
        return rec
    t0 = time.time()
    betas = [float(b) for b in cfg.sweep.betas]
    _banner("beta", f"Tune over beta in {betas}, {short_steps(cfg)} steps per backbone each")
    if len(betas) == 1:
        return _finish(
            cfg, "beta", {"best": {"backbone.beta": betas[0]}, "rows": [], "note": "single candidate"}, t0
        )
    from ray import tune

    _, rows = run_tune_stage(
        cfg,
        "beta",
        tune.with_parameters(_beta_trial, base=cfg.to_dict()),
        {"backbone.beta": tune.grid_search(betas)},
        resources={"CPU": 0, "memory": 2**26},
        max_concurrent=1,
    )
    chosen, decision = decide(cfg, "beta", "backbone.beta", rows, cfg.backbone.beta)
    return _finish(cfg, "beta", {"best": {"backbone.beta": chosen}, "rows": rows, "decision": decision}, t0)


def _warm_start(cfg: Config, beta: float, n: int) -> dict | None:
    """The chosen beta trial's adapters to continue from (``sweep.warm_start``), or None."""
    from mage_ray.manifest import is_complete

    beta_rec = stage_done(cfg, "beta") or {}
    rows = [r for r in beta_rec.get("rows") or [] if float(r.get("backbone.beta", -1)) == beta]
    short = short_steps(cfg)
    if not (cfg.sweep.warm_start and rows and rows[0].get("error") is None and short < cfg.backbone.steps):
        return None
    dirs = backbone_dirs(cfg, beta, [f"b{i}_s{short}" for i in range(n)])
    if not all(is_complete(d) for d in dirs):
        return None
    adapters = [join(d, "adapter") for d in dirs]
    return {"from": adapters, "steps": short, "trial_train_seconds": rows[0].get("train_seconds")}


def stage_backbones(cfg: Config, beta: float) -> dict:
    rec = stage_done(cfg, "backbones")
    if skip_done(cfg, "backbones", rec if rec and rec.get("beta") == beta else None):
        return rec
    from mage_ray.train.ray_train import train_backbones

    t0 = time.time()
    n = cfg.n_objectives
    names = [f"b{i}" for i in range(n)]
    warm = _warm_start(cfg, beta, n)
    if warm is None:
        _banner("backbones", f"{n} backbones of B({beta}) x {cfg.backbone.steps} steps")
        train_backbones(cfg, beta=beta, names=names)
    else:
        rest = cfg.backbone.steps - warm["steps"]
        _banner(
            "backbones",
            f"{n} backbones of B({beta}): {rest} more steps from the beta trial's {warm['steps']} "
            f"(= {cfg.backbone.steps} in all)",
        )
        seeded = config_from_dict(cfg.to_dict(), [f"backbone.seed={cfg.backbone.seed + 1}"])  # other prompts
        train_backbones(seeded, beta=beta, names=names, steps=rest, init_adapters=warm["from"])
    record: dict[str, Any] = {"beta": beta, "backbones": backbone_dirs(cfg, beta, names), "warm_start": warm}
    record["train_seconds_bs"] = round(time.time() - t0 + ((warm or {}).get("trial_train_seconds") or 0), 1)
    if beta != ONE and _needs(cfg, "rs_backbones"):
        t1 = time.time()
        _banner("backbones", f"{n} Rewarded Soups backbones (beta = 1) x {cfg.backbone.steps} steps")
        train_backbones(cfg, beta=ONE, names=names)
        record["rs_backbones"] = backbone_dirs(cfg, ONE, names)
        record["train_seconds_rs"] = round(time.time() - t1, 1)
    elif beta == ONE:
        record["rs_backbones"] = record["backbones"]
    return _finish(cfg, "backbones", record, t0)


def gamma_method(cfg: Config, has_values: bool | None = None) -> str:
    """The method of the gamma stage: ``sweep.gamma_method``, or mage-i-m when that needs value models the run
    does not train."""
    has_values = _needs(cfg, "values") if has_values is None else has_values
    explicit = cfg.sweep.gamma_method in ("mage-e", "mage-e-m")
    return cfg.sweep.gamma_method if (has_values or not explicit) else "mage-i-m"


def mage_variants(cfg: Config) -> list[str]:
    """The MAGE variants of ``eval.methods`` other than the gamma stage's method: each gets its own gamma stage
    ``gamma_<variant>`` (a gamma tuned on one variant's guidance is not another's)."""
    g = gamma_method(cfg)
    return [m for m in cfg.eval.methods if method_spec(m).family == "mage" and m != g]


def arm_methods(methods) -> list[str]:
    """The methods among ``methods`` guided by autoregressive reward models (family ``arm``): each has its own
    gamma (= beta_r / beta for a decoding KL strength beta), swept over ``arm.gammas`` by a stage
    ``gamma_<method>``."""
    return [m for m in methods if method_spec(m).family == "arm"]


def _needs(cfg: Config, stage: str) -> bool:
    """Whether a method the run evaluates or sweeps needs training stage ``stage`` (the methods' specs say)."""
    return stage in stages_for([*cfg.eval.methods, cfg.sweep.gamma_method])


def stage_rollouts(cfg: Config) -> dict:
    rec = stage_done(cfg, "rollouts")
    if skip_done(cfg, "rollouts", rec):
        return rec
    from mage_ray.train.rollouts import generate_rollouts

    t0 = time.time()
    _banner("rollouts", f"{cfg.value.rollouts_per_prompt} samples x {cfg.task.n_train} prompts (Ray Data)")
    path = generate_rollouts(cfg, use_ray=True)
    return _finish(cfg, "rollouts", {"path": path}, t0)


def stage_values(cfg: Config, rollouts: str) -> dict:
    rec = stage_done(cfg, "values")
    if skip_done(cfg, "values", rec):
        return rec
    from mage_ray.train.values import train_value_models

    t0 = time.time()
    _banner("values", f"{cfg.n_objectives} explicit value models x {cfg.value.steps} steps (Ray Train)")
    manifests = train_value_models(cfg, rollouts)
    from mage_ray.train.values import value_model_dir

    dirs = [value_model_dir(cfg, o) for o in cfg.task.objectives]
    metrics = {
        m.get("objective"): {
            k: m.get(k)
            for k in ("val_mse", "val_mse_constant", "ranking_accuracy", "val_accuracy", "n_val_pairs")
        }
        for m in manifests
    }
    return _finish(cfg, "values", {"values": dirs, "metrics": metrics}, t0)


def stage_decode_param(
    cfg: Config,
    stage: str,
    bundle_dir: str,
    method: str,
    param: str,
    values: list[float],
    fixed: dict[str, float],
    default: float,
) -> dict:
    """Tune over a decode-only ``param``; keeps ``default`` unless a trial beats it beyond prompt noise."""
    rec = stage_done(cfg, stage)
    if skip_done(cfg, stage, rec):
        return rec
    t0 = time.time()
    _banner(stage, f"Tune over {param} in {values} for {method} (decode only)")
    if len(values) == 1:
        return _finish(cfg, stage, {"best": {param: values[0]}, "rows": []}, t0)
    from ray import tune

    space = {param: tune.grid_search(values), **fixed}
    trial = tune.with_parameters(
        _decode_trial, base=cfg.to_dict(), bundle_dir=bundle_dir, method=method, stage=stage, param=param
    )
    _, rows = run_tune_stage(cfg, stage, trial, space, resources=decode_trial_resources(cfg))
    chosen, decision = decide(cfg, stage, param, rows, default)
    record = {"best": {param: chosen}, "rows": rows, "method": method, "decision": decision}
    return _finish(cfg, stage, record, t0)


def _bundle(
    cfg: Config,
    out: str,
    beta: float,
    bb: dict,
    values: list[str],
    alpha: float,
    gamma: float,
    extra: dict | None = None,
):
    from mage_ray.bundle import build_bundle
    from mage_ray.evaluate import reference_point
    from mage_ray.tasks.objectives import load_objectives

    try:  # names and bounds only: the driver loads no reward model
        ref = reference_point(load_objectives(cfg.task, load=False), cfg.eval.ref_point)
    except ValueError:
        ref = None
    return build_bundle(
        out,
        model=cfg.model,
        objectives=cfg.task.objectives,
        beta=beta,
        backbones=bb["backbones"],
        rs_backbones=bb.get("rs_backbones", []),
        values=values,
        alpha=alpha,
        gamma=gamma,
        default_method=cfg.decode.method,
        ref_point=ref,
        **(extra or {}),
    )


def run_sweep(cfg: Config, *, progress: bool = True) -> dict:
    """Stages beta -> backbones -> rollouts -> values -> alpha -> gamma -> bundle; returns the summary.

    ``progress``: start this run's progress lines (:class:`StageClock`); run_pipeline starts its own instead."""
    if progress:
        set_clock(StageClock(cfg, planned_stages(cfg, evaluate=False)))
    t0 = time.time()
    beta = float(stage_beta(cfg)["best"]["backbone.beta"])
    bb = stage_backbones(cfg, beta)
    values: list[str] = []
    if _needs(cfg, "values"):
        values = stage_values(cfg, stage_rollouts(cfg)["path"])["values"]
    work = join(cfg.storage.run_dir, "sweep", "work_bundle")
    if not exists(join(work, "bundle.json")):
        _bundle(cfg, work, beta, bb, values, cfg.decode.alpha, cfg.decode.gamma)
    a_rec = stage_decode_param(
        cfg, "alpha", work, "bs", "decode.alpha", [float(a) for a in cfg.sweep.alphas], {}, cfg.decode.alpha
    )
    alpha = float(a_rec["best"]["decode.alpha"])
    alpha_claims = claims_value(a_rec, "decode.alpha", alpha)
    gammas = [float(g) for g in cfg.sweep.gammas]
    gmethod = gamma_method(cfg, bool(values))
    fixed = {"decode.alpha": alpha_claims}  # the claims' alpha: MAGE is compared with bs at it
    g_rec = stage_decode_param(cfg, "gamma", work, gmethod, "decode.gamma", gammas, fixed, cfg.decode.gamma)
    gamma = float(g_rec["best"]["decode.gamma"])
    mage_records = {
        m: stage_decode_param(cfg, f"gamma_{m}", work, m, "decode.gamma", gammas, fixed, cfg.decode.gamma)
        for m in mage_variants(cfg)
    }
    claims = mage_claims({gmethod: g_rec, **mage_records}, cfg.eval.methods, cfg.decode.gamma)
    bundle_dir = join(cfg.storage.run_dir, "bundle")
    _bundle(cfg, bundle_dir, beta, bb, values, alpha, gamma)
    summary = {
        "beta": beta,
        "alpha": alpha,
        "gamma": gamma,
        "alpha_claims": alpha_claims,
        **claims,
        "bundle": bundle_dir,
        "seconds": round(time.time() - t0, 1),
    }
    records = {stage: stage_done(cfg, stage) for stage, _ in STAGES}
    write_sweep_report(cfg, summary, records, stage_done(cfg, "values"), mage_records)
    print(f"[pipeline] bundle ready: {bundle_dir} (beta={beta}, alpha={alpha}, gamma={gamma})", flush=True)
    return summary


def mage_claims(records: dict[str, dict], methods, default: float) -> dict:
    """From each MAGE variant's gamma stage record: ``claims_gammas`` (variant -> its best gamma > 0 on validation
    HV; a stage's single candidate when it is > 0; else ``default``) and ``mage_choice`` (the variant of
    ``methods`` with the largest validation HV at its claims gamma, and those HVs)."""
    gammas, hv = {}, {}
    for m, rec in records.items():
        g, v = best_positive((rec or {}).get("rows") or [], "decode.gamma")
        single = float(((rec or {}).get("best") or {}).get("decode.gamma", 0.0))  # a stage of one candidate
        gammas[m] = g if g is not None else (single if single > 0 else default)
        if v is not None and m in methods:
            hv[m] = v
    out: dict[str, Any] = {"claims_gammas": gammas}
    if hv:
        out["mage_choice"] = {"method": max(hv, key=hv.get), "validation_hv": hv}
    return out


def evaluation_rows(cfg: Config, methods: list[str], summary: dict) -> tuple[list[str], dict[str, dict]]:
    """The evaluation's rows and their decode settings (:func:`mage_ray.evaluate.evaluate`'s ``settings``): every
    method at the claims' alpha; a MAGE variant at its claims gamma, an ARM method at its own gamma, the others at
    the serving gamma; plus ``bs (alpha <a>)`` at the serving alpha when it differs from the claims' one."""
    alpha, alpha_c = summary["alpha"], summary.get("alpha_claims", summary["alpha"])
    claims_g, own = summary.get("claims_gammas") or {}, summary.get("method_gammas") or {}
    settings = {}
    for m in methods:
        g = (
            claims_g.get(m)
            if method_spec(m).family == "mage" and m in claims_g
            else own.get(m, summary["gamma"])
        )
        settings[m] = {"method": m, "alpha": float(alpha_c), "gamma": float(g)}
    labels = list(methods)
    if "bs" in methods and float(alpha) != float(alpha_c):
        label = f"bs (alpha {alpha:g})"
        settings[label] = {"method": "bs", "alpha": float(alpha), "gamma": float(summary["gamma"])}
        labels.append(label)
    return labels, settings


def stage_arm_gammas(cfg: Config, bundle_dir: str, methods: list[str], alpha: float) -> dict[str, float]:
    """Tune each ARM method's gamma (beta_r / beta) over ``arm.gammas`` on validation prompts (decode only, like
    the gamma stage); a candidate replaces the default 1.0 only when it beats it beyond prompt noise."""
    chosen = {}
    for m in arm_methods(methods):
        values = [float(g) for g in cfg.arm.gammas]
        rec = stage_decode_param(
            cfg,
            f"gamma_{m}",
            bundle_dir,
            m,
            "decode.gamma",
            values,
            {"decode.alpha": alpha},
            arm_gamma_default(cfg),
        )
        chosen[m] = float(rec["best"]["decode.gamma"])
    return chosen


def run_pipeline(cfg: Config) -> dict:
    """The whole chain + the evaluation report on the test prompts (``<run_dir>/report``)."""
    from mage_ray.bundle import load_bundle, save_bundle
    from mage_ray.evaluate import on_decode_worker
    from mage_ray.soup import preference_grid
    from mage_ray.tasks.prompts import load_prompts

    set_clock(StageClock(cfg, planned_stages(cfg)))
    t0 = time.time()
    summary = run_sweep(cfg, progress=False)
    methods = list(cfg.eval.methods)
    bundle_dir = summary["bundle"]
    bb = stage_done(cfg, "backbones") or {}
    extra: dict[str, Any] = {}
    if cfg.backbone.morlhf or "morlhf" in stages_for(methods):
        extra["morlhf"] = stage_morlhf(cfg)
        if "morlhf" not in methods:
            methods.append("morlhf")
    extra.update(stage_baselines(cfg, methods, summary["beta"], bb))
    if extra:  # the bundle gains the baselines' adapters (same beta, alpha, gamma)
        vals = (stage_done(cfg, "values") or {}).get("values", [])
        _bundle(cfg, bundle_dir, summary["beta"], bb, vals, summary["alpha"], summary["gamma"], extra)
        if arm_methods(methods):  # then each ARM method's own gamma, on that bundle
            gammas = stage_arm_gammas(cfg, bundle_dir, methods, summary["alpha"])
            summary["method_gammas"] = gammas
            # only bundle.json changes: rewrite it (validated, atomically) instead of copying every adapter again
            save_bundle(dataclasses.replace(load_bundle(bundle_dir), method_gammas=gammas))
            records = {stage: stage_done(cfg, stage) for stage, _ in STAGES}
            own = {m: stage_done(cfg, f"gamma_{m}") for m in [*mage_variants(cfg), *gammas]}
            write_sweep_report(cfg, summary, records, stage_done(cfg, "values"), own)
    labels, settings = evaluation_rows(cfg, methods, summary)
    rec = stage_done(cfg, "evaluate")
    if rec and (rec.get("methods") != labels or rec.get("settings") != settings):
        print(f"[pipeline] rows changed {rec.get('methods')} -> {labels}: evaluating again", flush=True)
        rec = None
    if not skip_done(cfg, "evaluate", rec):
        t1 = time.time()
        n_prompts = len(load_prompts(cfg.task, "test"))
        grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
        _banner("evaluate", f"{len(labels)} rows x {len(grid)} preferences x {n_prompts} test prompts")
        keys = ("beta", "alpha", "gamma", "alpha_claims", "claims_gammas", "method_gammas")
        extra = {k: summary[k] for k in keys if summary.get(k) is not None}
        context = {
            "serving": {"method": cfg.decode.method, "alpha": summary["alpha"], "gamma": summary["gamma"]},
            **({"mage_choice": summary["mage_choice"]} if summary.get("mage_choice") else {}),
        }
        report = on_decode_worker(
            cfg.decode,
            evaluate_bundle,
            cfg,
            bundle_dir,
            labels,
            extra,
            {"train s": _train_seconds(cfg, labels, settings)},
            settings,
            context,
        )
        rec = _finish(
            cfg,
            "evaluate",
            {
                "report": join(cfg.storage.run_dir, "report"),
                "methods": labels,
                "settings": settings,
                "decode_seconds": report.get("decode_seconds"),
            },
            t1,
        )
    total = round(time.time() - t0, 1)
    print(
        f"[pipeline] report: {rec['report']}/metrics.md and front.png ({total:.0f} s this invocation)",
        flush=True,
    )
    return {**summary, "report": rec["report"], "seconds": total}


def evaluate_bundle(
    cfg: Config,
    bundle_dir: str,
    methods: list[str],
    extra: dict,
    extra_columns: dict[str, dict[str, str]],
    settings: dict[str, dict] | None = None,
    context: dict | None = None,
) -> dict:
    """The evaluation stage's work: every row of ``methods`` over the eval grid on the test prompts, decoded with
    its ``settings`` (:func:`evaluation_rows`; without them the bundle's alpha and gamma), the report written to
    ``<run_dir>/report``; returns its summary. Runs on a batch decode worker
    (:func:`mage_ray.evaluate.on_decode_worker`)."""
    from mage_ray.bundle import load_bundle
    from mage_ray.decode import Engine, decode_defaults
    from mage_ray.evaluate import evaluate, reference_point
    from mage_ray.soup import preference_grid
    from mage_ray.tasks.objectives import load_objectives
    from mage_ray.tasks.prompts import load_prompts

    objectives = load_objectives(cfg.task)
    bundle = load_bundle(bundle_dir)
    engine = Engine(bundle, decode_defaults(cfg, bundle), device=cfg.decode.device)
    return evaluate(
        engine,
        objectives,
        load_prompts(cfg.task, "test"),
        methods,
        preference_grid(cfg.n_objectives, cfg.eval.grid_step),
        ref_point=reference_point(objectives, cfg.eval.ref_point),
        out_dir=join(cfg.storage.run_dir, "report"),
        batch_size=cfg.decode.batch_size,
        min_prompts=cfg.eval.min_test_prompts,
        confidence=cfg.eval.confidence,
        n_resamples=cfg.eval.n_resamples,
        extra=extra,
        extra_columns=extra_columns,
        settings=settings,
        context=context,
    )


def _train_seconds(
    cfg: Config, methods: list[str], settings: dict[str, dict] | None = None
) -> dict[str, str]:
    """Training wall time attributable to each row (from stage records), for the report table."""
    bb = stage_done(cfg, "backbones") or {}
    bs = bb.get("train_seconds_bs")
    rs = bb.get("train_seconds_rs", bs if bb.get("beta") == ONE else None)
    seconds = {st: (stage_done(cfg, st) or {}).get("seconds") for st in TRAINING_STAGES}
    seconds["rs_backbones"] = rs  # trained inside the backbones stage
    out = {}
    for m in methods:
        spec = method_spec(((settings or {}).get(m) or {}).get("method", m))
        # a method without the Bone Soup backbones has no time unless its own stage (its last) ran
        if not spec.backbones and spec.stages and seconds[spec.stages[-1]] is None:
            out[m] = ""
            continue
        parts = ([bs] if spec.backbones else []) + [seconds[st] for st in spec.stages]
        known = [t for t in parts if t is not None]
        out[m] = f"{sum(known):.0f}" if known else ""
    return out


def load_job_config(path: str, overrides: list[str]) -> Config:
    from mage_ray.config import load_config

    return load_config(path, overrides)


def dumps(d: dict) -> str:
    return json.dumps(d, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
