"""Serve a bundle over HTTP with Ray Serve: the playground page at ``/`` and the API under ``/v1/``.

Binds ``serve.host``:``serve.port`` (127.0.0.1:8000 unless configured), says where the page and the API are,
and blocks until Ctrl-C or SIGTERM (``ray job stop`` of a submitted ``jobs/serve.py``, ``kill``), which take the
application down and exit with status 0: on a cluster (RAY_ADDRESS) only this application is deleted, in a
private Ray all of Serve stops. Clusters usually deploy cluster/serve.yaml instead. Try it::

    curl -N localhost:8000/v1/generate -d '{"prompt": "Tell me about the sea", "preference": [0.3, 0.7], "stream": true}'

With ``serve.auth_token_env=MAGE_TOKEN`` (and MAGE_TOKEN set before Ray starts) every route but /healthz needs
``Authorization: Bearer $MAGE_TOKEN``. See mage_ray/serve/app.py for the routes.

    mage-ray serve --config configs/embedded.yaml --bundle runs/embedded/bundle
    mage-ray serve --config configs/smoke.yaml --bundle <dir> serve.port=8001 serve.num_replicas=2
"""

from __future__ import annotations

import os
import signal
import time

from mage_ray.commands import open_bundle


def add_arguments(parser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory (from the sweep)")
    parser.add_argument("--name", default="mage", help="Serve application name")
    parser.set_defaults(checks=("bundle", "model", "memory"), plan_stages=("serve",))  # mage_ray.preflight


def urls(host: str, port: int) -> tuple[str, str]:
    """(playground page, API base) a browser or client on this machine can open.

    A wildcard bind address (0.0.0.0, ::) is not one to connect to; such a server is reached at 127.0.0.1 here.
    """
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/", f"http://{shown}:{port}/v1"


def run(args, cfg) -> None:
    open_bundle(args.bundle)  # a bad bundle fails here, in one line, before Ray starts
    from mage_ray.runtime import init_ray

    init_ray()
    from ray import serve

    from mage_ray.serve.app import build_app

    page, api = urls(cfg.serve.host, cfg.serve.port)
    signal.signal(signal.SIGTERM, _terminated)  # the same clean stop as Ctrl-C
    try:
        app = build_app({"bundle": args.bundle, "config": args.config, "overrides": args.overrides})
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        print(
            f"starting {args.bundle} on {cfg.serve.host}:{cfg.serve.port} (loading the model) ...", flush=True
        )
        serve.run(app, name=args.name, route_prefix="/")
        print(
            f"serving {args.bundle} (application {args.name!r})\n"
            f"  playground  {page}\n"
            f"  API         {api}/  (generate, chat/completions, completions, grid, objectives; "
            f"OpenAI base_url {api})\n"
            "Ctrl-C stops",
            flush=True,
        )
        _block()
    except (KeyboardInterrupt, Terminated) as e:
        _stop(args.name, wait=not isinstance(e, Terminated))
        print("stopped", flush=True)


class Terminated(Exception):
    """SIGTERM arrived (``ray job stop`` sends it, then SIGKILL 3 s later unless RAY_JOB_STOP_WAIT_TIME_S says
    otherwise)."""


def _terminated(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def _block() -> None:
    """Wait for Ctrl-C (Serve runs in Ray's processes, not in this one)."""
    while True:
        time.sleep(3600)


def _stop(name: str, wait: bool = True) -> None:
    """Take the application down: on a shared cluster (RAY_ADDRESS) only ours, in a private Ray all of Serve.

    ``wait=False`` (SIGTERM): on a cluster, hand the deletion to Serve's controller and return at once; the
    controller, which outlives this driver, finishes it even when the job is killed right after."""
    import ray
    from ray import serve

    if os.environ.get("RAY_ADDRESS"):
        serve.delete(name, _blocking=wait)
    else:
        serve.shutdown()
        ray.shutdown()
