"""Sweep beta, alpha and gamma against hypervolume and write a servable bundle.

Runs backbones (per-beta Tune trials, then the chosen beta in full) -> alpha/gamma Tune trials -> bundle + sweep
report under ``<storage.storage_path>/<storage.run_name>/``. Rollouts and explicit value models are trained only
when a method of ``eval.methods`` or ``sweep.gamma_method`` needs them (mage-e, mage-e-m); the bundle serves the
methods whose artifacts it holds (``/v1/objectives`` lists them). Rerunning the same command resumes: finished
stages, trials and artifacts are kept.

    mage-ray sweep --config configs/embedded.yaml storage.storage_path=s3://bucket/runs
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """No flags of its own: config fields are ``key=value`` overrides."""
    from mage_ray.preflight import TRAINING

    parser.set_defaults(
        checks=(*TRAINING, "ref_point"),  # mage_ray.preflight: its sweeps need hypervolume
        plan_stages=("beta", "backbones", "rollouts", "values", "alpha", "gamma"),  # its memory check
    )


def run(args, cfg) -> None:
    from mage_ray.runtime import init_ray

    init_ray()
    from mage_ray.pipeline import dumps, run_sweep

    print(dumps(run_sweep(cfg)))
