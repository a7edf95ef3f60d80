"""Serve a bundle over HTTP with Ray Serve (the local launcher; clusters use cluster/serve.yaml).

Prints where the playground page (``http://<host>:<port>/``) and the API (``http://<host>:<port>/v1/...``) are,
and blocks until Ctrl-C or SIGTERM (``ray job stop``), which take the application down and exit with status 0.
The body is mage_ray/commands/serve.py (also ``mage-ray serve``); the routes are in mage_ray/serve/app.py.

    python jobs/serve.py --config configs/embedded.yaml --bundle runs/embedded/bundle
    python jobs/serve.py --config configs/smoke.yaml --bundle <dir> serve.port=8001 serve.num_replicas=2

Try it::

    curl -N localhost:8000/v1/generate -d '{"prompt": "Tell me about the sea", "preference": [0.3, 0.7], "stream": true}'

With ``serve.auth_token_env=MAGE_TOKEN`` (and MAGE_TOKEN set before Ray starts) every route but /healthz and the
playground page needs ``Authorization: Bearer $MAGE_TOKEN``.
"""

import sys

from mage_ray.commands import run_command, serve
from mage_ray.runtime import parse_job_args


def main() -> int:
    args, cfg = parse_job_args(__doc__.splitlines()[0], serve.add_arguments)
    return run_command(serve, args, cfg)


if __name__ == "__main__":
    sys.exit(main())
