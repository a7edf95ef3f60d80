"""A submitted request's handle: its token events arrive on an asyncio queue; closing its stream cancels it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from mage_ray.decode import Completion, Request, TokenEvent

CANCELLED = "cancelled"
COUNTERS = ("requests", "completed", "cancelled", "errors", "tokens", "batches", "steps", "admitted")


@dataclass(eq=False)
class Ticket:
    """One submitted request: its events arrive on ``queue`` (TokenEvent; the last one has finished=True)."""

    request: Request
    interactive: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    """Set by :meth:`cancel` (from the event loop); read by the engine thread between steps."""
    finished: bool = False
    submitted: float = field(default_factory=time.monotonic)
    completion: Completion | None = None

    def cancel(self) -> None:
        """Stop decoding this request (no-op once it finished)."""
        self.cancelled = True

    async def next(self) -> TokenEvent:
        return await self.queue.get()

    async def next_batch(self) -> list[TokenEvent]:
        """The next event and every event already queued behind it (a consumer that fell behind catches up in
        one message instead of one per token)."""
        out = [await self.queue.get()]
        while not out[-1].finished and not self.queue.empty():
            out.append(self.queue.get_nowait())
        return out

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Yield events until the finishing one; cancel the request if the consumer stops early."""
        try:
            while True:
                ev = await self.queue.get()
                yield ev
                if ev.finished:
                    return
        finally:
            if not self.finished:
                self.cancel()

    async def result(self) -> Completion:
        async for ev in self.events():
            if ev.finished:
                return ev.completion
        raise RuntimeError("stream ended without a final event")  # pragma: no cover


def error_event(index: int, msg: str) -> TokenEvent:
    """The final event of a request that failed (or was dropped at shutdown) with ``msg``."""
    return TokenEvent(
        index, "", True, "error", Completion(text="", token_ids=[], finish_reason="error", error=msg)
    )
