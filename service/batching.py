"""Micro-batching: concurrent requests' texts are encoded together, off the event loop.

Each text waits in an asyncio queue; one worker task takes what is queued (after a
bounded wait of a few milliseconds for more to arrive, up to a maximum batch size) and
runs the encoder on a single dedicated thread. While one batch is being encoded the next
one fills up, so under load batches grow by themselves and the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from service.errors import NotReady

logger = logging.getLogger(__name__)

TextKind = Literal["query", "document"]
EncodeFn = Callable[[list[str], TextKind], np.ndarray]
BatchObserver = Callable[[int, float], None]


@dataclass
class _Job:
    text: str
    kind: TextKind
    future: asyncio.Future


class MicroBatcher:
    """Groups concurrent :meth:`encode` calls into encoder calls of at most ``max_batch`` texts."""

    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def pending(self) -> int:
        """Texts waiting for the encoder (not counting the batch being encoded)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-encode")
        self._worker = asyncio.create_task(self._run(), name="mrl-micro-batcher")

    async def stop(self) -> None:
        """Stop the worker; texts still queued fail with :class:`NotReady`."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            self._fail([self._queue.get_nowait()], NotReady("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def encode(self, texts: list[str], kind: TextKind) -> np.ndarray:
        """Full-dimension vectors for ``texts``, one row each, in order.

        Raises:
            NotReady: If the batcher is not running.
        """
        if self._queue is None or self._worker is None:
            raise NotReady("the encoder is not running")
        loop = asyncio.get_running_loop()
        jobs = [_Job(text, kind, loop.create_future()) for text in texts]
        for job in jobs:
            self._queue.put_nowait(job)
        rows = await asyncio.gather(*(job.future for job in jobs))
        return np.stack(rows)

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            try:
                self._drain(batch)
                if len(batch) < self._max_batch and self._max_wait_s > 0:
                    await asyncio.sleep(self._max_wait_s)
                    self._drain(batch)
                for kind in ("query", "document"):
                    jobs = [job for job in batch if job.kind == kind and not job.future.done()]
                    if jobs:
                        await self._encode_jobs(jobs, kind)
            finally:  # on cancellation (shutdown), nobody is left waiting forever
                self._fail(batch, NotReady("the service is shutting down"))

    def _drain(self, batch: list[_Job]) -> None:
        assert self._queue is not None
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())

    async def _encode_jobs(self, jobs: list[_Job], kind: TextKind) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            vectors = await loop.run_in_executor(self._executor, self._encode, [job.text for job in jobs], kind)
        except Exception as exc:  # every waiting request gets the error; the worker goes on
            logger.warning("encoding a batch of %d texts failed: %r", len(jobs), exc)
            self._fail(jobs, exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(jobs), time.perf_counter() - started)
        for job, row in zip(jobs, vectors, strict=True):
            if not job.future.done():  # the request may have been cancelled meanwhile
                job.future.set_result(row)

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)
