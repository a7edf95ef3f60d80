"""Rehearse a config on this machine: the same stages and Ray resource requests on logical GPUs, tiny stand-ins.

The body is mage_ray/commands/rehearse.py (also ``mage-ray rehearse``).

    python jobs/rehearse.py --config configs/hh_rlhf.yaml
"""

import sys

from mage_ray.commands import rehearse, run_command
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], rehearse.add_arguments)
    return run_command(rehearse, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
