"""The server's pipeline of stages (server/worker.py, server/images.py PngEncoder): a batch is dispatched while the
previous one finishes, PNGs encode in parallel, and a failure in any stage answers only its own requests.

Every overlap is shown by a fake stage that waits for another stage's event: run one stage after the other and the
wait times out, the request fails, and the test with it. No timings are asserted.
"""

from __future__ import annotations

import asyncio
import threading

import jax
import numpy as np
import pytest
from PIL import Image
from server_support import AppClient, FakePipeline, decode_png

import server.images
from server import Settings, create_app
from server.images import PngEncoder, encode_png
from server.metrics import Metrics
from server.worker import DeviceWorker

WAIT_S = 10  # how long a fake stage waits for the stage it must overlap; past it the overlap did not happen


class PipelinedFake(FakePipeline):
    """FakePipeline with KleinPipeline's start_batch / finish_batch. finish_batch(k) waits until batch k + 1 has
    started (for the first `overlaps` batches): a worker that runs one batch after the other never gets there."""

    def __init__(self, overlaps: int = 0, **kw):
        super().__init__(**kw)
        self.overlaps = overlaps
        self.events: list[str] = []
        self.started = [threading.Event() for _ in range(16)]
        self.finish_gate = threading.Event()
        self.finish_gate.set()
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def start_batch(self, prepared):
        with self._lock:
            index = len(self.batches)
            self.events.append(f"start {index}")
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.batches.append(list(prepared))
        self.started[index].set()
        if any(p.prompt == "fault:start" for p in prepared):
            raise RuntimeError("start_batch failed")
        return index, list(prepared)

    def finish_batch(self, pending):
        index, prepared = pending
        try:
            if index < self.overlaps and not self.started[index + 1].wait(WAIT_S):
                raise RuntimeError(f"batch {index + 1} was not dispatched while batch {index} finished")
            assert self.finish_gate.wait(WAIT_S)
            if any(p.prompt == "fault:finish" for p in prepared):
                raise KeyboardInterrupt("finish_batch aborted")  # a BaseException, not an Exception
            return [Image.new("RGB", (p.width, p.height), self.color(p)) for p in prepared]
        finally:
            with self._lock:
                self.events.append(f"done {index}")
                self.in_flight -= 1


def test_start_batch_dispatches_and_finish_batch_gives_the_run_batch_images(tiny_pipeline):
    prepared = [tiny_pipeline.prepare(f"a cat {seed}", width=64, height=64, seed=seed) for seed in (1, 2)]
    pending = tiny_pipeline.start_batch(prepared)
    assert [type(images).__name__ for images in pending.images] == ["ArrayImpl"]  # device arrays, not waited for
    assert isinstance(pending.images[0], jax.Array) and pending.counts == (2,)
    split = [np.asarray(image) for image in tiny_pipeline.finish_batch(pending)]
    whole = [np.asarray(image) for image in tiny_pipeline.run_batch(prepared)]
    assert len(split) == 2 and all(np.array_equal(a, b) for a, b in zip(split, whole))
    assert not np.array_equal(split[0], split[1])  # each request its own image


def _worker(pipe, **kw):
    options = dict(max_queue=8, max_batch=1, batch_wait_s=0.0, metrics=Metrics(), warm_up=lambda: None) | kw
    worker = DeviceWorker({"m": pipe}, **options)
    worker.start()
    assert worker.ready.wait(5)
    return worker


def test_the_next_batch_is_dispatched_while_the_previous_one_finishes():
    pipe = PipelinedFake(overlaps=2)
    worker = _worker(pipe)

    async def go():
        jobs = [worker.submit("m", pipe.prepare(f"p{i}", seed=i)) for i in range(3)]
        return await asyncio.gather(*(job.future for job in jobs))

    images = asyncio.run(go())
    worker.stop()
    assert [image.getpixel((0, 0)) for image in images] == [pipe.color(b[0]) for b in pipe.batches]
    # Batch 1 is dispatched before batch 0 is done, never more than two at once, and the order holds.
    assert pipe.events == ["start 0", "start 1", "done 0", "start 2", "done 1", "done 2"]
    assert pipe.max_in_flight == 2


