"""The docs/results.md section of a finished pipeline run, from its own files (nothing is decoded or trained).

    .venv/bin/python bench/study_section.py --run /abs/runs/embedded_long --title "The claims at eight times the budget" \\
        --command "ray job submit ... -- python jobs/pipeline.py --config configs/embedded_long.yaml ..." \\
        --spread /abs/runs/embedded_long/arm_spread.txt > /tmp/section.md

Reads ``<run>/stages/*.json`` (stage times), ``<run>/study.log`` when there is one (bench/embedded_long.sh's steps:
their wall times, which include stages a step ran before the pipeline, recorded there with 0 s), ``<run>/report/`` (metrics.md: the metric, HV-ratio and claims tables
with the report's instruments; metrics.json; generations.parquet: sample texts), ``<run>/report/sweep.json``
(serving and claims choices, the learned guides' held-out accuracy) and, with ``--spread``, the saved output of
``bench/arm_spread.py`` (PARM's total-variation check). Prints Markdown: the command, stage times, the choices, the
tables, the guides, sample texts at mu = (1, 0), (0.5, 0.5), (0, 1) for the first ``--prompts`` test prompts, and the
PARM check. Run ``bench/rereport.py --report <run>/report`` first when the report predates the current instruments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ORDER = (
    "beta", "backbones", "rollouts", "values", "alpha", "gamma", "morlhf", "ric", "modpo", "wrpo", "arms", "parm",
)  # fmt: skip
PICKS = ((1.0, 0.0), (0.5, 0.5), (0.0, 1.0))


def stage_times(run: Path) -> str:
    """Table of every recorded stage and its seconds, in pipeline order, and the total."""
    recs = {p.stem: json.loads(p.read_text()) for p in sorted((run / "stages").glob("*.json"))}

    def key(name: str) -> tuple:
        if name in ORDER:
            return (ORDER.index(name), name)
        if name.startswith("gamma_"):
            return (
                ORDER.index("gamma") + 0.5 if name.split("_", 1)[1].startswith("mage") else len(ORDER),
                name,
            )
        return (len(ORDER) + 1, name)

    lines = ["| stage | seconds |", "|---|---|"]
    total = 0.0
    for name in sorted(recs, key=key):
        s = float(recs[name].get("seconds") or 0.0)
        total += s
        lines.append(f"| {name} | {s:.0f} |")
    lines.append(f"| **total** | **{total:.0f} ({total / 60:.1f} min)** |")
    return "\n".join(lines)


def study_steps(log: Path) -> str:
    """Table of the steps in a bench/embedded_long.sh log ("<UTC time> step N: what" ... "<UTC time> step N done")."""
    from datetime import datetime

    started: dict[str, tuple[datetime, str]] = {}
    lines = ["| step | what | started (UTC) | ended (UTC) | minutes |", "|---|---|---|---|---|"]
    for raw in log.read_text().splitlines():
        stamp, _, text = raw.partition(" ")
        if not text.startswith("step "):
            continue
        try:
            t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            continue
        head, _, rest = text.partition(":")
        name = head.split()[1]
        if head.endswith(" done"):
            if name in started:
                t0, what = started.pop(name)
                lines.append(
                    f"| {name} | {what} | {t0:%Y-%m-%d %H:%M} | {t:%H:%M} | {(t - t0).total_seconds() / 60:.1f} |"
                )
        else:
            started[name] = (t, rest.strip())
    return "\n".join(lines)


def choices(sweep: dict) -> str:
    """The serving and the claims' choices of the sweep."""
    out = [
        f"Serving (kept unless beaten beyond the prompt noise): beta {sweep.get('beta')}, alpha {sweep.get('alpha')}, "
        f"gamma {sweep.get('gamma')}"
        + "".join(f", {m} {g}" for m, g in (sweep.get("method_gammas") or {}).items())
        + ".",
        f"Claims (best value > 0 on validation HV): alpha {sweep.get('alpha_claims')}"
        + "".join(f", gamma of {m} {g}" for m, g in (sweep.get("claims_gammas") or {}).items())
        + ".",
    ]
    choice = sweep.get("mage_choice") or {}
    if choice:
        hv = ", ".join(f"{m} {v:.4g}" for m, v in choice.get("validation_hv", {}).items())
        out.append(f"MAGE variant carrying the claim: {choice['method']} (validation HV {hv}).")
    return " ".join(out)


