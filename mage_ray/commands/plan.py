"""Memory plan: per stage, the peak GPU memory of one worker / replica, the GPUs it holds and the GPU-hours.

Reads the config only (a local model directory's or the HF cache's config.json, else a table of known shapes);
starts nothing, loads no weights, finishes in seconds. One row per stage: what one worker is, the GPUs of the
stage's concurrent runs, the peak per GPU and its largest terms, whether it fits the declared GPU memory (``--gpu-memory``
or ``plan.gpu_memory_gib``, minus ``plan.reserve_gib``) and, when not, the config field to lower and the largest
value that fits, then steps x seconds per step ("assumed": an H100 roofline, mage_ray.stage_plan.ASSUMED;
"measured": given with --step-seconds) and GPU-hours. Exit status 1 when a GPU stage does not fit.

    mage-ray plan --config configs/hh_rlhf.yaml --gpu-memory 80
    mage-ray plan --config configs/hh_rlhf.yaml --gpu-memory 80 --json /tmp/plan.json --step-seconds backbones=12.1
"""

from __future__ import annotations

from mage_ray.memory_plan import gib


def add_arguments(parser) -> None:
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory of one GPU in GiB (80 for an 80 GB A100 / H100); default plan.gpu_memory_gib",
    )
    parser.add_argument(
        "--json", default=None, metavar="PATH", help="also write the plan as JSON (atomically)"
    )
    parser.add_argument(
        "--step-seconds",
        action="append",
        default=[],
        metavar="STAGE=S",
        help="a measured time per step of a stage (e.g. backbones=12.1), in place of the assumed one; repeatable",
    )
    parser.set_defaults(checks=())  # mage_ray.preflight: the plan shows a misfit, it does not refuse it


def _measured(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        stage, _, value = item.partition("=")
        try:
            out[stage.strip()] = float(value)
        except ValueError:
            raise SystemExit(
                f"error: --step-seconds {item!r}: expected STAGE=SECONDS, e.g. backbones=12.1"
            ) from None
    return out


def _terms(row, k: int = 3) -> str:
    terms = sorted(row.resident + row.transient, key=lambda t: -t.bytes)[:k]
    return ", ".join(f"{t.name} {gib(t.bytes):.1f}" for t in terms)


def table(plan, cfg, suggestions: dict[str, int | None]) -> str:
    """The plan as a Markdown table (one row per stage) plus its notes."""
    mem = f"{plan.gpu_memory_gib:g} GiB" if plan.gpu_memory_gib else "(no GPU memory declared)"
    lines = [
        f"| stage | one worker | GPUs at once | peak per GPU, GiB | largest terms, GiB | fits {mem} | "
        "lower | steps x s/step | GPU-h |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in plan.rows:
        fits = plan.fits(row)
        mark = {None: "cpu" if not row.gpu else "-", True: "yes", False: "**no**"}[fits]
        lower = ""
        if fits is False:
            best = suggestions.get(row.stage)
            lower = row.knob + (f" (<= {best})" if best else "")
        time = f"{row.steps:g} x {row.step_s:.2f} s ({row.time_source})" if row.steps and row.gpu else ""
        lines.append(
            f"| {row.stage} | {row.worker} | {row.gpus:g} | {gib(row.per_gpu):.1f} | {_terms(row)} | {mark} | "
            f"{lower} | {time} | {row.gpu_hours:.1f} |"
        )
    total = sum(r.gpu_hours for r in plan.rows)
    out = (
        "\n".join(lines)
        + f"\n\nGPU-hours in all: {total:.0f} (every stage once; the assumed step times: H100 roofline)."
    )
    notes = list(plan.notes) + [f"{r.stage}: {n}" for r in plan.rows for n in r.notes]
    if plan.shape is not None:
        s = plan.shape
        out = (
            f"model {plan.model}: {s.params / 1e9:.2f}B params, {s.layers} layers, h {s.hidden}, "
            f"{s.kv_heads}/{s.heads} KV/attention heads, vocab {s.vocab} ({s.source or 'table'}); "
            f"reserve {plan.reserve_gib:g} GiB per GPU\n\n" + out
        )
    return out + "".join(f"\n- {n}" for n in notes)


def run(args, cfg) -> int:
    import dataclasses

    from mage_ray.manifest import write_json_atomic
    from mage_ray.stage_plan import largest_fitting, plan_config

    if args.gpu_memory is not None:
        cfg = dataclasses.replace(cfg, plan=dataclasses.replace(cfg.plan, gpu_memory_gib=args.gpu_memory))
    plan = plan_config(cfg, _measured(args.step_seconds))
    suggestions = {r.stage: largest_fitting(cfg, r) for r in plan.rows if plan.fits(r) is False}
    print(table(plan, cfg, suggestions))
    if args.json:
        data = plan.to_dict()
        for st in data["stages"]:
            st["largest_fitting"] = suggestions.get(st["stage"])
        write_json_atomic(args.json, data)
        print(f"wrote {args.json}")
    return 1 if suggestions else 0
