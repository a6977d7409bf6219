"""Dynamic batching: requests that arrive together generate together, each with its own documents.

A :class:`DynamicBatcher` owns one worker thread and a queue of :class:`Job` s. The worker
takes the first waiting job, gathers more for at most ``max_wait_ms`` (up to ``max_batch``),
and runs one :meth:`ReGrad.complete` call for them: per-row documents, gamma and answer
length in one generation, so a batched answer equals the answer the job gets alone. A batch
that fails is run again job by job, so a bad job fails alone and the others still answer.

Nothing here knows HTTP: the server (``server.py``) validates a request, turns it into a
Job and awaits the Future that :meth:`DynamicBatcher.submit` returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from regrad_engine.errors import RegradError, check_k
from regrad_engine.inference import Completion, ReGrad
from regrad_engine.prompts import Conversation
from regrad_engine.retrieval.base import Hit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One checked request, ready to generate.

    Attributes:
        conversation: The prompt as the model reads it (passages already in it for hybrid).
        documents: The documents whose gradients this job gets (may be empty).
        gamma: Test-time step scale.
        max_new_tokens: Answer length.
    """

    conversation: Conversation
    documents: list[Hit]
    gamma: float
    max_new_tokens: int


@dataclass
class BatchStats:
    """What the worker did: batches run, jobs answered, and the largest batch."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def record(self, size: int) -> None:
        self.batches, self.jobs, self.largest = self.batches + 1, self.jobs + size, max(self.largest, size)
        self.sizes[size] = self.sizes.get(size, 0) + 1


_STOP = object()  # queued by close(): the worker ends after the jobs before it


class DynamicBatcher:
    """One worker thread that generates queued jobs in batches.

    Args:
        engine: The engine (its ``complete`` runs every batch).
        max_batch: Most jobs per batch (default: the engine's ``batch_size``).
        max_wait_ms: How long the first job of a batch waits for others to join it.
    """

    def __init__(self, engine: ReGrad, *, max_batch: int | None = None, max_wait_ms: float = 10.0) -> None:
        self.engine = engine
        self.max_batch = check_k(engine.batch_size if max_batch is None else max_batch, "max_batch")
        if not 0 <= max_wait_ms <= 10_000:
            raise RegradError(f"max_wait_ms must be between 0 and 10000, got {max_wait_ms!r}")
        self.max_wait = max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="regrad-batcher", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> Future[Completion]:
        """Queue a job; the Future gets its Completion, or the error that job alone raises."""
        future: Future[Completion] = Future()
        if self._closed:
            future.set_exception(RegradError("the server is shutting down: send the request again later"))
        else:
            self._queue.put((job, future))
        return future

    def close(self, timeout: float | None = 30.0) -> None:
        """Answer the jobs already queued, then stop the worker."""
        self._closed = True
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch, stop = self._collect(first)
                batch = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
                if batch:  # (a request whose caller gave up was cancelled: it is skipped)
                    try:
                        self._complete(batch)
                    except BaseException as err:  # the worker must outlive any one batch
                        logger.exception("batch worker: a batch failed outside generation")
                        for _, future in batch:
                            if not future.done():
                                future.set_exception(err)
                if stop:
                    return
        finally:  # jobs that raced close() are told so, never left waiting
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not _STOP and item[1].set_running_or_notify_cancel():
                    item[1].set_exception(RegradError("the server is shutting down: send the request again later"))

    def _collect(self, first) -> tuple[list, bool]:
        """The first job and those that join it within max_wait (and whether close() came)."""
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0)) \
                    if deadline > time.monotonic() else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _complete(self, batch: list) -> None:
        """Run a batch; if it fails, run each job alone so only the faulty one gets the error."""
        self.stats.record(len(batch))
        try:
            results = self._generate([job for job, _ in batch])
        except Exception as err:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) == 1:
                batch[0][1].set_exception(err)
                return
            logger.info("a batch of %d failed (%s); running its jobs one by one", len(batch), err)
            for job, future in batch:
                try:
                    future.set_result(self._generate([job])[0])
                except Exception as one:  # noqa: BLE001
                    future.set_exception(one)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    def _generate(self, jobs: list[Job]) -> list[Completion]:
        return self.engine.complete([job.conversation for job in jobs], [job.documents for job in jobs],
                                    gamma=[job.gamma for job in jobs],
                                    max_new_tokens=[job.max_new_tokens for job in jobs])
