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
    parser.set_defaults(checks=("bundle", "bundle_objectives", "storage", "data", "model", "objectives"))


def run(args, cfg) -> None:
    from mage_ray.decode import Engine, decode_defaults
    from mage_ray.evaluate import evaluate, reference_point
    from mage_ray.manifest import join
    from mage_ray.soup import preference_grid
    from mage_ray.storage import read_text
    from mage_ray.tasks.objectives import load_objectives
    from mage_ray.tasks.prompts import load_prompts

    bundle = open_bundle(args.bundle)
    objectives = load_objectives(cfg.task)
    if [o.name for o in objectives] != list(bundle.objectives):
        raise SystemExit(
            f"error: task.objectives {cfg.task.objectives} differ from the bundle's {bundle.objectives}"
        )
    prompts = load_prompts(cfg.task, args.split)
    grid = preference_grid(cfg.n_objectives, cfg.eval.grid_step)
    out = args.out or join(cfg.storage.run_dir, "eval")
    summary = evaluate(
        Engine(
            bundle, decode_defaults(cfg, bundle, args.overrides)
        ),  # the bundle's alpha/gamma unless overridden
        objectives,
        prompts,
        cfg.eval.methods,
        grid,
        ref_point=reference_point(objectives, cfg.eval.ref_point or bundle.ref_point),
        out_dir=out,
        batch_size=cfg.decode.batch_size,
        min_prompts=cfg.eval.min_test_prompts,
        confidence=cfg.eval.confidence,
        n_resamples=cfg.eval.n_resamples,
    )
    print(read_text(join(out, "metrics.md")))
    print(f"report: {out} (decode {summary['decode_seconds']:.0f} s)")
