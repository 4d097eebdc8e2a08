"""Cold start of klein-serve: process start to the first 200 from /readyz, with an empty and a warm compilation cache.

    .venv/bin/python benchmarks/cold_start.py                         # klein-serve --demo, 3 runs per cache state
    .venv/bin/python benchmarks/cold_start.py --model out/klein-4b    # a klein-convert folder instead of the demo
    .venv/bin/python benchmarks/cold_start.py --runs 5 -- --aspect-ratios square --max-batch 1   # more serve flags

Each run starts `python -m server --no-auth --port P --compile-cache DIR (--demo | --model SRC) [EXTRA...]` and polls
GET /readyz every 50 ms. It records the time from process start to the first HTTP answer (the server listens while it
compiles and answers 503) and to /readyz 200, the programs /readyz counts, and the compile time of the server's
"ready" log line, then stops the server with SIGTERM. Cache states: "empty", a new empty cache folder per run
(every program compiles and is written); "warm", the folder the last empty run filled (programs load from disk; JAX
stores only programs that took at least 1 s to compile, jax_persistent_cache_min_compile_time_secs). Medians of
--runs runs per state; the table replaces the section between the cold-start markers of docs/benchmarks.md
(--no-doc: leave it).

`--abstract-4b` measures the real klein-4B shapes without weights: a child process builds the three modules with
abstract bfloat16 parameters (nnx.eval_shape, nothing allocated) and runs `KleinPipeline.compile` for the programs
that `klein-serve --aspect-ratios A --max-batch B --compile-references 0` compiles (--aspect-ratios, --max-batch),
empty cache then warm, and reports process start to the end of compilation. Loading 16 GB of weights is not in it
(benchmarks/convert_memory.py measures load_components), nor the HTTP server; the table goes between the
cold-start-4b markers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import reporting

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
READY_LINE = re.compile(r"klein-serve ready on .*? programs compiled in ([\d.]+) s")
POLL_S = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int | None, bytes]:
    """(HTTP status, body) of GET url; (None, b"") when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, b""


def start_once(model_args: list[str], cache: pathlib.Path, extra: list[str], timeout_s: float,
               log_path: pathlib.Path) -> dict:
    """One server start: seconds to the first answer and to /readyz 200, the programs /readyz reports, and the
    compile (or cache load) time of the server's "ready" log line."""
    port = _free_port()
    command = [sys.executable, "-m", "server", "--no-auth", "--port", str(port), "--compile-cache", str(cache),
               *model_args, *extra]
    url = f"http://127.0.0.1:{port}/readyz"
    first_answer_s = None
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
        try:
            while True:
                elapsed = time.perf_counter() - start
                if server.poll() is not None:
                    raise RuntimeError(f"klein-serve exited ({server.returncode}) before ready; see {log_path}")
                if elapsed > timeout_s:
                    raise RuntimeError(f"klein-serve not ready after {timeout_s:.0f} s; see {log_path}")
                status, body = _get(url)
                if status is not None and first_answer_s is None:
                    first_answer_s = elapsed
                if status == 200:
                    ready_s, programs = elapsed, json.loads(body)["compiled_programs"]
                    break
                time.sleep(POLL_S)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    found = READY_LINE.search(log_path.read_text(errors="replace"))
    return {"first_answer_s": first_answer_s, "ready_s": ready_s, "programs": programs,
            "compile_s": float(found.group(1)) if found else None}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.median(values) if values else None


