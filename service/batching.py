"""Micro-batching: concurrent requests' texts are encoded together, off the event loop.

Each text waits in an asyncio queue; one worker task takes what is queued, up to a maximum
batch size, and runs the encoder on a single dedicated thread. While one batch is being
encoded the next one fills up, so under load batches grow by themselves (continuous
batching, as text-embeddings-inference does) and the event loop never blocks. By default
nothing waits for more texts to arrive: a request that finds the encoder idle is encoded at
once. An optional wait (``max_wait_s``) trades that latency for larger batches.

Scheduling is fair, so that no request waits behind another's many long texts: queries go
before documents; a batch takes one text from each waiting request in turn (round robin),
so a one-query search gets into the very next batch however many texts an embedding request
queued before it; and a batch stops at ``max_batch`` texts or at ``max_tokens`` estimated
tokens, so that one encoder call, which a query may have to wait for, stays short.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np

from service.errors import NotReady

logger = logging.getLogger(__name__)

TextKind = Literal["query", "document"]
# Vectors, one row per text; or (vectors, token counts per text) from an encoder that counts as it tokenizes.
EncodeFn = Callable[[list[str], TextKind], "np.ndarray | tuple[np.ndarray, list[int]]"]
BatchObserver = Callable[[int, float], None]
TextCost = Callable[[str], int]  # estimated tokens of a text, for the per-batch token budget
T = TypeVar("T")


@dataclass
class _Job:
    text: str
    kind: TextKind
    future: asyncio.Future
    request: int  # jobs of one encode() call share it, so a failure is kept to its own request


class EncoderFault(RuntimeError):
    """The encoder broke its contract (e.g. returned another number of rows than texts)."""


class MicroBatcher:
    """Groups concurrent :meth:`encode` calls into encoder calls of at most ``max_batch`` texts.

    The worker survives any exception of the encoder or of ``on_batch``. When a batch fails,
    each request in it is encoded again on its own, so only the request whose text cannot be
    encoded gets the error. If the worker task ends anyway, :attr:`alive` turns false and
    every request gets :class:`NotReady` (the service answers 503, ``/readyz`` fails).
    """

    def __init__(
        self,
        encode: EncodeFn,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
        on_batch: BatchObserver | None = None,
        max_tokens: int | None = None,
        cost: TextCost | None = None,
    ) -> None:
        self._encode = encode
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._max_tokens = max_tokens
        self._cost = cost or (lambda text: 1)
        # Waiting texts by request, in arrival order, one queue per kind (queries go first).
        self._waiting: dict[TextKind, dict[int, deque[_Job]]] = {"query": {}, "document": {}}
        self._count = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._requests = itertools.count()

    @property
    def pending(self) -> int:
        """Texts waiting for the encoder (not counting the batch being encoded)."""
        return self._count

    @property
    def alive(self) -> bool:
        """True while the worker task runs."""
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker task on the running event loop."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrl-encode")
        self._worker = asyncio.create_task(self._run(), name="mrl-micro-batcher")
        self._worker.add_done_callback(self._worker_ended)

    async def stop(self) -> None:
        """Stop the worker; texts still queued fail with :class:`NotReady`."""
        if self._worker is not None:
            worker, self._worker = self._worker, None
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._fail_queued(NotReady("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def encode(self, texts: list[str], kind: TextKind) -> np.ndarray:
        """Full-dimension vectors for ``texts``, one row each, in order.

        Raises:
            NotReady: If the batcher is not running (not started, stopped, or its worker ended).
        """
        vectors, _ = await self.encode_counted(texts, kind)
        return vectors

    async def encode_counted(self, texts: list[str], kind: TextKind) -> tuple[np.ndarray, int | None]:
        """Like :meth:`encode`, with the number of tokens the encoder made of ``texts`` (None if it does not say).

        Raises:
            NotReady: If the batcher is not running (not started, stopped, or its worker ended).
        """
        if self._arrived is None or not self.alive:
            raise NotReady("the encoder is not running; the server log says why")
        loop = asyncio.get_running_loop()
        request = next(self._requests)
        jobs = [_Job(text, kind, loop.create_future(), request) for text in texts]
        self._waiting[kind][request] = deque(jobs)
        self._count += len(jobs)
        self._arrived.set()
        results = await asyncio.gather(*(job.future for job in jobs))
        counts = [count for _, count in results]
        return np.stack([row for row, _ in results]), None if None in counts else sum(counts)

    async def run_on_encoder_thread(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` on the encoder's own thread, between batches.

        For work that touches the encoder's state, such as its tokenizer, which must not be used
        from two threads at once.
        """
        if self._executor is None or not self.alive:
            raise NotReady("the encoder is not running; the server log says why")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._count:
                self._arrived.clear()
                await self._arrived.wait()
            batch: list[_Job] = []
            try:
                if self._max_wait_s > 0 and self._count < self._max_batch:
                    await asyncio.sleep(self._max_wait_s)
                batch = self._next_batch()
                jobs = [job for job in batch if not job.future.done()]  # not those of cancelled requests
                if jobs:
                    await self._encode_jobs(jobs, jobs[0].kind)
            except Exception as exc:  # a bug of ours: this batch fails, the worker goes on
                logger.exception("the micro-batcher failed a batch of %d texts", len(batch))
                self._fail(batch, exc)
            finally:  # on cancellation (shutdown), nobody is left waiting forever
                self._fail(batch, NotReady("the service is shutting down"))

    def _next_batch(self) -> list[_Job]:
        """Texts of one kind (queries first), one from each waiting request in turn, within the limits."""
        kind: TextKind = "query" if self._waiting["query"] else "document"
        waiting = self._waiting[kind]
        batch: list[_Job] = []
        tokens = 0
        while waiting and len(batch) < self._max_batch:
            request = next(iter(waiting))  # the request whose turn it is
            jobs = waiting[request]
            cost = self._cost(jobs[0].text)
            if batch and self._max_tokens is not None and tokens + cost > self._max_tokens:
                break  # over budget: its turn comes first in the next batch
            batch.append(jobs.popleft())
            tokens += cost
            self._count -= 1
            del waiting[request]
            if jobs:
                waiting[request] = jobs  # to the back of the line
        return batch

    async def _encode_jobs(self, jobs: list[_Job], kind: TextKind) -> None:
        started = time.perf_counter()
        try:
            vectors = await self._encode_checked(jobs, kind)
        except Exception as exc:
            requests = sorted({job.request for job in jobs})
            if len(requests) == 1:
                logger.warning("encoding %d texts of one request failed: %r", len(jobs), exc)
                self._fail(jobs, exc)
            else:  # find the request that fails; its neighbours are answered
                logger.warning("a batch of %d requests failed (%r); encoding each on its own", len(requests), exc)
                for request in requests:
                    await self._encode_jobs([job for job in jobs if job.request == request], kind)
            return
        vectors, counts = vectors
        self._observe(len(jobs), time.perf_counter() - started)
        for job, row, count in zip(jobs, vectors, counts, strict=True):
            if not job.future.done():  # the request may have been cancelled meanwhile
                job.future.set_result((row, count))

    async def _encode_checked(self, jobs: list[_Job], kind: TextKind) -> tuple[np.ndarray, list[int | None]]:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._encode, [job.text for job in jobs], kind)
        vectors, counts = result if isinstance(result, tuple) else (result, [None] * len(jobs))
        if len(vectors) != len(jobs):
            raise EncoderFault(f"the encoder returned {len(vectors)} rows for {len(jobs)} texts")
        if len(counts) != len(jobs):
            raise EncoderFault(f"the encoder returned {len(counts)} token counts for {len(jobs)} texts")
        return vectors, counts

    def _observe(self, size: int, seconds: float) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size, seconds)
        except Exception:  # metrics must never fail a request or the worker
            logger.exception("recording a batch's metrics failed")

    def _worker_ended(self, worker: asyncio.Task) -> None:
        if worker.cancelled():
            return
        logger.error("the micro-batcher stopped: %r; requests get 503 until a restart", worker.exception())
        self._fail_queued(NotReady("the encoder stopped; the server log says why"))

    def _fail_queued(self, exc: BaseException) -> None:
        for waiting in self._waiting.values():
            while waiting:
                _, jobs = waiting.popitem()
                self._count -= len(jobs)
                self._fail(list(jobs), exc)

    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)
