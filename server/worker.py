"""The device worker: two threads that own the models, fed by a bounded queue, running requests in batches.

The event loop only enqueues and awaits futures. The device thread compiles at start-up, then forms batches:
requests whose pipeline batch_key is equal (same model, size and reference shapes) run together, up to max_batch,
waiting batch_wait_s for companions, or as long as the device is still busy with an earlier batch. A pipeline with
`start_batch` / `finish_batch` is pipelined: the device thread builds batch N+1's inputs and dispatches it while the
finisher thread waits for batch N's images and delivers them, so at most two batches are in flight and the device
does not wait for the host between full batches. A pipeline with only `run_batch` runs one batch at a time.

Admission uses measured batch times (a moving average per batch key): a request that would wait past its time
limit is refused at once instead of timing out later. A batch that raises, BaseException included, answers its
requests with the error and the worker goes on; if the worker's own loop fails, `failure` says why.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from server.metrics import Metrics

log = logging.getLogger(__name__)

_EMA_WEIGHT = 0.3  # of the newest batch time in the moving average


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class Overloaded(Exception):
    """The queue would take longer than the request's time limit: `estimate_s` seconds for `depth` requests."""

    def __init__(self, depth: int, estimate_s: float):
        super().__init__(f"{depth} requests queued, about {estimate_s:.1f} s")
        self.depth = depth
        self.estimate_s = estimate_s


class WorkerStopped(Exception):
    """The worker is shutting down (or failed) and takes no more work, or cannot finish this job in its drain time."""


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


@dataclasses.dataclass(eq=False)
class _Batch:
    """Jobs on their way from the device thread to the finisher thread."""

    jobs: list[Job]
    started_s: float
    pending: Any = None  # start_batch's result, or run_batch's images
    error: BaseException | None = None  # start_batch or run_batch raised it
    compiled_before: int | None = None  # the pipeline's compile_count before the batch

    @property
    def key(self) -> tuple[str, Hashable]:
        return self.jobs[0].key


