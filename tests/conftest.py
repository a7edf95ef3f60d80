"""Shared fixtures. Tests build tiny random models locally; nothing downloads from a hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train starts a preemption-watcher actor per run (a process of its own, ~1.4 CPU-s to start); the suite's
# local clusters are never preempted and the suite starts ~70 runs. Every resource request stays the config's.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train V2's controller polls its workers every 2 s, and a worker's `ray.train.report` waits until the
# controller has taken the previous report: a run whose steps are shorter than that (every run here: tiny models,
# a few steps) waits ~2 s per step and ~5 s at its end. 0.25 s cuts a 5-step no-op run from 27 to 16 s and
# tests/test_ray_train.py from 189 to 140 s (docs/benchmarks.md). Real steps (seconds each) never wait on it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


HEAVY_FIRST = (
    "test_rehearse.py",
    "test_rehearse_summary.py",
    "test_kill_resume.py",
    "test_pipeline.py",
    "test_job_submission.py",
)
"""Modules that take minutes, run first: `make test` runs the suite on two pytest-xdist workers, one module per
worker at a time (``--dist loadfile``), so starting the longest ones first keeps both workers busy to the end."""


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a real GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Directory of the cached tiny random Llama (built once per machine)."""
    from mage_ray.models import resolve_model_path

    return resolve_model_path("tiny-random")


S3_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_EC2_METADATA_DISABLED",
)


@pytest.fixture(scope="session")
def s3_bucket():
    """``s3://<bucket>`` on a real S3-compatible server (moto's) that this fixture starts on 127.0.0.1.

    The endpoint (``AWS_ENDPOINT_URL``, which pyarrow's S3 filesystem reads) and dummy credentials are set in this
    process's environment while the session runs, so subprocesses and their local Ray workers inherit them.
    """
    import logging
    import shutil
    import socket
    import uuid

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in S3_ENV_KEYS}
    os.environ.update(env)
    bucket = f"mage-test-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        server.stop()
        from mage_ray.storage import default_download_dir

        for d in default_download_dir().glob(f"{bucket}*"):  # local copies made by the session's jobs
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
            else:
                d.unlink(missing_ok=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
