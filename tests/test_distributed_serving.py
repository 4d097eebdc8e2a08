"""klein-serve --distributed and klein-generate --distributed end to end (docs/sharding.md, "Several hosts").

Each test starts a jax.distributed job of two local processes (CPU backend, one device each, coordinator on a
loopback port, found from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID as on GPU hosts) running the
demo model split over `model=2`, so every program needs both processes; the job's image must be the one a single
process makes with the same seed (float32; a uint8 rounding step at most).
"""

import os
import socket
import subprocess

import httpx
import numpy as np

from klein_jax.cli import main as generate_main
from klein_jax.demo import build_demo_pipeline
from server_support import PYTHON, REPO, ServerProcess, decode_png

MESH = "model=2"  # the demo's 2 attention heads and 2 key/value heads, one per process
PROMPT = "a lighthouse at dusk"
# A 1024x1024 demo image costs about 10 CPU seconds per process, compiling its two programs about 7: generous
# time-outs, since this machine's CPUs are shared (the costs, not the limits, keep the module near a minute).
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job_env(coordinator_port: int, index: int) -> dict[str, str]:
    return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{coordinator_port}", "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(index)}


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _assert_same_image(got, want) -> None:
    got, want = _pixels(got), _pixels(want)
    assert got.shape == want.shape
    assert want.std() > 10  # an image, not a constant
    assert np.abs(got - want).max() <= 1  # float32 sums in another order: a rounding step at most


def test_klein_serve_distributed_answers_the_one_process_image(tmp_path):
    port = _free_port()
    args = ["--demo", "--distributed", "--mesh", MESH, "--no-auth", "--aspect-ratios", "square", "--max-batch", "1",
            "--timeout-s", str(TIMEOUT_S)]
    servers = []
    try:
        for index in (1, 0):  # process 0 waits for process 1 in jax.distributed.initialize
            log_dir = tmp_path / f"p{index}"
            log_dir.mkdir()
            servers.append(ServerProcess(args, log_dir, env=_job_env(port, index), wait=index == 0))
        follower, leader = servers
        leader.wait_ready(timeout_s=TIMEOUT_S)
        with httpx.Client(base_url=leader.base_url, timeout=TIMEOUT_S, trust_env=False) as client:
            answer = client.post("/v1/generate", data={"prompt": PROMPT, "seed": "7", "aspect_ratio": "square"})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-klein-seed"] == "7"
        served = decode_png(answer.content)
        leader.proc.terminate()  # SIGTERM: drain, then release the follower
        assert leader.proc.wait(TIMEOUT_S) == 0, leader.stderr()[-3000:]
        assert follower.proc.wait(TIMEOUT_S) == 0, follower.stderr()[-3000:]
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
    assert "process 1 follows process 0" in follower.stderr()
    assert "serving on" not in follower.stderr()  # only process 0 binds the port
    pipe = build_demo_pipeline()  # what a one-process klein-serve --demo answers for seed 7
    (want,) = pipe.run_batch([pipe.prepare(PROMPT, width=1024, height=1024, seed=7)])
    _assert_same_image(served, want)


def test_klein_generate_distributed_writes_the_one_process_image(tmp_path, capsys):
    port = _free_port()
    job_png = tmp_path / "job.png"
    command = [PYTHON, "-m", "klein_jax", "--demo", "--prompt", PROMPT, "--width", "256", "--height", "128",
               "--mesh", MESH, "--distributed", "--out", str(job_png), "--no-progress", "--compilation-cache", "none"]
    processes = [subprocess.Popen(command, cwd=REPO, env={**os.environ, **_job_env(port, index)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in range(2)]
    try:
        outputs = [process.communicate(timeout=TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    (leader_out, _), (follower_out, _) = outputs
    assert "wrote" in leader_out and "wrote" not in follower_out and "seed:" not in follower_out
    seed = int(leader_out.split("seed: ")[1].split()[0])  # drawn by process 0 and broadcast (no --seed given)
    one_png = tmp_path / "one.png"
    assert generate_main(["--demo", "--prompt", PROMPT, "--width", "256", "--height", "128", "--seed", str(seed),
                          "--out", str(one_png), "--no-progress", "--compilation-cache", "none"]) == 0
    capsys.readouterr()
    from PIL import Image

    with Image.open(job_png) as job, Image.open(one_png) as one:
        _assert_same_image(job, one)
