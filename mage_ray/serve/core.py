"""The serving core: one decode engine, a request queue, micro-batching, streaming, grids. No Ray needed.

:class:`Generator` owns ONE :class:`mage_ray.decode.Engine` (one copy of the base weights) and turns
concurrent requests into engine batches: requests with different preferences and methods share a batch, each
row with its own LoRA coefficients. The Ray Serve deployment (:mod:`mage_ray.serve.app`) is a
thin shell around it; tests drive it directly with asyncio.

Batching (the semantics of Serve's ``@serve.batch``, kept in this class so it can also cancel requests)::

    submit(request) -> Ticket                 queued (interactive requests ahead of grid rows)
    scheduler: wait for a request, then up to batch_wait_timeout_s for more, take <= max_batch_size
               requests within the token budget, run engine.stream(batch) in a worker thread, hand each
               step's TokenEvents to the tickets' asyncio queues (the event loop never blocks on the model)
    the next batch forms from whatever queued meanwhile, and starts as soon as the engine is free

Admission by a token budget (``serve.max_batch_tokens``): a request costs its KV-cache rows x (prompt + max
tokens) (``_Job.kv_tokens``; mage-i's 5 rows cost 5x what one bs row costs), and requests join in queue order
while the batch's sum fits, so the replica's KV memory is bounded by configuration whatever the mix of methods.
The queue head is never skipped for a smaller request behind it (no starvation); one larger than the whole
budget runs alone. ``max_batch_size`` caps the number of requests besides.

Why not ``@serve.batch`` itself: a Serve batch handler cannot tell which of its requests' clients went
away, and the engine would keep decoding a disconnected stream to max_tokens. Here ``Ticket.cancel()`` (called
when a stream is closed) makes the engine finish that request at its next step (``finish_reason
"cancelled"``, through ``Engine.stream(cancel=...)``) and frees its rows; a ticket cancelled while queued never
runs. :attr:`Generator.stats` counts cancellations, admissions and decoded tokens.

Two batching modes (``serve.batching``):

- ``continuous`` (default): while a batch runs, the engine asks between decode steps for queued requests
  (``Engine.stream(requests, admit=...)``); the scheduler hands over what fits beside the live requests
  (``max_batch_size`` requests, ``max_batch_tokens`` rows x tokens), interactive first. A request that arrives
  mid-batch starts at the next step instead of waiting for the whole batch to finish.
- ``micro``: the batch is fixed when it starts; later arrivals wait for it to finish (``@serve.batch``
  semantics).

``bench/bench_serve.py --batching micro,continuous`` measures both in one run (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mage_ray.bundle import load_bundle
from mage_ray.config import Config, ServeConfig
from mage_ray.config.checks import ConfigError
from mage_ray.decode import (
    Completion,
    Engine,
    Request,
    RequestError,
    TokenEvent,
    decode_defaults,
    parts_from_bundle,
)
from mage_ray.decode.request import _Job
from mage_ray.guidance import PlanArgs, make_plan, method_names
from mage_ray.report import prompt_text
from mage_ray.serve.schema import ApiError, Limits
from mage_ray.serve.ticket import CANCELLED, COUNTERS, Ticket, error_event
from mage_ray.storage import join, mtime

__all__ = ["Generator", "Ticket", "decode_defaults"]

log = logging.getLogger(__name__)


class Generator:
    """Micro-batching front of one decode engine (see the module docstring). Use from one asyncio loop."""

    def __init__(
        self,
        engine: Engine,
        serve_cfg: ServeConfig | None = None,
        *,
        reward_device: str = "cpu",
        stuck_after_s: float = 300.0,
        name: str = "mage",
        created: int = 0,
    ):
        self.engine = engine
        sc = serve_cfg or ServeConfig()
        self.serve_cfg = sc
        self.max_batch_size = sc.max_batch_size
        self.max_batch_tokens = sc.max_batch_tokens
        self.batch_wait_timeout_s = sc.batch_wait_timeout_s
        self.continuous = sc.batching == "continuous"
        if self.continuous and not engine.can_admit:
            log.warning(
                "serve.batching=continuous needs full-attention KV caches; %s has sliding-window layers: "
                "using micro-batching",
                type(engine.model).__name__,
            )
            self.continuous = False
        self.stuck_after_s = stuck_after_s
        self.reward_device = reward_device
        self.name = name
        """The model id of /v1/models and OpenAI responses (``serve.model_name``)."""
        self.created = created
        """Unix time the bundle was written (``created`` of /v1/models)."""
        self.methods = tuple(self._served_methods(sc.methods))
        self.limits = Limits(
            n_objectives=engine.layout.n,
            methods=self.methods,
            max_tokens_limit=engine.defaults.max_tokens_limit,
            max_prompts_per_grid=sc.max_prompts_per_grid,
            max_grid_points=sc.max_grid_points,
            objectives=tuple(engine.objectives),
        )
        self._tok = copy.deepcopy(
            engine.tokenizer
        )  # used only on the aux thread (fast tokenizers are not re-entrant)
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="mage-engine")
        self._aux_thread = ThreadPoolExecutor(1, thread_name_prefix="mage-aux")
        self._interactive: collections.deque[Ticket] = collections.deque()
        self._bulk: collections.deque[Ticket] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._arrival: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._running: list[Ticket] | None = None
        self._budget_used = 0  # rows x tokens reserved by the running batch's unfinished requests
        self._last_step = time.monotonic()
        self._closed = False
        self._objectives = None
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))

    @classmethod
    def from_bundle(
        cls, bundle_path: str | Path, cfg: Config, overrides: Sequence[str] = (), device: str | None = None
    ) -> Generator:
        """Load the bundle into an :class:`~mage_ray.decode.Engine` on ``device`` (default: cuda when the replica
        holds GPUs, ``serve.num_gpus`` > 0, else cpu; a cuda engine in a process without a GPU is refused by
        :func:`mage_ray.devices.place`)."""
        if device is None:
            device = "cuda" if cfg.serve.num_gpus > 0 else "cpu"
        bundle = load_bundle(bundle_path)
        parts = parts_from_bundle(bundle, device=device, methods=cfg.serve.methods)  # only what is served
        engine = Engine(parts, decode_defaults(cfg, bundle, overrides), device)
        created = int(mtime(join(bundle.location, "bundle.json")))
        return cls(
            engine,
            cfg.serve,
            reward_device=cfg.task.reward_device,
            name=cfg.serve.model_name,
            created=created,
        )

    # ----- introspection -----

    def _served_methods(self, wanted: Sequence[str] | None) -> list[str]:
        """``wanted`` (``serve.methods``; None: all this engine can run); ConfigError naming serve.methods when the
        bundle cannot serve one of them or the default method is not among them."""
        available = self._available_methods()
        if wanted is None:
            return available
        missing = [m for m in wanted if m not in available]
        if missing:
            raise ConfigError(
                f"config field 'serve.methods' = {list(wanted)!r} is invalid: this bundle cannot serve {missing} "
                f"(it can serve {available})"
            )
        if self.engine.defaults.method not in wanted:
            raise ConfigError(
                f"config field 'serve.methods' = {list(wanted)!r} is invalid: it leaves out the default method "
                f"{self.engine.defaults.method!r} (add it, or set decode.method to one of them)"
            )
        return [m for m in available if m in wanted]

    def _available_methods(self) -> list[str]:
        """Registered methods this engine's adapters can run (probed with the uniform preference)."""
        n = self.engine.layout.n
        mu = np.full(n, 1.0 / n)
        ok = []
        for m in method_names():
            try:
                make_plan(m, self.engine.layout, mu, PlanArgs(0.0, "bone", "probe"), 1.0)
            except (ValueError, NotImplementedError):
                continue
            ok.append(m)
        return ok

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/objectives`` returns: objective names and the decoding defaults."""
        d = self.engine.defaults
        return {
            "objectives": list(self.engine.objectives),
            "n_objectives": self.engine.layout.n,
            "methods": list(self.methods),
            "defaults": {
                "method": d.method,
                "gamma": d.gamma,
                "method_gammas": dict(d.method_gammas),
                "alpha": d.alpha,
                "beta": self.engine.layout.beta,
                "max_tokens": d.max_new_tokens,
                "do_sample": d.do_sample,
            },
            "limits": {
                "max_tokens": d.max_tokens_limit,
                "max_context": self.engine.max_context,
                "max_prompts_per_grid": self.limits.max_prompts_per_grid,
                "max_grid_points": self.limits.max_grid_points,
            },
            "model": self.name,
        }

    def stats(self) -> dict[str, Any]:
        """Counters (requests, completed, cancelled, errors, tokens, batches, steps, admitted: requests that
        joined a running batch), queue state, and the running batch's KV cache: ``kv_rows`` x ``kv_columns``
        after the last decode step (0 x 0 when idle) and ``kv_budget_used``, the rows x tokens its requests
        reserved (``serve.max_batch_tokens`` bounds it)."""
        running = self._running or []
        rows, columns = self.engine.kv_shape
        return {
            **self.counters,
            "queued": len(self._interactive) + len(self._bulk),
            "active": sum(not t.finished for t in running),
            "kv_rows": rows,
            "kv_columns": columns,
            "kv_budget_used": self._budget_used,
        }

    def health(self) -> tuple[bool, str]:
        """(ok, reason): the engine is loaded, the scheduler alive, and a running batch is not stuck."""
        if self._closed:
            return False, "shutting down"
        if self._task is not None and self._task.done():
            exc = None if self._task.cancelled() else self._task.exception()
            return False, f"batch scheduler stopped: {exc!r}"
        if self._running is not None and time.monotonic() - self._last_step > self.stuck_after_s:
            return False, f"no decode step for {time.monotonic() - self._last_step:.0f}s (engine stuck)"
        return True, "ok"

    # ----- validation that needs the model -----

    def _check_sync(self, req: Request, field_name: str) -> None:
        """Normalise ``req`` with the engine's one normaliser (:meth:`Engine.prepare`) and keep the job in
        ``req.prepared``, so the engine runs it without validating or tokenising again; its errors become 400s
        that name the API field (``field_name`` for the prompt, ``method`` for what the method cannot serve, or
        for a method this server does not serve)."""
        method = req.method if req.method is not None else self.engine.defaults.method
        if isinstance(method, str) and method not in self.methods:
            raise ApiError(
                400, f"method = {method!r} is not available: this server runs {list(self.methods)}", "method"
            )
        try:
            req.prepared = self.engine.prepare(req, tokenizer=self._tok)
        except RequestError as e:
            if "max_context" in e.info:
                raise ApiError(
                    400,
                    f"{field_name} ({e.info['prompt_tokens']} tokens) + max_tokens ({e.info['max_new_tokens']}) "
                    f"exceeds the model context of {e.info['max_context']} tokens: shorten the prompt or lower "
                    "max_tokens",
                    field_name,
                ) from None
            raise ApiError(400, str(e), field_name if e.field == "prompt" else e.field) from None

    async def check(self, req: Request, field_name: str = "prompt") -> None:
        """Raise ApiError 400 if the method cannot run on this bundle or the prompt does not fit the context."""
        await asyncio.get_running_loop().run_in_executor(self._aux_thread, self._check_sync, req, field_name)

    # ----- queue and scheduler -----

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._task is not None and not self._task.done() and not self._loop.is_closed():
                raise RuntimeError("Generator is already serving another event loop")
            self._loop, self._arrival = loop, asyncio.Event()
            self._task = loop.create_task(self._schedule(), name="mage-scheduler")
        return loop

    def submit(self, req: Request, interactive: bool = True) -> Ticket:
        """Queue one request; its events arrive on the returned ticket. Raises ApiError 503 when closed."""
        if self._closed:
            raise ApiError(503, "server is shutting down", None, "unavailable")
        self._ensure_loop()
        t = Ticket(req, interactive)
        (self._interactive if interactive else self._bulk).append(t)
        self.counters["requests"] += 1
        self._arrival.set()
        return t

    def _pending(self) -> int:
        return len(self._interactive) + len(self._bulk)

    def _cost(self, req: Request) -> int:
        """Rows x tokens a queued request reserves (``_Job.kv_tokens``). A request that was not checked
        (:meth:`check`; every Serve route checks) counts as one row of the whole context."""
        job = req.prepared
        return job.kv_tokens if isinstance(job, _Job) else self.engine.max_context

    def _take(
        self, room: int | None = None, budget: int | None = None, empty: bool = True
    ) -> tuple[list[Ticket], list[int]]:
        """Loop thread: pop queued tickets, interactive first and in order, while there is ``room`` (requests,
        default max_batch_size) and their costs fit ``budget`` (rows x tokens, default max_batch_tokens). The
        queue head is not skipped for a smaller request behind it; with ``empty`` (nothing else running) the
        first ticket is taken whatever its cost. Returns (tickets, their costs)."""
        room = self.max_batch_size if room is None else room
        budget = self.max_batch_tokens if budget is None else budget
        batch: list[Ticket] = []
        costs: list[int] = []
        for q in (self._interactive, self._bulk):
            while q and len(batch) < room:
                t = q[0]
                if t.cancelled:  # never started: finish it here
                    q.popleft()
                    self._finish(t, TokenEvent(0, "", True, CANCELLED, Completion("", [], CANCELLED)))
                    continue
                cost = self._cost(t.request)
                if cost > budget and not (empty and not batch):
                    return batch, costs  # the head waits for room (nothing behind it overtakes it)
                q.popleft()
                batch.append(t)
                costs.append(cost)
                budget -= cost
        return batch, costs

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._arrival.wait()
            if not self._pending():
                self._arrival.clear()
                continue
            deadline = loop.time() + self.batch_wait_timeout_s
            while self._pending() < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), left)
                except TimeoutError:
                    break
            batch, costs = self._take()
            if not self._pending():
                self._arrival.clear()
            if not batch:
                continue
            self._running = batch
            self._last_step = time.monotonic()
            try:
                await loop.run_in_executor(self._engine_thread, self._run_batch, batch, costs, loop)
            except Exception:  # noqa: BLE001  (never let one batch kill the scheduler)
                log.exception("decode batch failed")
            finally:
                self._running = None
                self._budget_used = 0

    def _finish(self, t: Ticket, ev: TokenEvent) -> None:
        """Runs on the loop thread: deliver the final event of a ticket and count it."""
        if t.finished:
            return
        t.finished = True
        t.completion = ev.completion
        c = ev.completion
        if c is not None:
            self.counters["tokens"] += c.usage.completion_tokens
        if ev.finish_reason == CANCELLED:
            self.counters["cancelled"] += 1
        elif ev.finish_reason == "error":
            self.counters["errors"] += 1
        else:
            self.counters["completed"] += 1
        t.queue.put_nowait(ev)

    def _deliver(self, t: Ticket, ev: TokenEvent) -> None:
        if ev.finished:
            self._finish(t, ev)
        elif not t.finished:
            t.queue.put_nowait(ev)

    def _admit(
        self, batch: list[Ticket], done: list[bool], costs: list[int], loop: asyncio.AbstractEventLoop
    ) -> list[Request]:
        """Engine thread, between decode steps (continuous batching): move queued tickets into the running batch,
        as many as fit beside the live ones (``max_batch_size`` requests, ``max_batch_tokens`` rows x tokens).

        The deques belong to the loop thread, so the hand-over runs there (``_take`` also finishes tickets
        cancelled while queued); the engine thread waits for it only when something is queued and the batch has
        room. New tickets get the next event indices, which is the order the engine numbers admitted requests.
        """
        live = len(batch) - sum(done)
        room = self.max_batch_size - live
        used = sum(c for c, d in zip(costs, done) if not d)
        self._budget_used = used
        if room <= 0 or self._closed or not self._pending() or not loop.is_running():
            return []
        if live and used >= self.max_batch_tokens:
            return []
        fut: concurrent.futures.Future[tuple[list[Ticket], list[int]]] = concurrent.futures.Future()

        def take() -> None:
            try:
                fut.set_result(self._take(room, self.max_batch_tokens - used, empty=live == 0))
            except BaseException as e:  # noqa: BLE001  (hand any failure to the waiting engine thread)
                fut.set_exception(e)

        try:
            loop.call_soon_threadsafe(take)
            new, new_costs = fut.result(timeout=10)
        except Exception:  # noqa: BLE001  (loop closed or stopped: admit nothing, the batch goes on)
            return []
        if not new:
            return []
        batch.extend(new)
        done.extend([False] * len(new))
        costs.extend(new_costs)
        self._budget_used = used + sum(new_costs)
        self.counters["admitted"] += len(new)
        return [t.request for t in new]

    def _run_batch(self, batch: list[Ticket], costs: list[int], loop: asyncio.AbstractEventLoop) -> None:
        """Engine thread: decode one batch (growing by admission in continuous mode), forwarding every step's
        events to the loop. ``costs``: the rows x tokens each ticket reserved (:meth:`_take`)."""
        done = [False] * len(batch)
        self._budget_used = sum(costs)
        admit = (lambda: self._admit(batch, done, costs, loop)) if self.continuous else None
        try:
            self.counters["batches"] += 1
            for events in self.engine.stream(
                [t.request for t in batch], admit=admit, cancel=lambda i: batch[i].cancelled
            ):
                self._last_step = time.monotonic()
                self.counters["steps"] += 1
                for ev in events:
                    done[ev.index] = done[ev.index] or ev.finished
                    loop.call_soon_threadsafe(self._deliver, batch[ev.index], ev)
                self._budget_used = sum(c for c, d in zip(costs, done) if not d)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory: fail this batch, keep serving)
            log.exception("decode batch of %d failed", len(batch))
            for i, t in enumerate(batch):
                if not done[i]:
                    loop.call_soon_threadsafe(self._deliver, t, error_event(i, f"decoding failed: {e}"))

    # ----- convenience API -----

    async def generate(self, req: Request) -> Completion:
        """Decode one request to completion (batched with whatever else is queued)."""
        return await self.submit(req).result()

    async def stream(self, req: Request) -> AsyncIterator[TokenEvent]:
        """Events of one request; closing the iterator early cancels the request."""
        async for ev in self.submit(req).events():
            yield ev

    def _prepare_quietly(self, reqs: Sequence[Request]) -> None:
        """Aux thread: normalise the requests that were not checked, so that the scheduler knows what they cost
        and the engine thread does not tokenise them; a refused one stays unprepared (the engine reports it)."""
        for r in reqs:
            if r.prepared is None:
                try:
                    r.prepared = self.engine.prepare(r, tokenizer=self._tok)
                except (RequestError, ValueError, NotImplementedError):
                    pass

    async def generate_many(self, reqs: Sequence[Request], interactive: bool = False) -> list[Completion]:
        """Decode many requests (queued behind interactive ones unless ``interactive``); results in order."""
        await asyncio.get_running_loop().run_in_executor(self._aux_thread, self._prepare_quietly, reqs)
        tickets = [self.submit(r, interactive) for r in reqs]
        try:
            return list(await asyncio.gather(*(t.result() for t in tickets)))
        finally:
            for t in tickets:
                if not t.finished:
                    t.cancel()

    # ----- grids -----

    def _load_objectives(self):
        if self._objectives is None:
            from mage_ray.tasks.objectives import get_objective

            self._objectives = [get_objective(n, device=self.reward_device) for n in self.engine.objectives]
        return self._objectives

    def _scorers(self):
        """The bundle's objectives; ApiError 400 naming ``score`` when they cannot be loaded here."""
        try:
            return self._load_objectives()
        except Exception as e:  # noqa: BLE001  (unknown objective, reward model not available offline)
            raise ApiError(
                400, f"score: the bundle's objectives cannot be loaded here: {e}", "score"
            ) from None

    def _score_sync(self, prompts: list[str], texts: list[str]) -> np.ndarray:
        from mage_ray.tasks.objectives import score

        return score(self._scorers(), prompts, texts)

    async def load_scorers(self) -> None:
        """Load the bundle's objectives now (ApiError naming ``score`` if they cannot be), so that a streamed
        request asking for scores is refused before its stream opens."""
        await asyncio.get_running_loop().run_in_executor(self._aux_thread, self._scorers)

    async def score(self, prompts: list[str], texts: list[str]) -> np.ndarray:
        """(N, n) scores of the bundle's objectives (loaded on first use)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._aux_thread, self._score_sync, prompts, texts
        )

    async def score_completion(self, req: Request, text: str) -> list[float | None]:
        """The per-objective scores (bundle order; None where not finite) of one completion ``text`` of ``req``,
        scored against its prompt as the grid scores its texts."""
        s = await self.score([prompt_text(req.prompt)], [text])  # (1, n)
        return [float(v) if np.isfinite(v) else None for v in s[0]]

    async def grid(
        self, points: np.ndarray, prompts: list[Any], reqs: list[Request], score: bool = False
    ) -> dict:
        """Decode ``reqs`` (point-major: request p * len(prompts) + i) and summarise per preference point.

        With ``score`` each text is scored by the bundle's objectives; per point the mean reward over the prompts
        that decoded without error, and ``front[p]`` = no other point's mean reward vector dominates it. Every
        point also says which texts the quality gate flags degenerate (``degenerate``, None where decoding
        failed) and the fraction flagged among the decoded ones (``degenerate_fraction``).
        """
        from mage_ray.grid import grid_points_summary

        for k, r in enumerate(reqs[: len(prompts)]):  # every point shares the prompts: check them once
            await self.check(r, f"prompts[{k}]")
        comps = await self.generate_many(reqs)
        m = len(prompts)
        texts = [prompt_text(prompts[k % m]) for k in range(len(comps))]  # the prompt of every completion
        scores = None
        if score:
            ok = [k for k, c in enumerate(comps) if c.finish_reason != "error"]
            scores = np.full((len(comps), self.engine.layout.n), np.nan)  # (P * m, n)
            if ok:
                scores[ok] = await self.score([texts[k] for k in ok], [comps[k].text for k in ok])
        out_points, front = grid_points_summary(points, texts, comps, scores)
        d = self.engine.defaults
        tokens = sum(c.usage.completion_tokens for c in comps)
        return {
            "objectives": list(self.engine.objectives),
            "method": reqs[0].method or d.method,
            "n_prompts": m,
            "points": out_points,
            "front": front,
            "usage": {"completion_tokens": tokens, "requests": len(comps)},
        }

    # ----- shutdown -----

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running (at most ``timeout_s``); True if drained."""
        end = time.monotonic() + timeout_s
        while (self._pending() or self._running) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return not (self._pending() or self._running)

    def close(self) -> None:
        """Refuse new requests, cancel queued and running ones, stop the scheduler and threads."""
        self._closed = True
        for q in (self._interactive, self._bulk):
            while q:
                t = q.popleft()
                t.cancel()
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.call_soon_threadsafe(self._finish, t, error_event(0, "server shut down"))
        for t in self._running or []:
            t.cancel()
        if self._task is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._engine_thread.shutdown(wait=False, cancel_futures=True)
        self._aux_thread.shutdown(wait=False, cancel_futures=True)
