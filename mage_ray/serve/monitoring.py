"""Prometheus metrics of the Serve app, recorded with ``ray.serve.metrics`` (counters, histograms, gauges that
carry Serve's ``deployment``, ``replica`` and ``application`` tags).

Ray exports them, with its own, on every node's metrics export port (``ray start --metrics-export-port``,
``ray.init(_metrics_export_port=...)``; ``ray.nodes()[i]["MetricsExportPort"]``), in the Prometheus text format at
``http://<node>:<port>/metrics``, each name prefixed ``ray_`` (counters also get ``_total``); Ray's Prometheus
service discovery file (``/tmp/ray/prom_metrics_service_discovery.json`` on the head node) lists the nodes' ports.
Ray reports a process's metrics every ``metrics_report_interval_ms`` (10 s unless configured), so a scrape lags by
up to that much.

=============================================  ========  ================================================================
``ray_mage_requests_total``                    counter   HTTP requests by ``route`` (the route's path template) and ``status``
``ray_mage_request_seconds``                   histogram request latency (until the last byte of the response) by ``route``
``ray_mage_time_to_first_token_seconds``       histogram streamed requests: arrival to the first token event, by ``route``
``ray_mage_tokens_total``                      counter   tokens of finished requests by ``route`` and ``kind`` (prompt, completion)
``ray_mage_request_batch_rows``                histogram decode-batch rows a finished request occupied at its peak (method-dependent)
``ray_mage_engine_queued_requests``            gauge     requests waiting in an engine replica's queue
``ray_mage_engine_running_requests``           gauge     requests in an engine replica's running batch
=============================================  ========  ================================================================

The first five are recorded by the ingress (:class:`RequestMetrics` and :class:`IngressMetrics`), the gauges by
each engine replica (:class:`EngineGauges`, sampled every :data:`GAUGE_PERIOD_S`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["GAUGE_PERIOD_S", "EngineGauges", "IngressMetrics", "RequestMetrics"]

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
"""Upper bounds (seconds) of the latency and time-to-first-token histograms."""
ROW_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]
"""Upper bounds of the rows-per-request histogram (a plain row is 1; guided methods and beams use more)."""
GAUGE_PERIOD_S = 1.0
"""How often an engine replica samples its queue for the gauges."""


class IngressMetrics:
    """The ingress replica's metrics (create one per replica: ``ray.serve.metrics`` tags it)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "mage_requests", description="HTTP requests by route and status.", tag_keys=("route", "status")
        )
        self.latency = metrics.Histogram(
            "mage_request_seconds",
            description="Request latency until the last byte of the response, by route.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )
        self.ttft = metrics.Histogram(
            "mage_time_to_first_token_seconds",
            description="Streamed requests: time from arrival to the first token, by route.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )
        self.tokens = metrics.Counter(
            "mage_tokens",
            description="Tokens of finished requests by route and kind.",
            tag_keys=("route", "kind"),
        )
        self.rows = metrics.Histogram(
            "mage_request_batch_rows",
            description="Decode-batch rows a finished request occupied at its peak.",
            boundaries=ROW_BUCKETS,
            tag_keys=("route",),
        )

    def finished(self, route: str, completion: Any) -> None:
        """Count a finished request's tokens and rows (``completion``: a decode Completion, or None)."""
        if completion is None:
            return
        tags = {"route": route}
        # Ray's Counter.inc refuses 0 (ValueError): a request that failed before its prompt was encoded (the engine
        # replica died) has none, and raising here would cut the stream that reports that failure
        for kind, n in (
            ("prompt", completion.usage.prompt_tokens),
            ("completion", completion.usage.completion_tokens),
        ):
            if n > 0:
                self.tokens.inc(n, tags={**tags, "kind": kind})
        if completion.rows_used:
            self.rows.observe(completion.rows_used, tags=tags)

    def first_token(self, route: str, started: float) -> None:
        """A streamed request's first token arrived (``started``: its ``time.monotonic()`` at arrival)."""
        self.ttft.observe(time.monotonic() - started, tags={"route": route})


def route_of(scope: dict) -> str:
    """The matched route's path template (``/v1/models/{model_id:path}``), so labels stay few; ``other`` when
    no route matched."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


class RequestMetrics:
    """ASGI middleware: count every HTTP request by route and status and time it, whatever answered it (a route,
    an error handler, :class:`~mage_ray.serve.limits.BodyLimit`'s 413). It reads the app's ``state.metrics``
    (an :class:`IngressMetrics`, set by the ingress replica) and does nothing while that is unset."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
        if scope["type"] != "http" or metrics is None:
            await self.app(scope, receive, send)
            return
        t0, status = time.monotonic(), [500]
        scope.setdefault("state", {})["started"] = t0

        async def watch(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = route_of(scope)
            metrics.requests.inc(tags={"route": route, "status": str(status[0])})
            metrics.latency.observe(time.monotonic() - t0, tags={"route": route})


class EngineGauges:
    """Samples an engine replica's queue (``stats()``: ``queued``, ``active``) into two gauges every
    :data:`GAUGE_PERIOD_S`, on a daemon thread (:meth:`start`, :meth:`stop`)."""

    def __init__(self, stats: Callable[[], dict[str, Any]], period_s: float = GAUGE_PERIOD_S):
        from ray.serve import metrics

        self.stats, self.period_s = stats, period_s
        self.queued = metrics.Gauge(
            "mage_engine_queued_requests", description="Requests waiting in an engine replica's queue."
        )
        self.running = metrics.Gauge(
            "mage_engine_running_requests", description="Requests in an engine replica's running batch."
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mage-gauges", daemon=True)

    def sample(self) -> None:
        s = self.stats()
        self.queued.set(s.get("queued", 0))
        self.running.set(s.get("active", 0))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001  (metrics must never take the replica down)
                pass
            self._stop.wait(self.period_s)

    def start(self) -> EngineGauges:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
