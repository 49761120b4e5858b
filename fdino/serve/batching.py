"""Micro-batching: requests that arrive within a few milliseconds share one forward pass.

`BatchQueue.submit(x)` puts one input ``[3, S, S]`` on an asyncio queue and awaits its row of the
result. A single worker task takes the first waiting item, then collects more until
``max_batch`` items or ``max_wait_ms`` after the first one, stacks them (grouped by shape) and runs
``fn(batch [B, 3, S, S]) -> [B, D]`` on the model thread (an executor), so the event loop keeps
accepting requests during the forward. Under load the batches fill up; a lone request waits at
most ``max_wait_ms`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor

import torch


class BatchQueue:
    """Group concurrent single-item requests into batched calls of ``fn``."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        *,
        executor: Executor,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid: allowed an integer >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} is invalid: allowed a number >= 0")
        self.fn, self.executor = fn, executor
        self.max_batch, self.max_wait = int(max_batch), float(max_wait_ms) / 1000.0
        self.batches = 0
        """Forward calls made so far."""
        self.items = 0
        """Items answered so far."""
        self.largest = 0
        """Largest batch so far."""
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure_worker(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._task is None or self._task.done():
            # First use, or a new event loop (e.g. a second TestClient): bind a fresh queue to it.
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._worker(self._queue), name="fdino-batch-queue")
        return self._queue

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """The row of ``fn(stack([..., x, ...]))`` belonging to ``x``."""
        queue = self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        await queue.put((x, future))
        return await future

    async def _collect(self, queue: asyncio.Queue) -> list:
        loop = asyncio.get_running_loop()
        items = [await queue.get()]
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            if not queue.empty():  # one consumer: a non-empty queue cannot empty before get_nowait
                items.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                items.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:  # (an alias of TimeoutError from 3.11)
                break
        return items

    async def _worker(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [(x, f) for x, f in await self._collect(queue) if not f.done()]  # drop cancelled requests
            groups: dict[tuple[int, ...], list] = {}
            for x, f in items:
                groups.setdefault(tuple(x.shape), []).append((x, f))
            for group in groups.values():
                batch = torch.stack([x for x, _ in group])
                try:
                    out = await loop.run_in_executor(self.executor, self.fn, batch)
                except Exception as e:  # noqa: BLE001 - delivered to every waiting request
                    for _, f in group:
                        if not f.done():
                            f.set_exception(e)
                    continue
                self.batches += 1
                self.items += len(group)
                self.largest = max(self.largest, len(group))
                for (_, f), row in zip(group, out):
                    if not f.done():
                        f.set_result(row)

    async def aclose(self) -> None:
        """Stop the worker (pending requests are cancelled)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # its outcome no longer matters
                await self._task
            self._task = None

    def stats(self) -> dict[str, int]:
        return {"batches": self.batches, "items": self.items, "largest_batch": self.largest}


__all__ = ["BatchQueue"]