def test_a_pipeline_without_start_batch_runs_one_batch_at_a_time():
    pipe = FakePipeline(delay_s=0.05)
    worker = _worker(pipe)

    async def go():
        jobs = [worker.submit("m", pipe.prepare(f"p{i}", seed=i)) for i in range(3)]
        return await asyncio.gather(*(job.future for job in jobs))

    assert len(asyncio.run(go())) == 3 and [len(b) for b in pipe.batches] == [1, 1, 1]
    worker.stop()
    assert worker._max_in_flight == 1


def test_a_partial_batch_fills_while_the_device_is_busy():
    pipe = PipelinedFake()
    pipe.finish_gate.clear()  # batch 0 stays on the "device" until B and C are queued
    worker = _worker(pipe, max_batch=2)

    async def go():
        first = worker.submit("m", pipe.prepare("A", seed=1))
        await asyncio.to_thread(pipe.started[0].wait, WAIT_S)
        second = worker.submit("m", pipe.prepare("B", seed=2))
        await asyncio.sleep(0.05)  # the device thread sees B alone; with batch_wait 0 it would send it now
        third = worker.submit("m", pipe.prepare("C", seed=3))
        pipe.finish_gate.set()
        await asyncio.gather(first.future, second.future, third.future)
        return first, second, third

    jobs = asyncio.run(go())
    worker.stop()
    assert [[p.prompt for p in b] for b in pipe.batches] == [["A"], ["B", "C"]]
    assert [job.batch_size for job in jobs] == [1, 2, 2]


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (96 + 8 * i, 128, 3), dtype=np.uint8)) for i in range(count)]


def test_parallel_png_encoding_gives_the_serial_bytes():
    images = _images(4)
    encoder = PngEncoder(compress_level=6, threads=4)

    async def go():
        return await asyncio.gather(*(encoder.encode(image) for image in images))

    parallel = asyncio.run(go())
    encoder.close()
    assert parallel == [encode_png(image, 6) for image in images]
    assert [np.array_equal(np.asarray(decode_png(png)), np.asarray(image)) for png, image in zip(parallel, images)] \
        == [True] * 4


def test_png_encodings_run_side_by_side(monkeypatch):
    barrier = threading.Barrier(3, timeout=WAIT_S)  # three encodings must be under way at once to pass it

    def encode(image, compress_level):
        barrier.wait()
        return encode_png(image, compress_level)

    monkeypatch.setattr(server.images, "encode_png", encode)
    encoder = PngEncoder(compress_level=1, threads=3)

    async def go():
        return await asyncio.gather(*(encoder.encode(image) for image in _images(3)))

    assert len(asyncio.run(go())) == 3
    encoder.close()


@pytest.fixture
def client(monkeypatch):
    def encode(image, compress_level):
        if image.getpixel((0, 0)) == FAULTY_PNG_COLOR:
            raise OSError("the PNG encoder failed")
        return encode_png(image, compress_level)

    monkeypatch.setattr(server.images, "encode_png", encode)
    pipe = PipelinedFake()
    app_client = AppClient(create_app({"flux2-klein-4b": pipe}, Settings(api_keys=("test-key",), max_batch=2,
                                                                         batch_wait_ms=200)))
    app_client.pipe = pipe
    yield app_client
    app_client.close()


FAULTY_PNG_COLOR = FakePipeline.color(PipelinedFake().prepare("fault:png", seed=7))


def test_a_failure_in_any_stage_answers_500_for_its_requests_only(client):
    def pair(prompt):  # the faulty request and a good one, sent together so that they can share a batch
        answers = [client.generate_async({"prompt": p, "seed": "7", "aspect_ratio": "square"})
                   for p in (prompt, "fine")]
        return [answer.result(60) for answer in answers]

    faulty_png, good = pair("fault:png")  # one image of a batch fails to encode: its batch-mate is fine
    assert (faulty_png.status, good.status) == (500, 200)
    assert client.pipe.batches[-1] and len(client.pipe.batches[-1]) == 2
    for stage in ("fault:start", "fault:finish"):  # a batch that fails fails its requests, and no more
        answer = client.generate({"prompt": stage, "seed": "1", "aspect_ratio": "portrait"})
        assert answer.status == 500 and "Traceback" not in answer.body.decode()
        assert client.generate({"prompt": "after", "seed": "2", "aspect_ratio": "portrait"}).status == 200
    assert client.request("GET", "/readyz").status == 200 and client.service.worker.alive
    assert client.service.metrics.batch_failures._value.get() == 2
