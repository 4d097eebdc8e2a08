"""What POST /v1/generate does once the form is valid: references, prepare, queue, generate, PNG."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from PIL import Image

from server.errors import RequestError
from server.fetch import ImageFetcher
from server.forms import GenerateForm
from server.images import decode_image
from server.metrics import Metrics
from server.settings import Settings
from server.worker import DeviceWorker, Job, QueueFull, WorkerStopped

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Generated:
    """A generated image, encoded, with what the response headers report."""

    png: bytes
    seed: int
    batch_size: int


class GenerateService:
    """Owns the models' worker, the URI fetcher and the admission count of one app."""

    def __init__(self, models: Mapping[str, Any], settings: Settings, metrics: Metrics, fetcher: ImageFetcher):
        self.models = dict(models)
        self.settings = settings
        self.metrics = metrics
        self.fetcher = fetcher
        self.admitted = 0  # requests between admission and answer; touched on the event loop only
        self.compiled_programs = 0
        # Admission already bounds the requests in flight; the queue's own bound is the same capacity, so that an
        # admitted request is never refused because its batch companions have not left the queue yet.
        self.worker = DeviceWorker(self.models, max_queue=settings.capacity, max_batch=settings.max_batch,
                                   batch_wait_s=settings.batch_wait_ms / 1000.0, metrics=metrics,
                                   warm_up=self._compile_all)

    @property
    def ready(self) -> bool:
        """True once every program is compiled."""
        return self.worker.ready.is_set()

    async def start(self) -> None:
        """Opens the fetcher and starts the worker, which compiles in the background."""
        await self.fetcher.start()
        self.worker.start()

    async def stop(self) -> None:
        """Stops the worker (waiting requests get 503) and closes the fetcher."""
        await asyncio.to_thread(self.worker.stop)
        await self.fetcher.aclose()

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
        """RequestError 503 with Retry-After unless every program is compiled."""
        if self.ready:
            return
        if self.worker.failure:
            raise RequestError(503, "the model failed to load or compile; see the server log",
                               headers={"Retry-After": str(self.settings.retry_after_not_ready_s)})
        raise RequestError(503, "the server is starting: compiling programs; retry shortly",
                           headers={"Retry-After": str(self.settings.retry_after_not_ready_s)})

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Holds one of the `capacity` places for the whole request; 503 at once when none is free."""
        if self.admitted >= self.settings.capacity:
            raise self._busy()
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def _busy(self) -> RequestError:
        return RequestError(503, f"the server is at capacity ({self.settings.max_queue} requests queued); "
                                 "retry shortly", headers={"Retry-After": str(self.settings.retry_after_s)})

    async def generate(self, form: GenerateForm, timings: dict[str, float]) -> Generated:
        """The PNG for a valid form; fills `timings` (ms per stage) as it goes."""
        references = await self._references(form, timings)
        width, height = form.size
        pipe = self.models[form.model]
        with _timed(timings, "prepare"):
            try:
                prepared = await asyncio.to_thread(pipe.prepare, form.prompt, references, width=width,
                                                   height=height, seed=form.seed)
            except ValueError as e:  # the pipeline's own validation: a message for the client
                raise RequestError(422, str(e)) from None
        image, batch_size = await self._run(form.model, prepared, timings)
        if image.size != (width, height):
            raise RuntimeError(f"the pipeline returned a {image.size} image for {width}x{height}")
        with _timed(timings, "encode"):
            png = await asyncio.to_thread(_encode_png, image, self.settings.png_compress_level)
        return Generated(png=png, seed=int(prepared.seed), batch_size=batch_size)

    async def _references(self, form: GenerateForm, timings: dict[str, float]) -> list[Image.Image]:
        """Uploads then image_uris, decoded to RGB, in order."""
        with _timed(timings, "fetch"):
            fetched = await self.fetcher.fetch_all(form.image_uris)
        labelled = [(f"images[{i}] ({u.filename!r})", u.data) for i, u in enumerate(form.uploads)]
        labelled += [(f"image_uris[{i}]", data) for i, data in enumerate(fetched)]
        with _timed(timings, "decode"):
            return list(await asyncio.gather(*(
                asyncio.to_thread(decode_image, data, max_pixels=self.settings.max_image_pixels, label=label)
                for label, data in labelled)))

    async def _run(self, model_id: str, prepared: Any, timings: dict[str, float]) -> tuple[Image.Image, int]:
        """Queues the request and waits for its image; 503 if the queue is full, 504 past timeout_s."""
        try:
            job = self.worker.submit(model_id, prepared)
        except QueueFull:
            raise self._busy() from None
        except WorkerStopped as e:
            raise RequestError(503, str(e), headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        try:
            image = await asyncio.wait_for(job.future, self.settings.timeout_s)
        except TimeoutError:
            self.worker.cancel(job)  # if it has not started, it never will
            raise RequestError(504, f"generation (queue wait included) took longer than the server's limit of "
                                    f"{self.settings.timeout_s:g} s; retry later") from None
        except WorkerStopped as e:
            raise RequestError(503, str(e), headers={"Retry-After": str(self.settings.retry_after_s)}) from None
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


def _encode_png(image: Image.Image, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
