"""The engine deployment: one :class:`~mage_ray.serve.core.Generator` (one decode engine, one copy of the base
weights) as a Ray Serve deployment that the HTTP ingress (:mod:`mage_ray.serve.app`) calls through a
``DeploymentHandle``. No HTTP here.

Why two deployments: a process that dies cannot say so. With the engine in the ingress's process, a replica
killed mid-stream (out of memory, a segfault in a kernel, a lost node) leaves the client with a truncated
chunked body: Serve's proxy sends nothing once a response has started (``send_http_response_on_exception``
in ``ray/serve/_private/http_util.py`` returns no message when ``response_started``). With the engine in its own
deployment, the ingress survives, sees the handle's ``ActorDiedError`` and ends the stream with an error event;
Serve starts another engine replica meanwhile, and requests queue for it.

Methods (each one handle call per HTTP request; validation that needs the model, :meth:`Generator.check`, runs
here, so a request is checked, tokenised and queued in one call):

=========================================  ===================================================================
``facts()``                                :class:`EngineFacts`: limits, /v1/objectives, model id (fixed)
``events(req, field)``                     streaming: lists of TokenEvents until the finishing one
``generate(req, field)``                   one Completion
``generate_many(reqs, fields)``            Completions in order (interactive)
``grid(points, prompts, reqs, score)``     the /v1/grid answer
``load_scorers()``, ``score_completion``   the bundle's objectives (``score`` of /v1/generate)
``health()``, ``stats()``                  (ok, reason); counters of this replica and its ``pid``
=========================================  ===================================================================

Closing or cancelling an ``events`` call (the ingress does when its client disconnects) cancels the request: the
engine drops its rows at the next decode step.

Memory: decoding allocates tensors whose sizes change every step (the KV cache grows by concatenation, rows join
and leave), and glibc's malloc, whose mmap threshold rises to the largest block freed so far, then serves them
from its heaps and keeps the holes they leave: in a 10-minute soak (``bench/soak_serve.py``) an engine replica's
RSS grew 1.46 -> 2.4 GB. :func:`set_mmap_threshold` fixes the threshold at :data:`MMAP_THRESHOLD_BYTES`, so
blocks of 1 MiB or more are mapped and unmapped on their own; the same soak then ends at 1.37 GB from 1.42 GB
(docs/benchmarks.md, "Serve survives faults"). Set ``MALLOC_MMAP_THRESHOLD_`` in the replicas' environment to
choose another value.
"""

# No `from __future__ import annotations`: Serve builds the class's remote methods from real annotations.

import ctypes
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve

from mage_ray.config import Config, config_from_dict
from mage_ray.decode import Completion, Request, TokenEvent
from mage_ray.serve.core import Generator
from mage_ray.serve.monitoring import EngineGauges
from mage_ray.serve.schema import Limits

__all__ = [
    "GRACEFUL_SHUTDOWN_S",
    "MMAP_THRESHOLD_BYTES",
    "EngineFacts",
    "MageEngine",
    "engine_options",
    "set_mmap_threshold",
]

GRACEFUL_SHUTDOWN_S = 60.0
"""How long a stopping replica lets in-flight requests (streams included) finish before it is killed."""

