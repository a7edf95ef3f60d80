"""The whole chain on one config: sweep -> bundle -> evaluation report of every method of ``eval.methods``.

The sweep trains the backbones, rollouts and value models and chooses beta, alpha and gamma; MORLHF and the
other baselines are trained when ``eval.methods`` asks for them. Rerunning resumes from the finished stages.

    mage-ray pipeline --config configs/embedded.yaml
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    """No flags of its own: config fields are ``key=value`` overrides."""
    from mage_ray.preflight import TRAINING

    parser.set_defaults(checks=(*TRAINING, "ref_point"))  # mage_ray.preflight: its sweeps need hypervolume


def run(args, cfg) -> None:
    from mage_ray.runtime import init_ray

    init_ray()
    from mage_ray.pipeline import dumps, run_pipeline

    print(dumps(run_pipeline(cfg)))
