"""Continuous batching: an iteration-level scheduler over `engine.DecodeBatch` (Ray-free, asyncio).

Requests wait in a bounded FIFO queue. Between decode steps the scheduler admits as many of them as
there are free rows (`max_running`, over every model of the process): their prompts are prefilled
and they decode with the rows already running. A request for a LoRA adapter names its base model and
carries its `adapter`: it joins the base model's batch, where each row decodes through its own
adapter (`serving.adapters`). A row that finishes, fails, or whose client went
away (its stream was closed or cancelled) leaves at once and frees its row for the next step.

One background asyncio task owns decoding: each iteration it steps every model's batch, then lets
the admitted requests join, in a worker thread (`asyncio.to_thread`), so the event loop keeps
taking requests while the model computes. A request awaits its own queue of Deltas (`stream`: one
per step; `complete`: only the whole completion, one wake-up per request). Only that task
touches the batches, and only one iteration runs at a time. Each `Scheduler` is self-contained (no
module state): a Serve replica makes its own.

Overload: a request that finds `max_running` rows running and `max_waiting` requests waiting is
answered at once with a 503 (`code: overloaded`), the same status Ray Serve gives when its own
queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from ray_unlearn.serving.engine import DecodeBatch, Delta, GenerationRequest, LoadedModel, batch_error
from ray_unlearn.serving.schemas import APIError


def overloaded(running: int, waiting: int) -> APIError:
    """The answer to a request that finds every row busy and the queue full."""
    return APIError(503, f"the server is overloaded ({running} requests decoding, {waiting} waiting); retry later",
                    type="server_error", code="overloaded")


@dataclass(eq=False)
class _Ticket:
    """One submitted request: where its Deltas go and whether its client still wants them."""

    model: LoadedModel
    request: GenerationRequest
    whole: Delta | None = None  # set: the Deltas are folded into it and only the last one is delivered
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted: bool = False
    cancelled: bool = False

    def deliver(self, delta: Delta) -> None:
        if self.whole is not None:
            self.whole.add(delta)
            if delta.finish_reason is None and delta.error is None:
                return
            delta = self.whole
        self.deltas.put_nowait(delta)


class Scheduler:
    """Admit, decode and retire generation requests step by step (see the module docstring).

    max_running: rows decoded together at most (1 = one request at a time, unbatched).
    max_waiting: requests waiting for a row at most; one more gets a 503.
    idle_wait_s: when nothing is running, how long the first arrival waits for others to be prefilled
    with it (0 = start at once).
    """

    def __init__(self, max_running: int, max_waiting: int, idle_wait_s: float = 0.0) -> None:
        if max_running < 1 or max_waiting < 0 or idle_wait_s < 0:
            raise ValueError("Scheduler: max_running >= 1, max_waiting >= 0 and idle_wait_s >= 0 are required")
        self.max_running, self.max_waiting, self.idle_wait_s = max_running, max_waiting, idle_wait_s
        self.waiting: deque[_Ticket] = deque()
        self.batches: dict[LoadedModel, DecodeBatch] = {}
        self.running = 0  # rows running or joining
        self.counts = {"requests": 0, "steps": 0, "row_steps": 0, "largest": 0, "rejected": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def stats(self) -> dict[str, int]:
        """Counts so far: requests admitted, decode steps (forward passes over running rows), row_steps (rows
        summed over steps: row_steps / steps = mean rows per step), largest (most rows in one step),
        rejected (503s), and the rows running and requests waiting now."""
        return {**self.counts, "running": self.running, "waiting": len(self.waiting)}

    async def stream(self, model: LoadedModel, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The Deltas of `request` decoded with `model`, one per step it runs; the last has finish_reason or
        error. Closing the iterator early (or cancelling its consumer) withdraws the request."""
        async for delta in self._deltas(_Ticket(model, request)):
            yield delta

    async def complete(self, model: LoadedModel, request: GenerationRequest) -> Delta:
        """The whole completion of `request` (or its error) as one Delta, delivered once it ends (one wake-up
        of the caller instead of one per step). Cancelling the caller withdraws the request."""
        async with contextlib.aclosing(self._deltas(_Ticket(model, request, whole=Delta("")))) as deltas:
            return await anext(deltas)

    async def _deltas(self, ticket: _Ticket) -> AsyncIterator[Delta]:
        self._ensure_task()
        if self.running + len(self.waiting) >= self.max_running + self.max_waiting:
            self.counts["rejected"] += 1
            yield Delta("", error=overloaded(self.running, len(self.waiting)))
            return
        self.waiting.append(ticket)
        self._wake.set()
        try:
            while True:
                delta = await ticket.deltas.get()
                yield delta
                if delta.finish_reason is not None or delta.error is not None:
                    return
        finally:
            ticket.cancelled = True  # a no-op once it finished; else its row leaves before the next step
            if not ticket.admitted and ticket in self.waiting:
                self.waiting.remove(ticket)

    async def close(self) -> None:
        """Stop the decoding task (requests in flight get nothing more)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -------------------------------------------------- the decoding task

    def _ensure_task(self) -> None:
        """Start the decoding task in the running event loop (again, if the loop changed or the task ended)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        if self._loop is not loop:  # a new event loop: nothing of the old one can be answered
            self.waiting.clear()
            self.batches.clear()
            self.running = 0
            self._wake = asyncio.Event()
        self._loop, self._task = loop, loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self._wake.clear()
                await self._wake.wait()
                if self.idle_wait_s:
                    await asyncio.sleep(self.idle_wait_s)
            admitted = self._admit()
            work = [(batch, admitted.get(batch, [])) for batch in self.batches.values()]
            try:
                deltas, rows = await asyncio.to_thread(self._iterate, work)
            except Exception as e:  # noqa: BLE001 - a fault of the scheduler itself: fail what is in flight
                deltas, rows = self._fail_all(work, e), []
            self._deliver(deltas, rows)

    def _batch_for(self, ticket: _Ticket) -> DecodeBatch | None:
        """The running batch of the ticket's model (made on first use); None, with the ticket answered, when
        the model cannot decode at all."""
        batch = self.batches.get(ticket.model)
        if batch is None:
            m = ticket.model
            try:
                batch = self.batches[m] = DecodeBatch(m.model, m.tokenizer, m.stop_ids)
            except Exception as e:  # noqa: BLE001 - e.g. a model without a config
                ticket.deltas.put_nowait(Delta("", error=batch_error(e)))
        return batch

    def _admit(self) -> dict[DecodeBatch, list[_Ticket]]:
        """Take waiting requests, oldest first, into free rows; those whose model's batch cannot take rows
        now stay waiting (see `DecodeBatch.accepts_joins`)."""
        free, admitted, held = self.max_running - self.running, {}, []
        while self.waiting and free > 0:
            ticket = self.waiting.popleft()
            batch = self._batch_for(ticket)
            if batch is None:
                continue
            if not batch.accepts_joins:
                held.append(ticket)
                continue
            ticket.admitted = True
            admitted.setdefault(batch, []).append(ticket)
            free -= 1
        self.waiting.extendleft(reversed(held))
        n = sum(len(t) for t in admitted.values())
        self.counts["requests"] += n
        self.running += n  # joining: counted as running from now on (recounted after the iteration)
        return admitted

    @staticmethod
    def _iterate(work: list[tuple[DecodeBatch, list[_Ticket]]]) -> tuple[dict[_Ticket, Delta], list[int]]:
        """One iteration, in the worker thread: per model, withdrawn rows leave, the running rows take a step,
        then the admitted requests join. Returns the Deltas and the rows of each step taken."""
        deltas: dict[_Ticket, Delta] = {}
        rows = []
        for batch, joining in work:
            batch.leave([t for t in batch.keys if t.cancelled])
            if len(batch):
                rows.append(len(batch))
                deltas.update(batch.step())
            live = [t for t in joining if not t.cancelled]
            if live:
                deltas.update(batch.join([(t, t.request) for t in live]))
        return deltas, rows

    def _fail_all(self, work: list[tuple[DecodeBatch, list[_Ticket]]], exc: Exception) -> dict[_Ticket, Delta]:
        err = APIError(500, f"the decoding loop failed ({type(exc).__name__}: {exc}); retry", type="server_error",
                       code="generation_failed")
        tickets = [t for batch, joining in work for t in batch.keys + joining]
        self.batches.clear()
        return {t: Delta("", error=err) for t in tickets}

    def _deliver(self, deltas: dict[_Ticket, Delta], rows: list[int]) -> None:
        for ticket, delta in deltas.items():
            if not ticket.cancelled:
                ticket.deliver(delta)
        for model, batch in list(self.batches.items()):
            if not len(batch):
                del self.batches[model]  # an idle model's batch goes: the model is not kept alive by it
        self.running = sum(len(b) for b in self.batches.values())
        c = self.counts
        c["steps"], c["row_steps"] = c["steps"] + len(rows), c["row_steps"] + sum(rows)
        c["largest"] = max([c["largest"], *rows])

