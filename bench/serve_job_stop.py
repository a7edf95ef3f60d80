"""``ray job stop`` of a served bundle leaves no deployment; and the README's OpenAI client example at the default
settings, against that server.

Starts a one-node Ray cluster on this machine (cluster/local/start.sh, its own temp dir, stopped at the end),
submits ``jobs/serve.py`` with ``ray job submit --working-dir .``, waits for ``/healthz``, runs the README's
client example ``--asks`` times (OpenAI's defaults: no temperature, no max_tokens), then ``ray job stop`` and
reads the Serve applications from the dashboard's REST API (what ``serve status`` reads).

    .venv/bin/python bench/serve_job_stop.py --bundle runs/embedded/bundle            # the demo's bundle
    .venv/bin/python bench/serve_job_stop.py --embedded-stand-in /tmp/stand_in       # no demo run: the embedded
        # SmolLM2 with near-zero LoRA backbones (tests/bundle_factory.py), i.e. the base policy, in ~20 s
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stand_in_bundle(out: str) -> str:
    """The embedded policy with two LoRA backbones of std 1e-4 (the base policy, to within noise)."""
    sys.path.insert(0, str(REPO / "tests"))
    from bundle_factory import make_tiny_bundle

    bundle = Path(out) / "bundle"
    if not (bundle / "bundle.json").is_file():
        make_tiny_bundle(
            out,
            model="embedded:smollm2-135m-instruct",
            objectives=("relevance", "readability"),
            with_values=False,
            with_reward_models=False,
            lora_std=1e-4,
            default_method="mage-i-m",
            max_context=1024,
        )
    return str(bundle)


def ask_readme_example(base_url: str, asks: int) -> list[dict]:
    """The README's client example, verbatim but for the prompt of each ask after the first."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused")
    prompts = ["Tips for sleeping better?", "How do I make good coffee at home?", "Why is the sky blue?"]
    out = []
    for i in range(asks):
        t = time.monotonic()
        r = client.chat.completions.create(
            model="mage",
            messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
            extra_body={"preference": [0.3, 0.7], "mage": {"method": "mage-i-m", "gamma": 1.0}},
        )
        out.append(
            {
                "prompt": prompts[i % len(prompts)],
                "finish_reason": r.choices[0].finish_reason,
                "completion_tokens": r.usage.completion_tokens,
                "seconds": round(time.monotonic() - t, 1),
                "text": r.choices[0].message.content,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--bundle", help="a bundle directory")
    g.add_argument("--embedded-stand-in", metavar="DIR", help="build (or reuse) the stand-in bundle in DIR")
    ap.add_argument("--config", default="embedded")
    ap.add_argument("--asks", type=int, default=3, help="README client example requests (0: none)")
    args = ap.parse_args()
    bundle = os.path.abspath(args.bundle) if args.bundle else stand_in_bundle(args.embedded_stand_in)
    ray = str(Path(sys.executable).with_name("ray"))
    cdir = tempfile.mkdtemp(prefix="mrsj_", dir="/tmp")
    env = {**os.environ, "CLUSTER_DIR": cdir, "NUM_WORKERS": "0", "HEAD_CPUS": "2", "RAY": ray}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this venv's python for the cluster scripts
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["bash", str(REPO / "cluster/local/start.sh")], env=env, check=True, capture_output=True)
    info = dict(
        line.removeprefix("export ").split("=", 1)
        for line in Path(cdir, "env").read_text().splitlines()
        if line.startswith("export ")
    )
    dash = info["RAY_DASHBOARD"].strip("'\"")
    port = _free_port()
    try:
        job = subprocess.run(
            [ray, "job", "submit", "--address", dash, "--no-wait", "--working-dir", str(REPO), "--",
             "python", "jobs/serve.py", "--config", args.config, "--bundle", bundle, f"serve.port={port}"],
            env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", job.stdout).group(0)
        t = time.monotonic()
        while time.monotonic() - t < 600:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()["status"] == "ok":
                    break
            except (requests.RequestException, ValueError):
                pass
            time.sleep(2)
        print(f"healthy after {time.monotonic() - t:.0f} s (job {job_id})", flush=True)
        if args.asks:
            ask_readme_example(f"http://127.0.0.1:{port}/v1", args.asks)
        apps = requests.get(f"{dash}/api/serve/applications/", timeout=30).json()["applications"]
        print("applications before ray job stop:", sorted(apps), flush=True)
        t = time.monotonic()
        subprocess.run(
            [ray, "job", "stop", "--address", dash, job_id], env=env, check=True, capture_output=True
        )
        print(f"ray job stop returned after {time.monotonic() - t:.1f} s", flush=True)
        time.sleep(5)
        status = (
            subprocess.run(
                [ray, "job", "status", "--address", dash, job_id], env=env, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        logs = (
            subprocess.run(
                [ray, "job", "logs", "--address", dash, job_id], env=env, capture_output=True, text=True
            )
            .stdout.strip()
            .splitlines()
        )
        apps = requests.get(f"{dash}/api/serve/applications/", timeout=30).json()["applications"]
        print(f"job status: {status}\nlast log line: {logs[-1] if logs else ''}", flush=True)
        print("applications 5 s after ray job stop:", sorted(apps), flush=True)
        return 0 if not apps else 1
    finally:
        subprocess.run(["bash", str(REPO / "cluster/local/stop.sh")], env=env, capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
