"""What POST /v1/generate does once the form is valid: references, prepare, queue, generate, PNG.

A request takes a queue place only once its body is read and its references fetched, decoded and prepared, so a
slow upload or fetch holds none. Decoded references are bounded across requests by a PixelBudget. On SIGTERM,
drain() stops admission and answers everything in flight within the drain time (200, or 503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Awaitable, Iterator, Mapping
from typing import Any, TypeVar

from PIL import Image

from server.errors import RequestError
from server.fetch import ImageFetcher
from server.forms import GenerateForm
from server.images import PixelBudget, PngEncoder, decode_image, image_pixels
from server.metrics import Metrics
from server.settings import Settings
from server.worker import DeviceWorker, Job, Overloaded, QueueFull, WorkerStopped

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass
class Generated:
    """A generated image, encoded, with what the response headers report."""

    png: bytes
    seed: int
    batch_size: int


class GenerateService:
    """Owns the models' worker, the URI fetcher, the decoded-pixel budget and the drain of one app."""

    def __init__(self, models: Mapping[str, Any], settings: Settings, metrics: Metrics, fetcher: ImageFetcher):
        self.models = dict(models)
        self.settings = settings
        self.metrics = metrics
        self.fetcher = fetcher
        self.compiled_programs = 0
        self.budget = PixelBudget(settings.max_decoded_pixels)
        # One thread per image of a full batch, as far as the cores go: a batch's PNGs are encoded side by side.
        self.png = PngEncoder(settings.png_compress_level, threads=max(2, min(settings.max_batch, os.cpu_count() or 1)))
        self.worker = DeviceWorker(self.models, max_queue=settings.max_queue, max_batch=settings.max_batch,
                                   batch_wait_s=settings.batch_wait_ms / 1000.0, metrics=metrics,
                                   warm_up=self._compile_all)
        self._drain_deadline: float | None = None  # perf_counter time, once drain() was called
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drained = asyncio.Event()  # set at the drain deadline: whatever is still in flight answers 503

    @property
    def ready(self) -> bool:
        """True once every program is compiled, while the worker runs and the server is not draining."""
        return self.worker.ready.is_set() and self.worker.alive and self._drain_deadline is None

    async def start(self) -> None:
        """Opens the fetcher and starts the worker, which compiles in the background."""
        await self.fetcher.start()
        self.worker.start()

    async def stop(self) -> None:
        """Stops the worker (waiting requests get 503) and closes the fetcher."""
        # A batch still on the device (one that overran the drain time; its requests were answered 503) is waited
        # for: the interpreter must not tear the runtime down under a running program (XLA aborts the process).
        await asyncio.to_thread(self.worker.stop, self.settings.timeout_s)
        self.png.close()
        await self.fetcher.aclose()

    def drain(self, timeout_s: float) -> None:
        """Stops admitting (503) and answers what is in flight within timeout_s: queued and running requests get
        their image if measured batch times say it can be ready in time, the rest a 503 with Retry-After. A second
        call can only shorten the deadline. Called on the event loop (klein-serve's SIGTERM handler)."""
        deadline = time.perf_counter() + timeout_s
        if self._drain_deadline is not None and deadline >= self._drain_deadline:
            return
        self._drain_deadline = deadline
        self.worker.drain(deadline)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._drain_timer = asyncio.get_running_loop().call_later(timeout_s, self._drained.set)

    async def until_drained(self, work: Awaitable[T]) -> T:
        """The result of `work`, unless the drain deadline passes first: then `work` is cancelled and the answer is
        a 503 with Retry-After."""
        task = asyncio.ensure_future(work)
        deadline = asyncio.ensure_future(self._drained.wait())
        try:
            await asyncio.wait((task, deadline), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            deadline.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # its clean-up (the queued job removed) runs first
        raise self._shutting_down()

    def _shutting_down(self, detail: str = "the server is shutting down; retry shortly") -> RequestError:
        return RequestError(503, detail, headers={"Retry-After": str(self.settings.retry_after_s)})

    def _compile_all(self) -> None:
        """Runs on the worker thread: every program for the enabled aspect ratios, then one 'ready' line."""
        start = time.perf_counter()
        for model_id, pipe in self.models.items():
            model_start = time.perf_counter()
            ratios = list(self.settings.aspect_ratios)
            # Text-to-image at every batch size; with references, batch size 1 only (the worker never batches them).
            count = pipe.compile(aspect_ratios=ratios, max_references=0, batch_sizes=self.settings.batch_sizes)
            if self.settings.compile_references:
                count += pipe.compile(aspect_ratios=ratios, max_references=self.settings.compile_references,
                                      batch_sizes=(1,))
            self.compiled_programs += count
            log.info("compiled %d programs for model %s in %.1f s", count, model_id, time.perf_counter() - model_start)
        self.metrics.compiled_programs.set(self.compiled_programs)
        self.metrics.ready.set(1)
        names = ", ".join(f"{mid} (demo: random weights, noise images)" if getattr(p, "is_demo", False) else mid
                          for mid, p in self.models.items())
        log.info("klein-serve ready on %s: models %s; aspect ratios %s; %d programs compiled in %.1f s",
                 self.settings.base_url, names, ",".join(self.settings.aspect_ratios), self.compiled_programs,
                 time.perf_counter() - start)

    def require_ready(self) -> None:
        """RequestError 503 with Retry-After unless every program is compiled and the server takes requests."""
        if self.ready:
            return
        retry = {"Retry-After": str(self.settings.retry_after_not_ready_s)}
        if self._drain_deadline is not None:
            raise self._shutting_down()
        if self.worker.failure:
            raise RequestError(503, "the model failed to load or compile, or the device worker stopped; see the "
                                    "server log", headers=retry)
        if self.worker.ready.is_set():  # compiled, but the thread is gone
            raise RequestError(503, "the device worker stopped; see the server log", headers=retry)
        raise RequestError(503, "the server is starting: compiling programs; retry shortly", headers=retry)

    def _busy(self, depth: int, estimate_s: float | None = None) -> RequestError:
        if estimate_s is None:
            detail = (f"the server is at capacity: {depth} requests queued for the device, its limit "
                      f"(--max-queue {self.settings.max_queue}); retry shortly")
            retry_s = self.settings.retry_after_s
        else:
            detail = (f"the server is busy: {depth} requests queued for the device, about {estimate_s:.0f} s of "
                      f"work with this one, more than the {self.settings.timeout_s:g} s limit; retry later")
            retry_s = max(self.settings.retry_after_s, math.ceil(estimate_s - self.settings.timeout_s))
        return RequestError(503, detail, headers={"Retry-After": str(retry_s)})

    async def generate(self, form: GenerateForm, timings: dict[str, float]) -> Generated:
        """The PNG for a valid form; fills `timings` (ms per stage) as it goes."""
        prepared = await self._prepare(form, timings)
        width, height = form.size
        image, batch_size = await self._run(form.model, prepared, timings)
        if image.size != (width, height):
            raise RuntimeError(f"the pipeline returned a {image.size} image for {width}x{height}")
        with _timed(timings, "encode"):
            png = await self.png.encode(image)
        return Generated(png=png, seed=int(prepared.seed), batch_size=batch_size)

    async def _prepare(self, form: GenerateForm, timings: dict[str, float]) -> Any:
        """The pipeline's prepared request: references fetched, then decoded and prepared within the pixel budget."""
        with _timed(timings, "fetch"):
            fetched = await self.fetcher.fetch_all(form.image_uris)
        labelled = [(f"images[{i}] ({u.filename!r})", u.data) for i, u in enumerate(form.uploads)]
        labelled += [(f"image_uris[{i}]", data) for i, data in enumerate(fetched)]
        max_pixels = self.settings.max_image_pixels
        sizes = await asyncio.gather(*(asyncio.to_thread(image_pixels, data, max_pixels=max_pixels, label=label)
                                       for label, data in labelled), return_exceptions=True)
        for size in sizes:  # the first bad image in order, whichever thread finished first
            if isinstance(size, BaseException):
                raise size
        held = await self._hold_pixels(sum(sizes))
        # One thread decodes and prepares; the pixels are given back when it ends, even if the client went away.
        work = asyncio.get_running_loop().run_in_executor(None, self._decode_and_prepare, form, labelled, timings)
        work.add_done_callback(lambda _: self._release_pixels(held))
        return await asyncio.shield(work)

    async def _hold_pixels(self, pixels: int) -> int:
        if not pixels:
            return 0
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                held = await self.budget.acquire(pixels)
        except TimeoutError:
            raise RequestError(503, "the server is busy decoding other requests' images; retry shortly",
                               headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        self.metrics.decoded_pixels.set(self.budget.used)
        return held

    def _release_pixels(self, held: int) -> None:
        if held:
            self.budget.release(held)
            self.metrics.decoded_pixels.set(self.budget.used)

    def _decode_and_prepare(self, form: GenerateForm, labelled: list[tuple[str, bytes]],
                            timings: dict[str, float]) -> Any:
        """On a thread: every reference decoded (uploads, then image_uris, in order), then pipe.prepare."""
        with _timed(timings, "decode"):
            references = [decode_image(data, max_pixels=self.settings.max_image_pixels, label=label)
                          for label, data in labelled]
        width, height = form.size
        with _timed(timings, "prepare"):
            try:
                return self.models[form.model].prepare(
                    form.prompt, references, width=width, height=height, seed=form.seed,
                    **({"lora": form.lora, "lora_scale": form.lora_scale} if form.lora else {}))
            except ValueError as e:  # the pipeline's own validation: a message for the client
                raise RequestError(422, str(e)) from None

    async def _run(self, model_id: str, prepared: Any, timings: dict[str, float]) -> tuple[Image.Image, int]:
        """Queues the request and waits for its image: 503 at once if the queue is full or would take longer than
        timeout_s by measured batch times, 504 past timeout_s."""
        try:
            job = self.worker.submit(model_id, prepared, max_wait_s=self.settings.timeout_s)
        except QueueFull:
            raise self._busy(self.worker.depth) from None
        except Overloaded as e:
            raise self._busy(e.depth, e.estimate_s) from None
        except WorkerStopped as e:
            raise self._shutting_down(str(e)) from None
        try:
            image = await asyncio.wait_for(job.future, self.settings.timeout_s)
        except TimeoutError:
            self.worker.cancel(job)  # if it has not started, it never will
            raise RequestError(504, f"generation (queue wait included) took longer than the server's limit of "
                                    f"{self.settings.timeout_s:g} s; retry later") from None
        except WorkerStopped as e:
            raise self._shutting_down(str(e)) from None
        except asyncio.CancelledError:  # the client went away: do not run its work if it has not started
            self.worker.cancel(job)
            raise
        finally:
            _record_job_timings(job, timings)
        return image, job.batch_size


def _record_job_timings(job: Job, timings: dict[str, float]) -> None:
    end = job.started_s if job.started_s is not None else time.perf_counter()
    timings["queue"] = (end - job.enqueued_s) * 1000.0
    if job.started_s is not None and job.finished_s is not None:
        timings["generate"] = (job.finished_s - job.started_s) * 1000.0


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = (time.perf_counter() - start) * 1000.0
