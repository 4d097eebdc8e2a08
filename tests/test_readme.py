"""Every command of README.md runs as written, or is listed in SKIPPED with the reason it cannot run here.

The fenced ```bash blocks give one command per line and each ```python block is one program. Commands run with
bash in a scratch folder whose `.venv` is this interpreter's environment, so `.venv/bin/...` works as in the
README; a server listens on a free loopback port (KLEIN_PORT; a `127.0.0.1:8000` URL in a command is pointed at
that port). A README command in neither RUN nor SKIPPED fails `test_every_command_is_run_or_skipped`.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import httpx
import PIL.Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# The demo server of the "Two commands" section compiles 8 aspect ratios x batch sizes 1, 2, 4 before it is ready
# (minutes on 2 CPU cores; tests/test_server_contract.py serves all 8 ratios). It runs here as written, with the
# klein-serve flags' KLEIN_* environment fallbacks narrowing what it compiles to keep the suite short.
MAIN_JOB_ENV = {"KLEIN_ASPECT_RATIOS": "square", "KLEIN_COMPILE_REFERENCES": "0", "KLEIN_MAX_BATCH": "1"}
QUICK_SERVER = ".venv/bin/klein-serve --demo --no-auth --aspect-ratios square --compile-references 0 --max-batch 1"
MAIN_JOB = ".venv/bin/klein-serve --demo --no-auth"
CURLS = (
    "curl -s http://127.0.0.1:8000/readyz",
    'curl -s -o lighthouse.png -F prompt="a lighthouse at dusk" -F aspect_ratio=square -F seed=7 '
    "http://127.0.0.1:8000/v1/generate",
)
CONVERTER_CHAIN = (
    ".venv/bin/python -m convert.export demo-diffusers",
    ".venv/bin/klein-convert demo-diffusers demo-klein --dtype float32",
    '.venv/bin/klein-generate --model demo-klein --prompt "a red fox in the snow" --width 256 --height 256 '
    "--seed 1 --out fox.png",
)
HELPS = (".venv/bin/klein-convert --help", ".venv/bin/klein-generate --help", ".venv/bin/klein-serve --help")

RUN = {  # command -> the test that runs it
    MAIN_JOB: "test_main_job_serves_the_demo_model",
    QUICK_SERVER: "test_quick_demo_server_answers_the_curl_commands",
    **{c: "test_quick_demo_server_answers_the_curl_commands" for c in CURLS},
    **{c: "test_converter_chain_without_a_download" for c in CONVERTER_CHAIN},
    **{c: "test_every_command_has_help" for c in HELPS},
}
SKIPPED = {  # command -> why it cannot run here (tests/test_docs.py still parses the klein-* flags of each)
    "python3 -m venv .venv && .venv/bin/pip install -e .":
        "creates a virtual environment and installs from PyPI; .ci/run does this set-up before the tests",
    "bash .ci/run": "the test command itself: it runs this test",
    'python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda13]" # CUDA 12 drivers: "jax[cuda12]"; a TPU VM: "jax[tpu]"':
        "installs the CUDA (or TPU) build of JAX: needs an accelerator VM",
    ".venv/bin/klein-convert black-forest-labs/FLUX.2-klein-4B models/klein-4b":
        "downloads about 16 GB of gated weights from the Hugging Face hub",
    "KLEIN_API_KEYS_FILE=keys.txt .venv/bin/klein-serve --model models/klein-4b --host 0.0.0.0 "
    "--compile-cache xla-cache": "serves the converted real model (a download, and an accelerator to be useful)",
    'curl -s -o fox.png -H "Authorization: Bearer $KEY" -F prompt="a red fox in the snow" -F aspect_ratio=landscape '
    "http://127.0.0.1:8000/v1/generate": "calls the operator's real-model server with its API key",
    ".venv/bin/pip install jupyterlab && .venv/bin/jupyter lab notebooks/":
        "installs JupyterLab from PyPI and starts an interactive server; tests/test_notebooks.py runs the notebooks",
    '.venv/bin/klein-generate --model models/klein-4b --prompt "a red fox in the snow, golden hour" --aspect-ratio '
    "landscape --seed 1 --out fox.png": "needs the converted real model (a download)",
}
PYTHON_BLOCKS = 1  # run by test_python_example_runs, after the converter chain made demo-klein


def readme_blocks(lang: str) -> list[str]:
    """The bodies of the fenced blocks of `lang` in README.md."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), re.DOTALL | re.MULTILINE)


