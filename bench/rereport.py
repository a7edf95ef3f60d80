"""Recompute a finished evaluation report with the current instruments, without decoding.

Reads ``<report>/generations.parquet`` and ``metrics.json`` and writes every table again
(:func:`mage_ray.rereport.recompute_report`): both controllability columns (changed weights; Definition 1 as
written), controllability bounds from paired tests, exact degenerate-rate intervals, the claims.

    .venv/bin/python bench/rereport.py --report runs/embedded/report --bundle runs/embedded/bundle \\
        --run runs/embedded --out runs/embedded/report_v2
    .venv/bin/python bench/rereport.py --report runs/v5arm/eval_mage_gamma1 --bundle runs/v5arm/bundle \\
        --settings '{"mage-e-m": {"gamma": 1.0}, "mage-i-m": {"gamma": 1.0}}'      # decoded with decode.gamma=1
    .venv/bin/python bench/rereport.py --report runs/embedded/report --bundle runs/embedded/bundle \\
        --add runs/embedded/eval_claims --rename 'bs=bs (alpha 0)' --run runs/embedded \\
        --out runs/embedded/report_claims               # rows decoded again at the claims' alpha and gamma

``--bundle``: reports written before the evaluation recorded its decode settings get them from the bundle
(alpha, gamma, per-method gammas: what ``evaluate`` decoded with unless the command line overrode them;
``--settings`` corrects a row). ``--run``: the run directory; its sweep stage records give the claims' values
(the best alpha > 0 and, per MAGE variant, the best gamma > 0 on validation HV) and the MAGE variant chosen on
validation, and the script prints the command that decodes a MAGE row whose report gamma is not the claims'
one. ``--add``: another report on the same prompts and grid whose rows join (replacing rows of the same label).
``--rescore --config FILE``: score every text again with the current objectives and quality gate (loads the
reward models). Without ``--out`` the report is rewritten in place.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mage_ray.guidance import REGISTRY


def bundle_context(bundle_dir: str, labels: list[str]) -> dict:
    """Decode settings per row label (registry names only) and the serving choice, from a bundle's bundle.json."""
    from mage_ray.bundle import load_bundle

    b = load_bundle(bundle_dir)
    gammas = b.method_gammas or {}
    settings = {
        m: {"method": m, "alpha": float(b.alpha), "gamma": float(gammas.get(m, b.gamma))}
        for m in labels
        if m in REGISTRY
    }
    return {"settings": settings, "serving": {"method": b.default_method, "alpha": b.alpha, "gamma": b.gamma}}


def run_claims(run_dir: str, labels: list[str]) -> dict:
    """The claims' values from a run's sweep stage records: alpha_claims, claims_gammas, mage_choice."""
    from mage_ray.pipeline import mage_claims
    from mage_ray.sweep import claims_value

    stages = Path(run_dir, "stages")

    def record(stage: str) -> dict | None:
        p = stages / f"{stage}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    alpha = record("alpha") or {}
    serving_alpha = float((alpha.get("best") or {}).get("decode.alpha", 0.0))
    records = {}
    gamma = record("gamma")
    if gamma and gamma.get("method"):
        records[gamma["method"]] = gamma
    for m, spec in REGISTRY.items():
        if spec.family == "mage" and record(f"gamma_{m}"):
            records[m] = record(f"gamma_{m}")
    out = {"alpha_claims": claims_value(alpha, "decode.alpha", serving_alpha)}
    out.update(mage_claims(records, labels, default=float("nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", required=True, help="a finished report directory (generations.parquet, ...)")
    ap.add_argument("--out", default=None, help="where to write (default: --report, in place)")
    ap.add_argument(
        "--bundle", default=None, help="bundle the report decoded: its settings and serving choice"
    )
    ap.add_argument(
        "--settings", default=None, help='JSON label -> fields over the others, e.g. {"x": {"gamma": 1}}'
    )
    ap.add_argument(
        "--run", default=None, help="run directory: the claims' values from its sweep stage records"
    )
    ap.add_argument("--add", action="append", default=[], help="another report whose rows join (repeatable)")
    ap.add_argument(
        "--rename", action="append", default=[], metavar="OLD=NEW", help="rename a row of --report first"
    )
    ap.add_argument("--rescore", action="store_true", help="score and flag every text again (needs --config)")
    ap.add_argument("--config", default=None, help="config of the task (with --rescore)")
    ap.add_argument("--confidence", type=float, default=None)
    ap.add_argument("--n-resamples", type=int, default=None)
    args = ap.parse_args()

    from mage_ray.rereport import read_generations, recompute_report

    rename = dict(x.split("=", 1) for x in args.rename)
    rows, _, _, _, meta = read_generations(args.report)
    labels = [rename.get(m, m) for m in dict.fromkeys(r["method"] for r in rows)]
    recorded = {rename.get(k, k) for k in ((meta.get("context") or {}).get("settings") or {})}
    for other in args.add:
        rows, _, _, _, meta = read_generations(other)
        added = list(dict.fromkeys(r["method"] for r in rows))
        labels = [m for m in labels if m not in added] + added
        recorded |= set((meta.get("context") or {}).get("settings") or {})
    context: dict = {}
    if args.bundle:  # settings for the rows whose report did not record them
        old = {v: k for k, v in rename.items()}
        ctx = bundle_context(args.bundle, [old.get(m, m) for m in labels])
        settings = {rename.get(k, k): v for k, v in ctx["settings"].items()}
        context = {
            "serving": ctx["serving"],
            "settings": {k: v for k, v in settings.items() if k not in recorded},
        }
    if args.settings:
        extra = json.loads(args.settings)
        settings = context.setdefault("settings", {})
        for label, fields in extra.items():
            settings[label] = {"method": label, **settings.get(label, {}), **fields}
    if args.run:
        claims = run_claims(args.run, labels)
        print(f"claims' values from {args.run}/stages: {json.dumps(claims)}")
        if claims.get("mage_choice"):
            context["mage_choice"] = claims["mage_choice"]
        for m, g in claims.get("claims_gammas", {}).items():
            st = (context.get("settings") or {}).get(m)
            if m in labels and st and st.get("gamma") != g:
                print(
                    f"{m} was decoded at gamma {st.get('gamma')}, its claims gamma is {g} (alpha "
                    f"{claims['alpha_claims']}); decode it and add it with --add:\n"
                    f"    .venv/bin/python jobs/evaluate.py --config <config> --bundle <bundle> --out <dir> "
                    f"'eval.methods=[bs,{m}]' decode.gamma={g} decode.alpha={claims['alpha_claims']}\n"
                    "(its bs row replaces this report's; keep the old one with --rename 'bs=bs (alpha <a>)')"
                )
    objectives = None
    if args.rescore:
        if not args.config:
            raise SystemExit("error: --rescore needs --config (the task whose objectives score the texts)")
        from mage_ray.config import load_config
        from mage_ray.tasks.objectives import load_objectives

        objectives = load_objectives(load_config(args.config).task)
    recompute_report(
        args.report,
        args.out,
        confidence=args.confidence,
        n_resamples=args.n_resamples,
        objectives=objectives,
        context=context or None,
        add=args.add,
        rename=rename,
    )
    out = args.out or args.report
    print(Path(out, "metrics.md").read_text())
    print(f"report: {out}")


if __name__ == "__main__":
    main()