class DeviceWorker:
    """Threads that first run `warm_up` (compiling), then serve batches from a bounded FIFO queue."""

    def __init__(self, models: Mapping[str, Any], *, max_queue: int, max_batch: int, batch_wait_s: float,
                 metrics: Metrics, warm_up: Callable[[], None]):
        self.models = dict(models)
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics
        self.warm_up = warm_up
        self.ready = threading.Event()
        self.failure: str | None = None  # set if warm-up or the worker's loop raised
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._drain_deadline: float | None = None  # perf_counter time; set by drain()
        # Batches dispatched and not yet delivered, oldest first: two when every model can be pipelined.
        self._in_flight: collections.deque[_Batch] = collections.deque()
        self._max_in_flight = 2 if all(hasattr(m, "start_batch") for m in self.models.values()) else 1
        self._device_free_s = 0.0  # perf_counter time the last batch's images were ready
        self._batch_s: dict[Hashable, float] = {}  # moving average of device time per batch, per key
        self._any_batch_s: float | None = None  # the same over every key, for keys not run yet
        self._finishing: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="klein-device-worker", daemon=True)
        self._finisher = threading.Thread(target=self._run_finisher, name="klein-finisher", daemon=True)

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self._queue)

    @property
    def alive(self) -> bool:
        """True while both threads run."""
        return self._thread.is_alive() and self._finisher.is_alive()

    def start(self) -> None:
        """Starts the threads; the device thread compiles, sets `ready`, then serves the queue."""
        self._finisher.start()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fails every waiting request with WorkerStopped and waits for the batches in flight to finish."""
        with self._cond:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._set_depth()
            self._cond.notify_all()
        for job in pending:
            _deliver(job, WorkerStopped("the server is shutting down"))
        deadline = time.monotonic() + timeout_s
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if not self._thread.ident:  # never started: nothing in flight, and no end-of-work mark for the finisher
            self._finishing.put(None)
        if self._finisher.is_alive():
            self._finisher.join(max(deadline - time.monotonic(), 0.0))

    def drain(self, deadline_s: float) -> None:
        """Takes no more jobs; queued ones run while they can finish by deadline_s (perf_counter time), as far as
        measured batch times tell, and the others get WorkerStopped now."""
        with self._cond:
            self._drain_deadline = deadline_s
            remaining = self._running_remaining_s(time.perf_counter())
            finish = time.perf_counter() + (remaining or 0.0)
            for batch, batch_s in self._plan(list(self._queue)):
                if remaining is None or batch_s is None:
                    break  # no measurement to judge by: the worker decides when it gets there
                finish += batch_s
                if finish > deadline_s:
                    for job in batch:
                        self._queue.remove(job)
                        _deliver(job, _cannot_finish())
            self._set_depth()
            self._cond.notify_all()

    def submit(self, model_id: str, prepared: Any, *, max_wait_s: float | None = None) -> Job:
        """Enqueues a request (from the event loop). QueueFull when max_queue requests wait beyond a full batch
        (queued plus running: max_queue + max_batch); Overloaded if measured batch times
        say it would finish later than max_wait_s from now (never while the device is idle); WorkerStopped when
        stopping or draining."""
        loop = asyncio.get_running_loop()
        job = Job(model_id, prepared, loop.create_future(), loop)
        with self._cond:
            if self._stopping or self.failure or self._drain_deadline is not None:
                raise WorkerStopped("the server is shutting down")
            running = sum(len(batch.jobs) for batch in self._in_flight)
            if len(self._queue) + running >= self.max_queue + self.max_batch * max(len(self._in_flight), 1):
                raise QueueFull()
            if max_wait_s is not None and (self._queue or self._in_flight):
                estimate = self._estimate_s(job)
                if estimate is not None and estimate > max_wait_s:
                    raise Overloaded(len(self._queue), estimate)
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

    # ---- estimates (called with the lock held) ----

    def _limit(self, job: Job) -> int:
        # Programs with references are compiled for batch size 1 only (service._compile_all): their requests rarely
        # share reference shapes, and batch sizes multiply the start-up compile time. A pipeline sharded over several
        # devices pads each batch to a multiple of its data axis (batch_multiple): those rows are filled if they can.
        limit = 1 if job.prepared.references else self.max_batch
        multiple = getattr(self.models[job.model_id], "batch_multiple", 1)
        return -(-limit // multiple) * multiple

    def _batch_time(self, key: Hashable) -> float | None:
        return self._batch_s.get(key, self._any_batch_s)

    def _plan(self, jobs: list[Job]) -> list[tuple[list[Job], float | None]]:
        """The batches the worker would form from `jobs` in order, each with its expected time (None: unknown)."""
        pending, plan = list(jobs), []
        while pending:
            first = pending[0]
            batch = [job for job in pending if job.key == first.key][:self._limit(first)]
            for job in batch:
                pending.remove(job)
            plan.append((batch, self._batch_time(first.key)))
        return plan

    def _running_remaining_s(self, now: float) -> float | None:
        """Device time left for the batches in flight (the oldest one started on the device first)."""
        total = 0.0
        for index, batch in enumerate(self._in_flight):
            batch_s = self._batch_time(batch.key)
            if batch_s is None:
                return None
            if index == 0:
                batch_s -= now - max(batch.started_s, self._device_free_s)
            total += max(batch_s, 0.0)
        return total

    def _estimate_s(self, job: Job) -> float | None:
        """Seconds from now until `job`, appended to the queue, would be done; None without measurements."""
        total = self._running_remaining_s(time.perf_counter())
        if total is None:
            return None
        for batch, batch_s in self._plan([*self._queue, job]):
            if batch_s is None:
                return None
            total += batch_s
            if job in batch:
                break
        return total

    # ---- the thread ----

    def _run(self) -> None:
        try:
            self.warm_up()
        except BaseException as e:  # noqa: BLE001 - reported through /readyz and the log
            log.exception("start-up failed; the server will not become ready")
            self.failure = f"{type(e).__name__}: {e}"
            self._finishing.put(None)
            return
        self.ready.set()
        try:
            while (batch := self._next_batch()) is not None:
                self._start(batch)
                self._finishing.put(batch)
        except BaseException as e:  # noqa: BLE001 - a bug in the loop itself: stop taking work, say so in /readyz
            self._fail("the device worker", e, in_flight=False)
        finally:
            self._finishing.put(None)  # the finisher ends once the batches in flight are delivered

    def _run_finisher(self) -> None:
        try:
            while (batch := self._finishing.get()) is not None:
                self._finish(batch)
        except BaseException as e:  # noqa: BLE001 - as in _run
            self._fail("the finisher", e, in_flight=True)

    def _fail(self, name: str, error: BaseException, *, in_flight: bool) -> None:
        """A thread's loop failed: no more work (/readyz says so); queued jobs, and with in_flight those dispatched
        (nobody will finish them), get WorkerStopped."""
        log.exception("%s stopped", name)
        with self._cond:
            self.failure = f"{type(error).__name__}: {error}"
            pending = list(self._queue)
            if in_flight:
                pending += [job for batch in self._in_flight for job in batch.jobs]
            self._queue.clear()
            self._set_depth()
            self._cond.notify_all()
        for job in pending:
            _deliver(job, WorkerStopped("the device worker stopped; see the server log"))

    def _next_batch(self) -> _Batch | None:
        """The oldest job and up to max_batch - 1 later ones with its key, waiting batch_wait_s for them, or while
        the device is busy with an earlier batch (a partial batch then fills at no cost)."""
        with self._cond:
            while True:
                while ((not self._queue or len(self._in_flight) >= self._max_in_flight) and not self._stopping
                       and not self.failure):
                    self._cond.wait()
                if self._stopping or self.failure:
                    return None
                key = self._queue[0].key
                limit = self._limit(self._queue[0])
                deadline = time.monotonic() + self.batch_wait_s
                while (self._count(key) < limit and not self._stopping and not self.failure
                       and self._drain_deadline is None):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 and not self._in_flight:
                        break
                    self._cond.wait(remaining if remaining > 0 else None)
                batch = [job for job in self._queue if job.key == key][:limit]
                for job in batch:
                    self._queue.remove(job)
                self._set_depth()
                if not batch:
                    continue  # every job of that key was cancelled while we waited
                start = time.perf_counter()
                batch_s, ahead_s = self._batch_time(key), self._running_remaining_s(start)
                if (self._drain_deadline is not None and batch_s is not None and ahead_s is not None
                        and start + ahead_s + batch_s > self._drain_deadline):
                    for job in batch:
                        _deliver(job, _cannot_finish())
                    continue
                for job in batch:
                    job.started_s = start
                    job.batch_size = len(batch)
                running = _Batch(batch, start)
                self._in_flight.append(running)
                return running

    def _count(self, key: tuple[str, Hashable]) -> int:
        return sum(1 for job in self._queue if job.key == key)

    def _start(self, batch: _Batch) -> None:
        """On the device thread: the batch's inputs built and its programs dispatched (start_batch), or the whole
        batch run (run_batch). A failure is kept on the batch for the finisher to answer."""
        self.metrics.batch_size.observe(len(batch.jobs))
        pipe = self.models[batch.jobs[0].model_id]
        batch.compiled_before = getattr(pipe, "compile_count", None)
        prepared = [job.prepared for job in batch.jobs]
        try:
            batch.pending = pipe.start_batch(prepared) if self._max_in_flight > 1 else pipe.run_batch(prepared)
        except BaseException as e:  # noqa: BLE001 - answered per request by _finish; the thread goes on
            batch.error = e

    def _finish(self, batch: _Batch) -> None:
        """On the finisher thread: waits for the batch's images (finish_batch) and delivers them, or its error."""
        pipe = self.models[batch.jobs[0].model_id]
        results: list[Any]
        try:
            if batch.error is not None:
                raise batch.error
            images = pipe.finish_batch(batch.pending) if self._max_in_flight > 1 else batch.pending
            if len(images) != len(batch.jobs):
                raise RuntimeError(f"run_batch returned {len(images)} images for {len(batch.jobs)} requests")
            results = list(images)
        except Exception as e:  # noqa: BLE001 - each request answers 500 and logs it with its id
            self.metrics.batch_failures.inc()
            results = [e] * len(batch.jobs)
        except BaseException as e:  # noqa: BLE001 - not an Exception (an abort, SystemExit...): the thread goes on
            log.exception("a batch of %d raised %s; its requests answer 500", len(batch.jobs), type(e).__name__)
            self.metrics.batch_failures.inc()
            results = [RuntimeError(f"the device worker's batch raised {type(e).__name__}")] * len(batch.jobs)
        batch.pending = batch.error = None  # the device arrays and any traceback go now
        finished = time.perf_counter()
        # A batch that failed, or compiled a program on first use, is no measure of the next one.
        measured = (not isinstance(results[0], BaseException)
                    and getattr(pipe, "compile_count", None) == batch.compiled_before)
        self._done(batch, finished, measured)
        for job, result in zip(batch.jobs, results):
            job.finished_s = finished
            _deliver(job, result)

    def _done(self, batch: _Batch, finished_s: float, measured: bool) -> None:
        """The batch is off the device (before its results are delivered): its device time, from when the device
        was free of the batch before it, feeds the moving averages."""
        with self._cond:
            self._in_flight.remove(batch)
            if measured:
                seconds = finished_s - max(batch.started_s, self._device_free_s)
                self._batch_s[batch.key] = _average(self._batch_s.get(batch.key), seconds)
                self._any_batch_s = _average(self._any_batch_s, seconds)
            self._device_free_s = finished_s
            self._cond.notify_all()

    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + _EMA_WEIGHT * (new - old)


def _cannot_finish() -> WorkerStopped:
    return WorkerStopped("the server is shutting down and cannot run this request within its drain time")


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
