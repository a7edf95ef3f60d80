"""Serve a bundle over HTTP with Ray Serve (the local launcher; clusters use cluster/serve.yaml).

    python jobs/serve.py --config configs/embedded.yaml --bundle runs/embedded/bundle
    python jobs/serve.py --config configs/smoke.yaml --bundle <dir> serve.port=8001 serve.num_replicas=2

Binds ``serve.host``:``serve.port`` (127.0.0.1:8000 unless configured) and blocks until Ctrl-C. Try it::

    curl -N localhost:8000/v1/generate -d '{"prompt": "Tell me about the sea", "preference": [0.3, 0.7], "stream": true}'

Open http://127.0.0.1:8000/ for the browser playground (README, "Playground").

With ``serve.auth_token_env=MAGE_TOKEN`` (and MAGE_TOKEN set before Ray starts) every route but /healthz and the
playground page needs ``Authorization: Bearer $MAGE_TOKEN``. See mage_ray/serve/app.py for the routes.
"""

from ray import serve

from mage_ray.runtime import init_ray, parse_job_args
from mage_ray.serve.app import build_app


def main() -> None:
    def extra(p):
        p.add_argument("--bundle", required=True, help="bundle directory (from jobs/sweep.py)")
        p.add_argument("--name", default="mage", help="Serve application name")

    args, cfg = parse_job_args(__doc__.splitlines()[0], extra)
    app = build_app({"bundle": args.bundle, "config": args.config, "overrides": args.overrides})
    init_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"serving {args.bundle} at {url} (playground: {url}/; Ctrl-C stops)", flush=True)
    serve.run(app, name=args.name, route_prefix="/", blocking=True)


if __name__ == "__main__":
    main()