MMAP_THRESHOLD_BYTES = 1 << 20
"""glibc's M_MMAP_THRESHOLD in engine replicas. Measured with the plain Generator on the soak's traffic (3 minutes
after a 1-minute warm-up): RSS once idle again grew 1.35 -> 1.85 GB with glibc's default, 1.37 -> 1.58 GB with
4 MiB, 1.31 -> 1.32 GB with 1 MiB. The price is page faults on every freshly mapped KV cache: CPU time of a batch
of 16 requests x 2 rows x ~110 tokens +11% (4 MiB: +1%), of 8 requests x <= 44 tokens unchanged (128 KiB costs
+13% even there). On a GPU the KV caches are not in host memory, and neither cost nor gain applies."""
M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the threshold (malloc.h)."""


def set_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Make glibc's malloc map blocks of ``nbytes`` or more on their own, returned to the OS when freed (this also
    stops the threshold from rising). Left alone when ``MALLOC_MMAP_THRESHOLD_`` is set; False where the C library
    is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False


@dataclass(frozen=True)
class EngineFacts:
    """What the ingress needs from the engine to validate and answer requests; fixed for a deployment."""

    info: dict[str, Any]
    """``GET /v1/objectives``: objectives, methods, defaults (method, gamma, alpha, ...), limits, model id."""
    limits: Limits
    """The bundle-dependent half of request validation (:func:`mage_ray.serve.schema.to_request`)."""
    name: str
    """The served model id (``serve.model_name``)."""
    created: int
    """Unix time the bundle was written (``created`` of /v1/models)."""


@serve.deployment(name="MageEngine")
class MageEngine:
    """One replica: one :class:`Generator` over the bundle; the thin Ray shell the ingress calls."""

    def __init__(self, bundle: str, config: dict[str, Any], overrides: list[str] | None = None):
        from mage_ray.devices import note_process

        note_process("Serve engine replica")
        set_mmap_threshold()  # before the model loads (module docstring, "Memory")
        cfg = config_from_dict(config)
        if cfg.serve.num_gpus == 0 and cfg.serve.num_cpus >= 1:
            import torch

            # One intra-op thread per reserved CPU: more threads than cores makes OpenMP spin-wait, which on a
            # shared node slows decoding by orders of magnitude.
            torch.set_num_threads(int(cfg.serve.num_cpus))
        self.core = Generator.from_bundle(bundle, cfg, overrides or [])
        self.gauges = EngineGauges(self.core.stats).start()  # Prometheus: queue depth, running requests

    async def check_health(self) -> None:
        ok, why = self.core.health()
        if not ok:
            raise RuntimeError(why)

    def __del__(self) -> None:
        if getattr(self, "gauges", None) is not None:
            self.gauges.stop()
        core = getattr(self, "core", None)
        if core is not None:
            core.close()

    async def facts(self) -> EngineFacts:
        c = self.core
        return EngineFacts(info=c.info(), limits=c.limits, name=c.name, created=c.created)

    async def health(self) -> tuple[bool, str]:
        return self.core.health()

    async def stats(self) -> dict[str, Any]:
        return {**self.core.stats(), "pid": os.getpid()}

    async def events(self, req: Request, field: str) -> AsyncIterator[list[TokenEvent]]:
        """Check ``req`` (ApiError naming ``field``), queue it, and yield its events in lists (what arrived since
        the last one) until the finishing event; a caller that goes away cancels the request."""
        await self.core.check(req, field)
        ticket = self.core.submit(req)
        try:
            while True:
                batch = await ticket.next_batch()
                yield batch
                if batch[-1].finished:
                    return
        finally:
            if not ticket.finished:
                ticket.cancel()

    async def generate(self, req: Request, field: str) -> Completion:
        await self.core.check(req, field)
        return await self.core.generate(req)

    async def generate_many(self, reqs: list[Request], fields: Sequence[str]) -> list[Completion]:
        for r, f in zip(reqs, fields, strict=True):
            await self.core.check(r, f)
        return await self.core.generate_many(reqs, interactive=True)

    async def grid(self, points: np.ndarray, prompts: list[Any], reqs: list[Request], score: bool) -> dict:
        return await self.core.grid(points, prompts, reqs, score=score)

    async def load_scorers(self) -> None:
        await self.core.load_scorers()

    async def score_completion(self, req: Request, text: str) -> list[float | None]:
        return await self.core.score_completion(req, text)


def engine_options(cfg: Config) -> dict[str, Any]:
    """Serve options of the engine deployment from ServeConfig: replicas or autoscaling, concurrency, resources,
    shutdown, health checks."""
    sc = cfg.serve
    opts: dict[str, Any] = {
        "max_ongoing_requests": sc.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": sc.num_cpus, "num_gpus": sc.num_gpus},
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 10.0,
        "health_check_timeout_s": 30.0,
    }
    if sc.autoscaling:
        opts["autoscaling_config"] = dict(sc.autoscaling)
    else:
        opts["num_replicas"] = sc.num_replicas
    return opts