def readme_commands() -> list[str]:
    """One string per shell command of the README (backslash continuations joined, comment lines dropped)."""
    commands = []
    for block in readme_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_every_command_is_run_or_skipped():
    commands = readme_commands()
    assert commands, "no ```bash blocks found in README.md"
    assert not set(RUN) & set(SKIPPED)
    assert set(commands) == set(RUN) | set(SKIPPED), (
        f"not covered: {sorted(set(commands) - set(RUN) - set(SKIPPED))}; "
        f"stale entries: {sorted((set(RUN) | set(SKIPPED)) - set(commands))}")
    assert len(readme_blocks("python")) == PYTHON_BLOCKS
    assert all(reason for reason in SKIPPED.values())


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder where `.venv` is this interpreter's environment, as the README's commands expect."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The commands' environment: one compile cache for the session (tests/test_notebooks.py uses it too), no hub."""
    cache = tmp_path_factory.getbasetemp() / "jax-compile-cache"
    cache.mkdir(exist_ok=True)
    return {**os.environ, "KLEIN_COMPILATION_CACHE": str(cache), "JAX_COMPILATION_CACHE_DIR": str(cache),
            "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(command: str, cwd: pathlib.Path, env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    assert result.returncode == 0, (f"{command}\nexit {result.returncode}\n{result.stdout[-2000:]}\n"
                                    f"{result.stderr[-3000:]}")
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A README server command started with bash on a free port; stopped (SIGTERM) on exit."""

    def __init__(self, command: str, cwd: pathlib.Path, env: dict, extra_env: dict | None = None):
        self.port = free_port()
        self.log = cwd / f"server-{self.port}.log"
        with open(self.log, "w") as log:
            # exec: the server is the process we started, so terminate() reaches it
            self.process = subprocess.Popen(["bash", "-c", "exec " + command], cwd=cwd, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            env={**env, **(extra_env or {}), "KLEIN_PORT": str(self.port)})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                response = httpx.get(self.url("/readyz"), timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"not ready after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ------------------------------------------------------------------------------------------------- commands


def test_every_command_has_help(workdir, env):
    for command in HELPS:
        prog = command.split("/")[-1].split()[0]
        out = run(command, workdir, env, timeout_s=120).stdout
        assert out.startswith(f"usage: {prog}"), out[:200]


def test_main_job_serves_the_demo_model(workdir, env):
    with Server(MAIN_JOB, workdir, env, MAIN_JOB_ENV) as server:
        ready = server.wait_ready()
        assert ready["status"] == "ready" and ready["models"]["flux2-klein-4b"]["is_demo"] is True
        assert httpx.get(server.url("/healthz")).json() == {"status": "ok"}
    assert server.process.returncode == 0, server.log.read_text()[-2000:]  # SIGTERM: a clean shutdown


def test_quick_demo_server_answers_the_curl_commands(workdir, env):
    with Server(QUICK_SERVER, workdir, env) as server:
        server.wait_ready()
        outputs = [run(c.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}"), workdir, env).stdout for c in CURLS]
    assert json.loads(outputs[0])["status"] == "ready"
    with PIL.Image.open(workdir / "lighthouse.png") as image:
        assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_converter_chain_without_a_download(workdir, env):
    outputs = [run(command, workdir, env).stdout for command in CONVERTER_CHAIN]
    assert (workdir / "demo-diffusers" / "model_index.json").is_file()
    assert (workdir / "demo-klein" / "klein_manifest.json").is_file() and "wrote demo-klein" in outputs[1]
    assert outputs[2].splitlines()[0] == "seed: 1"
    assert outputs[2].splitlines()[-1] == "wrote fox.png (256x256, text-to-image, 4 steps)"
    with PIL.Image.open(workdir / "fox.png") as image:
        assert image.size == (256, 256)


def test_python_example_runs(workdir, env):
    if not (workdir / "demo-klein").is_dir():
        run(CONVERTER_CHAIN[0], workdir, env)
        run(CONVERTER_CHAIN[1], workdir, env)
    (block,) = readme_blocks("python")
    (workdir / "readme_example.py").write_text(block + "\nprint(edited.size)\n")
    out = run(".venv/bin/python readme_example.py", workdir, env).stdout
    assert out.strip().endswith("(256, 256)")
    with PIL.Image.open(workdir / "fox-python.png") as image:
        assert image.size == (256, 256)
