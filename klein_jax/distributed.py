"""Several hosts, one mesh: jax.distributed start-up, and host 0 leading the other processes through its device calls.

Every process of a multi-host job must run the same programs in the same order (each holds only its devices' shards).
klein-generate gets that by running the same command everywhere. klein-serve receives requests on host 0 only, so
host 0 wraps each pipeline in a `Leader`, which sends every device call (compile, run_batch) to the other processes
before running it; they sit in `follow`, running each call they receive, until `stop_followers`. Calls travel as
pickles in a device broadcast from process 0 (jax.experimental.multihost_utils), so every process is of one job that
trusts process 0.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_MIN_MESSAGE_BYTES = 4096  # messages are padded to powers of two from here: one broadcast program per size class


def initialize(environ: Mapping[str, str]) -> None:
    """jax.distributed.initialize; call it before anything else touches JAX (entry points pass os.environ).

    On Cloud TPU slices, SLURM, Open MPI and Kubernetes JAX finds everything itself; elsewhere (e.g. two GPU hosts)
    set JAX_COORDINATOR_ADDRESS (host:port of process 0, read by JAX), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    kwargs = {}
    for name, key in ((ENV_NUM_PROCESSES, "num_processes"), (ENV_PROCESS_ID, "process_id")):
        if environ.get(name):
            if not environ[name].isdigit():
                raise ValueError(f"{name}={environ[name]!r} is not a non-negative integer")
            kwargs[key] = int(environ[name])
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d: %d local devices, %d in the job", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_leader() -> bool:
    """True on process 0 (the one that serves HTTP and writes files)."""
    return jax.process_index() == 0


def broadcast(value: Any = None) -> Any:
    """Process 0's `value` on every process (the others' `value` is ignored); a no-op in a one-process run."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    payload = pickle.dumps(value) if is_leader() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buffer = np.zeros(max(_MIN_MESSAGE_BYTES, 1 << (size - 1).bit_length()), np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return pickle.loads(received[:size].tobytes())


class Leader:
    """A pipeline on process 0 whose compile and run_batch every other process runs too (in `follow`).

    Everything else (prepare, model_info, ...) is the pipeline's own: host work needs no other process, except
    start_batch/finish_batch (a server's pipelined batches), which a Leader does not offer, so that the server runs
    one run_batch at a time: gathering a batch's images is a collective too, and a next batch started meanwhile would
    issue its collectives in another order than the followers, which run each batch whole.
    """

    _NOT_LED = ("start_batch", "finish_batch")

    def __init__(self, model_id: str, pipeline):
        self.model_id = model_id
        self.pipeline = pipeline

    def __getattr__(self, name: str):
        if name in Leader._NOT_LED:
            raise AttributeError(f"a multi-host Leader runs whole batches (run_batch), not {name}")
        return getattr(self.pipeline, name)

    def _lead(self, method: str, *args, **kwargs):
        broadcast((method, self.model_id, args, kwargs))
        return getattr(self.pipeline, method)(*args, **kwargs)

    def compile(self, *args, **kwargs) -> int:
        """KleinPipeline.compile, on every process."""
        return self._lead("compile", *args, **kwargs)

    def run_batch(self, prepared) -> list:
        """KleinPipeline.run_batch, on every process; the images of process 0."""
        return self._lead("run_batch", list(prepared))


def follow(pipelines: Mapping[str, Any]) -> None:
    """Runs process 0's device calls on this process's pipelines (by model id) until stop_followers."""
    log.info("process %d follows process 0", jax.process_index())
    while (message := broadcast()) is not None:
        method, model_id, args, kwargs = message
        try:
            getattr(pipelines[model_id], method)(*args, **kwargs)
        except Exception:  # noqa: BLE001 - process 0 meets the same error and answers it; keep following
            log.exception("%s of %s failed on process %d", method, model_id, jax.process_index())


def stop_followers() -> None:
    """Ends `follow` on every other process (process 0, at shutdown)."""
    broadcast(None)
