"""Train one explicit value model per objective (Eq. 16) on the rollouts; Ray Train runs, concurrently via Tune.

Reads ``<run_dir>/rollouts/`` (from the rollouts command) and writes ``<run_dir>/values/<objective>/``
(adapter/, value_head.safetensors, manifest.json with val_mse and ranking_accuracy). Complete value models
are skipped; an interrupted Ray Train run resumes from its last checkpoint.

    mage-ray train-values --config configs/smoke.yaml --no-ray        # in-process, one after another
    mage-ray train-values --config configs/smoke.yaml value.steps=4     # fields: key=value overrides
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument(
        "--rollouts", default=None, help="rollouts dir or Parquet file (default <run_dir>/rollouts)"
    )
    parser.add_argument("--objectives", default=None, help="comma-separated subset (default task.objectives)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="value models trained at once")
    parser.add_argument("--no-ray", action="store_true", help="train in this process, one after another")
    parser.set_defaults(
        checks=("storage", "model", "objectives", "memory"), plan_stages=("values",)
    )  # mage_ray.preflight: reads rollouts, not prompts


def run(args, cfg) -> None:
    from mage_ray.runtime import init_ray

    if not args.no_ray:
        init_ray()
    from mage_ray.train.values import train_value_models

    objectives = args.objectives.split(",") if args.objectives else None
    manifests = train_value_models(
        cfg,
        args.rollouts,
        objectives,
        use_ray=not args.no_ray,
        max_concurrent=args.max_concurrent,
    )
    for m in manifests:
        print(
            f"{m['objective']}: val_mse {m['val_mse']} (constant {m['val_mse_constant']}), "
            f"ranking_accuracy {m['ranking_accuracy']} over {m['n_val_pairs']} pairs, "
            f"{m['mean_step_time_s']} s/step"
        )
