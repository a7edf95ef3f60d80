"""Stage 1 "Seek": train the n LoRA backbones of B(beta) concurrently (Ray Train runs inside Ray Tune).

Writes ``<run_dir>/backbones/beta_<beta>/b<i>/`` (and ``<run_dir>/morlhf/`` with backbone.morlhf=true); complete
backbones are skipped, interrupted ones resume. The body, and what it writes, is in
mage_ray/commands/train_backbones.py (also ``mage-ray train-backbones``). Config fields are set by
``section.field=value`` overrides only (no flag shadows a field).

    python jobs/train_backbones.py --config configs/embedded.yaml [section.field=value ...]
    ray job submit --working-dir . -- python jobs/train_backbones.py --config configs/embedded.yaml \\
        storage.storage_path=/shared/mage_runs
    python jobs/train_backbones.py --config configs/smoke.yaml                  # smoke run, tiny model
    python jobs/train_backbones.py --config configs/embedded.yaml backbone.beta=0.8 backbone.steps=6
"""

import sys

from mage_ray.commands import run_command, train_backbones
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], train_backbones.add_arguments)
    return run_command(train_backbones, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
