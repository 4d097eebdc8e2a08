"""The device worker: one thread that owns the models, fed by a bounded queue, running requests in batches.

The event loop only enqueues and awaits futures; every model call (compile at start-up, run_batch per batch)
runs on this thread. Requests whose pipeline batch_key is equal (same model, size and reference shapes) are
run together, up to max_batch, waiting at most batch_wait_s for companions.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class WorkerStopped(Exception):
    """The worker is shutting down (or failed to start) and takes no more work."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request on its way through the queue; `future` receives a PIL image or an exception."""

    model_id: str
    prepared: Any  # the pipeline's PreparedRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_s: float = dataclasses.field(default_factory=time.perf_counter)
    started_s: float | None = None
    finished_s: float | None = None
    batch_size: int = 0

    @property
    def key(self) -> tuple[str, Hashable]:
        """Jobs with equal keys may share a batch."""
        return self.model_id, self.prepared.batch_key


class DeviceWorker:
    """A thread that first runs `warm_up` (compiling), then serves batches from a bounded FIFO queue."""

    def __init__(self, models: Mapping[str, Any], *, max_queue: int, max_batch: int, batch_wait_s: float,
                 metrics: Metrics, warm_up: Callable[[], None]):
        self.models = dict(models)
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics
        self.warm_up = warm_up
        self.ready = threading.Event()
        self.failure: str | None = None  # set if warm-up raised
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="klein-device-worker", daemon=True)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    def start(self) -> None:
        """Starts the thread; it compiles, sets `ready`, then serves the queue."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fails every waiting request with WorkerStopped and waits for the running batch to finish."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._set_depth()
            self._cond.notify_all()
        for job in pending:
            _deliver(job, WorkerStopped("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def submit(self, model_id: str, prepared: Any) -> Job:
        """Enqueues a request (from the event loop); QueueFull past max_queue, WorkerStopped when stopping."""
        loop = asyncio.get_running_loop()
        job = Job(model_id, prepared, loop.create_future(), loop)
        with self._cond:
            if self._stopping or self.failure:
                raise WorkerStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._set_depth()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Removes a job that has not started; False if it is running or done (its result is then dropped)."""
        with self._cond:
            if job.started_s is not None or job not in self._queue:
                return False
            self._queue.remove(job)
            self._set_depth()
            return True

    def _run(self) -> None:
        try:
            self.warm_up()
        except BaseException as e:  # noqa: BLE001 - reported through /readyz and the log
            log.exception("start-up failed; the server will not become ready")
            self.failure = f"{type(e).__name__}: {e}"
            return
        self.ready.set()
        while (batch := self._next_batch()) is not None:
            self._execute(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and up to max_batch - 1 later ones with its key, waiting batch_wait_s for them."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                key = self._queue[0].key
                # Programs with references are compiled for batch size 1 only (service._compile_all): their
                # requests rarely share reference shapes, and batch sizes multiply the start-up compile time.
                limit = 1 if self._queue[0].prepared.references else self.max_batch
                deadline = time.monotonic() + self.batch_wait_s
                while self._count(key) < limit and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = [job for job in self._queue if job.key == key][:limit]
                if batch:  # empty if every job of that key was cancelled while we waited
                    start = time.perf_counter()
                    for job in batch:
                        self._queue.remove(job)
                        job.started_s = start
                        job.batch_size = len(batch)
                    self._set_depth()
                    return batch

    def _count(self, key: tuple[str, Hashable]) -> int:
        return sum(1 for job in self._queue if job.key == key)

    def _execute(self, batch: list[Job]) -> None:
        self.metrics.batch_size.observe(len(batch))
        try:
            images = self.models[batch[0].model_id].run_batch([job.prepared for job in batch])
            if len(images) != len(batch):
                raise RuntimeError(f"run_batch returned {len(images)} images for {len(batch)} requests")
            results: list[Any] = list(images)
        except Exception as e:  # noqa: BLE001 - each request answers 500 and logs it with its id
            results = [e] * len(batch)
        finished = time.perf_counter()
        for job, result in zip(batch, results):
            job.finished_s = finished
            _deliver(job, result)

    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))


def _deliver(job: Job, result: Any) -> None:
    """Hands a result (image or exception) to the job's future on its event loop."""

    def resolve() -> None:
        if job.future.done():  # timed out or the client went away
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    try:
        job.loop.call_soon_threadsafe(resolve)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass
