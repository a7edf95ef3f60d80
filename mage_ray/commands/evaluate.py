"""Evaluate a bundle: every method of ``eval.methods`` over the preference grid on the test prompts.

Writes generations.parquet, rewards.json, metrics.json/metrics.md, samples.md and front.png to ``--out``. Decodes
with the bundle's alpha and gamma (the sweep's choice) unless ``decode.alpha=`` / ``decode.gamma=`` override them.

    mage-ray evaluate --config configs/embedded.yaml --bundle runs/embedded/bundle
"""

from __future__ import annotations

from mage_ray.commands import open_bundle


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory (from the sweep)")
    parser.add_argument("--out", default=None, help="report directory (default <run_dir>/eval)")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.set_defaults(
        checks=(
            "bundle",
            "bundle_objectives",
            "storage",
            "data",
            "model",
            "objectives",
            "ref_point",
            "memory",
        ),
        plan_stages=("evaluate",),
    )


def run(args, cfg) -> None:
    from mage_ray.evaluate import on_decode_worker
    from mage_ray.manifest import join
    from mage_ray.storage import read_text
    from mage_ray.tasks.objectives import load_objectives

    bundle = open_bundle(args.bundle)
    names = [o.name for o in load_objectives(cfg.task, load=False)]  # names only: no model in this process
    if names != list(bundle.objectives):
        raise SystemExit(
            f"error: task.objectives {cfg.task.objectives} differ from the bundle's {bundle.objectives}"
        )
    out = args.out or join(cfg.storage.run_dir, "eval")
    if cfg.decode.num_gpus > 0:  # decoding runs in a Ray task that holds the GPU (decode.num_gpus)
        from mage_ray.runtime import init_ray

        init_ray()
    summary = on_decode_worker(
        cfg.decode, evaluate_split, cfg, args.bundle, args.split, out, list(args.overrides)
    )
    print(read_text(join(out, "metrics.md")))
    print(f"report: {out} (decode {summary['decode_seconds']:.0f} s)")


def evaluate_split(cfg, bundle_dir: str, split: str, out: str, overrides: list[str]) -> dict:
    """Decode and score every method of ``eval.methods`` on ``split``; write the report to ``out``. Decodes with
    the bundle's alpha and gamma unless the command line overrides them."""
    from mage_ray.bundle import load_bundle
    from mage_ray.decode import Engine, decode_defaults
    from mage_ray.evaluate import decode_settings, evaluate, reference_point
    from mage_ray.soup import preference_grid
    from mage_ray.tasks.objectives import load_objectives
    from mage_ray.tasks.prompts import load_prompts

    bundle = load_bundle(bundle_dir)
    objectives = load_objectives(cfg.task)
    defaults = decode_defaults(cfg, bundle, overrides)
    return evaluate(
        Engine(bundle, defaults, device=cfg.decode.device),
        objectives,
        load_prompts(cfg.task, split),
        cfg.eval.methods,
        preference_grid(cfg.n_objectives, cfg.eval.grid_step),
        ref_point=reference_point(objectives, cfg.eval.ref_point or bundle.ref_point),
        out_dir=out,
        batch_size=cfg.decode.batch_size,
        min_prompts=cfg.eval.min_test_prompts,
        confidence=cfg.eval.confidence,
        n_resamples=cfg.eval.n_resamples,
        settings=decode_settings(defaults, cfg.eval.methods),  # recorded: a MAGE row at gamma 0 is not MAGE
    )
