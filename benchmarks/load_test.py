"""Load test of klein-serve on loopback: concurrency at twice the queue capacity, bounded in time.

Checks that overload is answered with 503 at once (only 200 and 503 come back), that every request gets an answer
(none lost to a transport error), and that the server's RSS stays flat. Prints throughput, p50/p99 latency and RSS
at start and end, and writes them to docs/server.md (between the load-test markers).

    .venv/bin/python benchmarks/load_test.py                      # starts `python -m server --demo` itself
    .venv/bin/python benchmarks/load_test.py --requests 300 --no-write
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --server-pid 1234 --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "server.md"


@dataclasses.dataclass
class LoadResult:
    """What one load run measured."""

    requests: int
    concurrency: int
    wall_s: float
    statuses: dict[int, int]
    lost: int  # requests without an HTTP answer (transport errors, timeouts)
    latency_ms_200: list[float]
    rss_samples: list[int]  # server RSS every 0.5 s, from the start of the load to its end
    error_samples: list[str]

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def percentile_ms(self, q: float) -> float:
        """q-th percentile (0-100) of the 200 latencies, nearest rank."""
        if not self.latency_ms_200:
            return float("nan")
        ordered = sorted(self.latency_ms_200)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]

    def summary(self) -> dict:
        """The numbers that are printed and written to the docs."""
        mib = 2**20
        rss = self.rss_samples
        return {
            "requests": self.requests, "concurrency": self.concurrency, "wall_s": round(self.wall_s, 1),
            "statuses": dict(sorted(self.statuses.items())), "lost": self.lost,
            "throughput_rps": round(self.answered / self.wall_s, 1),
            "images_per_s": round(self.statuses.get(200, 0) / self.wall_s, 2),
            "p50_ms_200": round(self.percentile_ms(50), 1), "p95_ms_200": round(self.percentile_ms(95), 1),
            "p99_ms_200": round(self.percentile_ms(99), 1),
            "rss_start_mib": round(rss[0] / mib, 1) if rss else None,
            "rss_end_mib": round(rss[-1] / mib, 1) if rss else None,
            "rss_max_mib": round(max(rss) / mib, 1) if rss else None,
        }


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _load(base_url: str, *, requests: int, concurrency: int, duration_s: float, api_key: str | None,
                aspect_ratio: str, backoff_ms: float | None, server_pid: int | None) -> LoadResult:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    statuses: collections.Counter = collections.Counter()
    latencies: list[float] = []
    errors: list[str] = []
    rss = [rss_bytes(server_pid)] if server_pid else []
    next_index = iter(range(requests))
    deadline = time.monotonic() + duration_s
    lost = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal lost
        for i in next_index:
            if time.monotonic() > deadline:
                return
            form = {"prompt": f"load test request {i}", "aspect_ratio": aspect_ratio, "seed": str(i)}
            start = time.perf_counter()
            try:
                response = await client.post("/v1/generate", data=form, headers=headers)
            except httpx.HTTPError as e:
                lost += 1
                errors.append(f"{type(e).__name__}: {e}")
                continue
            statuses[response.status_code] += 1
            if response.status_code == 200:
                latencies.append((time.perf_counter() - start) * 1000.0)
            elif response.status_code == 503:  # back off as told (Retry-After), or as configured
                pause_s = float(response.headers.get("retry-after", 1)) if backoff_ms is None else backoff_ms / 1000
                await asyncio.sleep(pause_s)
            else:
                errors.append(f"{response.status_code}: {response.text[:200]}")

    async def sample_rss() -> None:
        while server_pid:
            await asyncio.sleep(0.5)
            rss.append(rss_bytes(server_pid))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(300.0),
                                 trust_env=False) as client:
        sampler = asyncio.ensure_future(sample_rss())
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        sampler.cancel()
    wall_s = time.perf_counter() - start
    if server_pid:
        rss.append(rss_bytes(server_pid))
    sent = sum(statuses.values()) + lost
    return LoadResult(requests=sent, concurrency=concurrency, wall_s=wall_s, statuses=dict(statuses), lost=lost,
                      latency_ms_200=latencies, rss_samples=rss, error_samples=errors[:5])


def run_load(base_url: str, *, requests: int, concurrency: int, duration_s: float = 600.0,
             api_key: str | None = None, aspect_ratio: str = "square", backoff_ms: float | None = None,
             server_pid: int | None = None, warmup: int = 8) -> LoadResult:
    """Sends `requests` generate requests from `concurrency` clients (stopping at duration_s); warm-up excluded.

    backoff_ms: a client's pause after a 503; None honours the server's Retry-After.
    """
    if warmup:  # as concurrent as the load itself, so that every batch size has run once before RSS is measured
        asyncio.run(_load(base_url, requests=warmup, concurrency=min(warmup, concurrency), duration_s=duration_s,
                          api_key=api_key, aspect_ratio=aspect_ratio, backoff_ms=backoff_ms, server_pid=None))
    return asyncio.run(_load(base_url, requests=requests, concurrency=concurrency, duration_s=duration_s,
                             api_key=api_key, aspect_ratio=aspect_ratio, backoff_ms=backoff_ms,
                             server_pid=server_pid))


def start_demo_server(max_queue: int, max_batch: int, aspect_ratio: str, request_timeout_s: float,
                      log_dir: pathlib.Path, timeout_s: float = 600.0,
                      extra: tuple[str, ...] = (), launcher: tuple[str, ...] = ("-m", "server")
                      ) -> tuple[subprocess.Popen, str]:
    """`python -m server --demo --no-auth [EXTRA...]` on a free loopback port (`launcher` replaces `-m server`: a
    script that runs klein-serve's main); returns (process, base URL) once ready."""
    stderr_path = log_dir / "server.stderr"
    proc = subprocess.Popen(
        [sys.executable, *launcher, "--demo", "--no-auth", "--host", "127.0.0.1", "--port", "0",
         "--max-queue", str(max_queue), "--max-batch", str(max_batch), "--aspect-ratios", aspect_ratio,
         "--timeout-s", str(request_timeout_s), "--compile-references", "0", *extra],  # the load is text-to-image
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(stderr_path, "wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = stderr_path.read_text(errors="replace")
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log[-2000:]}")
        url = re.search(r"serving on (http://\S+)", log)
        if url and "klein-serve ready on" in log:
            return proc, url.group(1)
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"server not ready after {timeout_s} s")


def write_docs(summary: dict, settings: dict, path: pathlib.Path = DOCS) -> None:
    """Replaces the load-test section of docs/server.md with these numbers."""
    import reporting  # here: tests load this file by path, without benchmarks/ on sys.path

    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    text = (f"Measured by `{settings['command']}` on {settings['machine']} "
            f"({time.strftime('%Y-%m-%d')}): demo model, {settings['aspect_ratio']}, --max-queue "
            f"{settings['max_queue']} --max-batch {settings['max_batch']} --timeout-s {settings['timeout_s']:g}, "
            f"{summary['concurrency']} concurrent "
            f"clients (twice the queue), 503s retried after {settings['backoff']}.\n\n"
            f"| metric | value |\n|---|---|\n{rows}")
    reporting.write_section(path, "load-test", text, heading="## Load test")


def check(result: LoadResult, *, max_rss_growth_mib: float | None) -> list[str]:
    """The load test's pass conditions; returns the failures."""
    failures = []
    unexpected = {s: n for s, n in result.statuses.items() if s not in (200, 503)}
    if unexpected:
        failures.append(f"statuses other than 200/503: {unexpected} ({result.error_samples})")
    if result.lost:
        failures.append(f"{result.lost} requests got no answer: {result.error_samples}")
    if not result.statuses.get(200):
        failures.append("no request was accepted")
    if max_rss_growth_mib is not None and result.rss_samples:
        growth = (result.rss_samples[-1] - result.rss_samples[0]) / 2**20
        if growth > max_rss_growth_mib:
            failures.append(f"RSS grew by {growth:.1f} MiB (limit {max_rss_growth_mib} MiB)")
    return failures


def main(argv: list[str] | None = None) -> int:
    """Runs the load test; exit 0 if every check passed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", help="an already running server (else a --demo server is started)")
    p.add_argument("--server-pid", type=int, help="pid of the --url server, for RSS")
    p.add_argument("--api-key", default=None)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=8, help="requests sent (and not measured) before the load")
    p.add_argument("--duration-s", type=float, default=900.0, help="stop sending after this long")
    p.add_argument("--max-queue", type=int, default=4, help="queue of the started server; clients: twice this")
    p.add_argument("--max-batch", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=300.0,
                   help="--timeout-s of the started server: above the time a full queue takes to drain (a 1 MP demo "
                        "image takes ~10 s on a CPU), so that overload shows as 503s and not 504s")
    p.add_argument("--aspect-ratio", default="square")
    p.add_argument("--backoff-ms", type=float, default=100.0,
                   help="a client's pause after a 503; a negative value: the server's Retry-After")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0)
    p.add_argument("--no-write", action="store_true", help="do not update docs/server.md")
    args = p.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory() as log_dir:
        if args.url:
            url, pid = args.url, args.server_pid
        else:
            proc, url = start_demo_server(args.max_queue, args.max_batch, args.aspect_ratio, args.timeout_s,
                                          pathlib.Path(log_dir))
            pid = proc.pid
        try:
            result = run_load(url, requests=args.requests, concurrency=2 * args.max_queue,
                              duration_s=args.duration_s, api_key=args.api_key, aspect_ratio=args.aspect_ratio,
                              backoff_ms=None if args.backoff_ms < 0 else args.backoff_ms, server_pid=pid,
                              warmup=args.warmup)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    summary = result.summary()
    for key, value in summary.items():
        print(f"{key:>16}: {value}")
    failures = check(result, max_rss_growth_mib=args.max_rss_growth_mib)
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    if not args.no_write:
        command = "python benchmarks/load_test.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_docs(summary, {"command": command.strip(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                             "aspect_ratio": args.aspect_ratio, "max_queue": args.max_queue,
                             "max_batch": args.max_batch,
                             "backoff": "Retry-After" if args.backoff_ms < 0 else f"{args.backoff_ms:g} ms",
                             "timeout_s": args.timeout_s})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
