"""The whole chain on one config: sweep (backbones, rollouts, value models, beta/alpha/gamma) -> bundle
-> evaluation report comparing every method of ``eval.methods`` (plus MORLHF when configured).

``make demo`` runs this on configs/embedded.yaml. Rerunning resumes from the finished stages.

    python jobs/pipeline.py --config configs/embedded.yaml
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/embedded.yaml
"""

from mage_ray.pipeline import dumps, run_pipeline
from mage_ray.runtime import init_ray, parse_job_args


def main() -> None:
    _, cfg = parse_job_args(__doc__.splitlines()[0])
    init_ray()
    print(dumps(run_pipeline(cfg)))


if __name__ == "__main__":
    main()
