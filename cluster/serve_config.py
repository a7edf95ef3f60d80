"""Write a copy of the Serve config (or of the RayService) that serves another bundle.

``serve deploy CONFIG_FILE`` takes no application arguments (Ray refuses ``key=value`` after a config file),
so serving another bundle means deploying a copy of ``cluster/serve.yaml`` with other ``args``. This script
writes that copy: the bundle and the config (absolute paths as the cluster's nodes see them), optional config
overrides, everything else (proxy, runtime_env, deployments) from the base file::

    python cluster/serve_config.py --bundle /mnt/mage_ray/summary/bundle \\
        --config /home/ray/mage_ray/configs/summary.yaml -o /tmp/serve-summary.yaml
    serve deploy --address http://127.0.0.1:8265 /tmp/serve-summary.yaml

    python cluster/serve_config.py --base cluster/kuberay/rayservice.yaml --bundle /mnt/mage_ray/summary/bundle \\
        --config /home/ray/mage_ray/configs/summary.yaml -o /tmp/rayservice-summary.yaml
    kubectl apply -f /tmp/rayservice-summary.yaml          # the RayService, its serveConfigV2 replaced

When the config is readable here (the path itself, or the same file in this checkout for a path under
/home/ray/mage_ray, where the nodes keep it), it is loaded with the overrides, so a bad field fails now, and the
engine's ``ray_actor_options`` / ``max_ongoing_requests`` (and the ingress's ``max_ongoing_requests``) are
taken from its ``serve`` section, as ``mage_ray.serve.engine.engine_options`` gives them to the code: the base
file's deployment overrides would otherwise win over the new config's. The result is validated with Ray
Serve's ``ServeDeploySchema`` before it is written (atomically). Comments of the base file are not kept.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "cluster" / "serve.yaml"
NODE_CHECKOUT = "/home/ray/mage_ray"
"""Where every cluster node has this checkout (cluster/gpu-cluster.yaml's file_mounts, cluster/Dockerfile)."""


class ServeConfigError(ValueError):
    """A bad argument; the message names it."""


def local_config(config: str) -> Path | None:
    """The file this machine can read for the node path ``config``, or None."""
    path = Path(config)
    if path.is_file():
        return path
    if path.is_relative_to(NODE_CHECKOUT):
        here = REPO / path.relative_to(NODE_CHECKOUT)
        if here.is_file():
            return here
    return None


def with_args(
    serve_doc: dict[str, Any], bundle: str, config: str, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """A copy of the Serve config ``serve_doc`` (one application) whose app serves ``bundle`` with ``config``."""
    for name, value in (("--bundle", bundle), ("--config", config)):
        if not value or not Path(value).is_absolute():
            raise ServeConfigError(
                f"{name} = {value!r}: give an absolute path as the cluster's nodes see it (the Ray process "
                "that builds the app does not run in your working directory)"
            )
    doc = copy.deepcopy(serve_doc)
    apps = doc.get("applications") or []
    if len(apps) != 1:
        raise ServeConfigError(f"the base Serve config has {len(apps)} applications; expected 1")
    app = apps[0]
    app["args"] = {"bundle": bundle, "config": config}
    if overrides:
        app["args"]["overrides"] = list(overrides)
    found = local_config(config)
    if found is not None:
        _deployments_from_config(app, found, overrides)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(doc)
    return doc


def _deployments_from_config(app: dict[str, Any], config: Path, overrides: Sequence[str]) -> None:
    """Engine resources and concurrency from the config's serve section (the code's engine_options)."""
    from mage_ray.config import ConfigError, load_config
    from mage_ray.serve.engine import engine_options

    try:
        cfg = load_config(config, list(overrides))
    except ConfigError as e:
        raise ServeConfigError(f"--config {config}: {e}") from e
    code = engine_options(cfg)
    deps = {d["name"]: d for d in app.get("deployments", [])}
    if "MageEngine" in deps:
        deps["MageEngine"]["ray_actor_options"] = dict(code["ray_actor_options"])
        deps["MageEngine"]["max_ongoing_requests"] = code["max_ongoing_requests"]
    if "MageIngress" in deps:
        deps["MageIngress"]["max_ongoing_requests"] = code["max_ongoing_requests"]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a RayService's serveConfigV2) as literal blocks."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def render(base: dict[str, Any], bundle: str, config: str, overrides: Sequence[str] = ()) -> str:
    """The YAML text of ``base`` (a Serve config or a RayService manifest) serving ``bundle`` with ``config``."""
    if base.get("kind") == "RayService":
        out = copy.deepcopy(base)
        serve_doc = yaml.safe_load(base["spec"]["serveConfigV2"])
        out["spec"]["serveConfigV2"] = yaml.dump(
            with_args(serve_doc, bundle, config, overrides), Dumper=_Dumper, sort_keys=False
        )
    else:
        out = with_args(base, bundle, config, overrides)
    return yaml.dump(out, Dumper=_Dumper, sort_keys=False)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle directory on the nodes (absolute)")
    p.add_argument("--config", required=True, help="the bundle's config YAML on the nodes (absolute)")
    p.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)"
    )
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="Serve config or RayService manifest")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    a = p.parse_args(argv)
    if local_config(a.config) is None:
        print(
            f"note: {a.config} is not readable here: not checked, and the deployments keep the base file's "
            "resources and concurrency",
            file=sys.stderr,
        )
    try:
        text = render(yaml.safe_load(a.base.read_text()), a.bundle, a.config, a.override)
    except ServeConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.output is None:
        sys.stdout.write(text)
    else:
        from mage_ray.manifest import write_text_atomic

        write_text_atomic(a.output, text)
        print(f"wrote {a.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
