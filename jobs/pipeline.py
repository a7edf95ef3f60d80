"""The whole chain on one config: sweep (backbones, rollouts, value models, beta/alpha/gamma) -> bundle
-> evaluation report comparing every method of ``eval.methods`` (plus MORLHF when configured).

``make demo`` runs this on configs/embedded.yaml. Rerunning resumes from the finished stages. The body is
mage_ray/commands/pipeline.py (also ``mage-ray pipeline``).

    python jobs/pipeline.py --config configs/embedded.yaml
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/embedded.yaml \\
        storage.storage_path=/shared/mage_runs
"""

import sys

from mage_ray.commands import pipeline, run_command
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], pipeline.add_arguments)
    return run_command(pipeline, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