def run(args) -> dict:
    """--runs starts with an empty cache each, then --runs with the cache the last one filled."""
    model_args = ["--model", args.model] if args.model else ["--demo"]
    work = pathlib.Path(tempfile.mkdtemp(prefix="klein-cold-start-"))
    report = {"schema": 1, "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv[1:]),
              "server_args": model_args + args.extra, "runs": args.runs, "host": reporting.host(),
              "load_average_start": os.getloadavg(), "states": {}}
    try:
        empty, warm = [], []
        for i in range(args.runs):
            cache = work / f"cache-{i}"
            empty.append(start_once(model_args, cache, args.extra, args.timeout_s, work / f"empty-{i}.log"))
            print("empty", empty[-1], file=sys.stderr, flush=True)
        for i in range(args.runs):
            warm.append(start_once(model_args, cache, args.extra, args.timeout_s, work / f"warm-{i}.log"))
            print("warm", warm[-1], file=sys.stderr, flush=True)
        report["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
        report["cache_files"] = sum(1 for f in cache.rglob("*") if f.is_file())
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    for name, runs in (("empty", empty), ("warm", warm)):
        report["states"][name] = {"runs": runs, **{k: _median(runs, k) for k in
                                                   ("first_answer_s", "ready_s", "programs", "compile_s")}}
    report["load_average_end"] = os.getloadavg()
    return report


def compile_child(cache: str, aspect_ratios: str, max_batch: int, started_s: float) -> dict:
    """In the child: klein-serve's compile phase for klein-4B shapes with abstract weights; seconds since started_s
    (time.time() at the parent's Popen)."""
    from klein_jax.compilation_cache import enable_compilation_cache
    from klein_jax.configs import FLUX2_VAE, KLEIN_4B, QWEN3_4B
    from klein_jax.demo_tokenizer import demo_prompt_tokenizer
    from klein_jax.loading import abstract_module
    from klein_jax.pipeline import KleinPipeline
    from server.settings import Settings

    enable_compilation_cache(cache)
    imported_s = time.time() - started_s
    modules = [abstract_module(name, config, "bfloat16")
               for name, config in (("transformer", KLEIN_4B), ("vae", FLUX2_VAE), ("text_encoder", QWEN3_4B))]
    pipe = KleinPipeline(*modules, demo_prompt_tokenizer(QWEN3_4B.vocab_size), is_distilled=True, dtype="bfloat16")
    built_s = time.time() - started_s
    batch_sizes = Settings(auth=False, max_batch=max_batch).batch_sizes  # what klein-serve compiles
    programs = pipe.compile(aspect_ratios.split(","), max_references=0, batch_sizes=batch_sizes)
    return {"imported_s": imported_s, "modules_s": built_s, "ready_s": time.time() - started_s,
            "programs": programs, "compile_s": pipe.sampler.compile_seconds}


def run_abstract_4b(args) -> dict:
    """--runs children with an empty cache each, then --runs with the cache the last one filled."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="klein-cold-start-4b-"))
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv[1:]), "runs": args.runs,
              "host": reporting.host(), "load_average_start": os.getloadavg(),
              "aspect_ratios": args.aspect_ratios, "max_batch": args.max_batch, "states": {}}
    try:
        for state in ("empty", "warm"):
            runs = []
            for i in range(args.runs):
                cache = work / f"cache-{i if state == 'empty' else args.runs - 1}"
                command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--compile-child", str(cache),
                           "--aspect-ratios", args.aspect_ratios, "--max-batch", str(args.max_batch),
                           "--started", repr(time.time())]
                runs.append(reporting.child_json(command, "compile child", timeout_s=args.timeout_s))
                print(state, runs[-1], file=sys.stderr, flush=True)
            report["states"][state] = {"runs": runs, **{k: _median(runs, k) for k in
                                                        ("imported_s", "modules_s", "ready_s", "compile_s")}}
        report["cache_files"] = sum(1 for f in cache.rglob("*") if f.is_file())
        report["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = os.getloadavg()
    return report


def _markdown(report: dict, command: str, what: str, columns: tuple[str, ...], cells) -> str:
    """A short paragraph (the machine, `what` ran, the warm cache's size) and one table row per cache state:
    cells(state), then each run's ready_s."""
    load, load_end = (reporting.format_load(report[k]) for k in ("load_average_start", "load_average_end"))
    paragraph = (f"Measured by `benchmarks/cold_start.py` ({report['date']}, `{command}`) on {report['host']}, "
                 f"load average {load} at the start and {load_end} at the end: "
                 f"{what} The warm cache held {report['cache_files']} files, "
                 f"{report['cache_bytes'] / 2**20:.1f} MiB.")
    rows = [[name, *cells(state), ", ".join(f"{r['ready_s']:.1f}" for r in state["runs"])]
            for name, state in report["states"].items()]
    return paragraph + "\n\n" + reporting.table(("compilation cache", *columns), rows)


def markdown_4b(report: dict) -> str:
    """A short paragraph and one table for --abstract-4b."""
    programs = report["states"]["empty"]["runs"][0]["programs"]
    what = (f"klein-4B shapes with abstract bfloat16 weights (no weights loaded, no HTTP server), the {programs} "
            f"programs of `klein-serve --aspect-ratios {report['aspect_ratios']} --max-batch {report['max_batch']} "
            f"--compile-references 0`, median of {report['runs']} processes per cache state.")
    columns = ("imports done (s)", "modules built (s)", "programs compiled or loaded (s)", "compile phase (s)",
               "each run (s)")
    return _markdown(report, report["command"], what, columns, lambda state: [
        f"{state[k]:.1f}" for k in ("imported_s", "modules_s", "ready_s", "compile_s")])


def markdown(report: dict) -> str:
    """A short paragraph and one table."""
    what = (f"`klein-serve {' '.join(report['server_args'])}`, median of {report['runs']} starts per cache "
            "state.")
    columns = ("first HTTP answer (s)", "`/readyz` 200 (s)", "programs", "compile/load phase (s)",
               "each run's `/readyz` (s)")
    return _markdown(report, report["command"] or "(defaults)", what, columns, lambda state: [
        reporting.cell(state[k], fmt) for k, fmt in
        (("first_answer_s", ".1f"), ("ready_s", ".1f"), ("programs", ".0f"), ("compile_s", ".1f"))])


def write_doc(text: str, name: str = "cold-start") -> None:
    """Replaces the section between the markers `name` in docs/benchmarks.md (appends one if missing)."""
    reporting.write_section(DOC, name, text, heading="")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="a klein-convert folder (or any klein-serve --model SRC); default: --demo")
    p.add_argument("--runs", type=int, default=3, help="starts per cache state")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per start")
    p.add_argument("--json", type=pathlib.Path, help="also write the JSON report to this file")
    p.add_argument("--keep", action="store_true", help="keep the cache folders and server logs (printed)")
    p.add_argument("--no-doc", action="store_true", help="leave docs/benchmarks.md as is")
    p.add_argument("--abstract-4b", action="store_true",
                   help="klein-4B shapes, abstract weights: the compile phase only, in a child process")
    p.add_argument("--aspect-ratios", default="square", help="with --abstract-4b")
    p.add_argument("--max-batch", type=int, default=1, help="with --abstract-4b")
    p.add_argument("--compile-child", metavar="CACHE", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="more klein-serve flags, after --")
    args = p.parse_args(argv)
    if args.compile_child:
        print(json.dumps(compile_child(args.compile_child, args.aspect_ratios, args.max_batch, args.started)))
        return 0
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.abstract_4b:
        report = run_abstract_4b(args)
        text = markdown_4b(report)
        reporting.emit(report, text, None)
        if not args.no_doc:
            write_doc(text, "cold-start-4b")
        return 0
    report = run(args)
    text = markdown(report)
    reporting.emit(report, text, args.json)
    if not args.no_doc:
        write_doc(text)
        print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # the child imports this checkout's klein_jax and server
    sys.exit(main())