def samples(report: Path, n_prompts: int, objectives: list[str]) -> str:
    """Sample texts of every row at the three picked preferences for the first ``n_prompts`` prompts."""
    import pyarrow.parquet as pq

    df = pq.read_table(report / "generations.parquet").to_pandas()
    methods = list(dict.fromkeys(df["method"]))
    head = "| prompt | method | " + " | ".join(f"mu = ({a:g}, {b:g})" for a, b in PICKS) + " |"
    lines = [head, "|---|---|" + "---|" * len(PICKS)]
    for i in range(n_prompts):
        rows = df[df["prompt_index"] == i]
        if rows.empty:
            break
        prompt = rows["prompt"].iloc[0]
        for k, m in enumerate(methods):
            cells = []
            for pick in PICKS:
                hit = rows[
                    (rows["method"] == m) & rows["preference"].map(lambda p, q=pick: np.allclose(p, q))
                ]
                if hit.empty:
                    cells.append("")
                    continue
                r = hit.iloc[0]
                if r["error"] is not None:
                    cells.append(f"error: {r['error']}")
                    continue
                scores = ", ".join(f"{r[o]:.2f}" for o in objectives)
                flag = "DEGENERATE " if bool(r.get("degenerate")) else ""
                text = " ".join(str(r["response"]).split()).replace("|", "\\|")
                cells.append(f'{flag}"{text}" ({scores})')
            lines.append(f"| {prompt if k == 0 else ''} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run directory (<storage_path>/<run_name>)")
    ap.add_argument("--title", default="A pipeline run")
    ap.add_argument("--command", default=None, help="the command that produced the run (printed as is)")
    ap.add_argument("--spread", default=None, help="saved stdout of bench/arm_spread.py on the run's bundle")
    ap.add_argument("--prompts", type=int, default=3)
    args = ap.parse_args()
    run = Path(args.run)
    report = run / "report"
    meta = json.loads((report / "metrics.json").read_text())
    sweep_path = report / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.is_file() else {}
    out = [f"## {args.title}\n"]
    if args.command:
        out.append(f"    {args.command}\n")
    out += ["### Stage times\n", stage_times(run), ""]
    if (run / "study.log").is_file():
        out += [
            "Stages with 0 s were done before this pipeline invocation (by an earlier step below, or reused).\n",
            "Steps of bench/embedded_long.sh (wall time, from study.log):\n",
            study_steps(run / "study.log"),
            "",
        ]
    if sweep:
        out += ["### Choices of the sweep\n", choices(sweep), ""]
    out += [
        "### Fronts, intervals and claims (test prompts)\n",
        (report / "metrics.md").read_text().strip(),
        "",
    ]
    if (report / "front.png").is_file():
        out.append(f"(Plot: `{report / 'front.png'}`; copy it to docs/img/.)\n")
    if sweep.get("guides"):
        from mage_ray.train.guides import guides_markdown

        out += [guides_markdown(sweep["guides"]).replace("\n## learned guides", "### Learned guides", 1), ""]
    out += [
        f"### Sample texts (first {args.prompts} test prompts; scores ({', '.join(meta['objectives'])}))\n",
        samples(report, args.prompts, meta["objectives"]),
        "",
    ]
    if args.spread:
        text = Path(args.spread).read_text().strip()
        out += ["### PARM: does its output move with mu? (`bench/arm_spread.py`)\n", "```", text, "```", ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
