"""Soak and chaos run of klein-serve: mixed traffic against the demo server, then faults.

The soak sends --requests mixed requests from --concurrency clients: valid, invalid (401, 404, 405, 422), oversized
(413: Content-Length, chunked, too many fields), slow (a body trickled in pieces), cancelled (a client that leaves
mid-body: the server counts 499), SSRF (loopback, link-local, private, a DNS black hole). It checks that every
request is answered, that the server's /metrics status counts equal the client's, that no SSRF request reached the
trap server, and that the RSS is flat (the peak of the last 10 % of the run within 5 % of the first 10 %).

--chaos then checks three faults: SIGTERM under load (every request answered 200 or JSON, exit 0), a BaseException
injected into batches (tests/server_support.py's EchoPipeline: those requests 500, the worker goes on, /readyz stays
200), and a DNS black hole (look-ups end at --dns-timeout-s; /healthz latency meanwhile).

    .venv/bin/python benchmarks/soak.py                        # 10,000 requests + chaos, figures into docs/server.md
    .venv/bin/python benchmarks/soak.py --requests 200 --no-chaos --no-write
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import platform
import random
import re
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time

import httpx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from server_support import RecordingServer, ServerProcess, echo_server_command, png_bytes, rss_bytes  # noqa: E402
import reporting  # noqa: E402

DOCS = REPO / "docs" / "server.md"
KEY = "soak-key"
MIB = 2**20
MAX_BODY = 2 * MIB
KINDS = {"valid": 8, "invalid": 30, "oversized": 10, "slow": 6, "cancelled": 8, "ssrf": 20, "health": 18}


@dataclasses.dataclass
class Outcome:
    kind: str
    route: str  # the route label the server counts it under
    status: int | None  # None: no HTTP answer (a transport error), or a deliberate cancel
    ms: float
    error: str = ""


# ---- one request of each kind ----

def _raw(port: int, head: str, pieces: list[bytes], pause_s: float = 0.0, *, leave: bool = False) -> int | None:
    """Sends head and body pieces on a fresh socket; the response status, or None if `leave` (closes mid-body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head.encode())
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:
                break  # the server answered (413) and stopped reading
            if pause_s:
                time.sleep(pause_s)
        if leave:
            return None
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed without an answer")
            data += chunk
        return int(data.split(b" ", 2)[1])


def _head(method: str, path: str, content_type: str, length: int | None, key: str | None = KEY) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}", "Connection: close"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return "\r\n".join(lines) + "\r\n\r\n"


def _chunked(pieces: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


class Traffic:
    """The request kinds, against one server; SSRF targets point at a trap server and a DNS black hole."""

    def __init__(self, base_url: str, trap_port: int):
        self.base_url = base_url
        self.port = int(base_url.rsplit(":", 1)[1])
        self.trap_port = trap_port
        self.local = threading.local()

    def client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(base_url=self.base_url, timeout=600, trust_env=False)
        return self.local.client

    def post(self, data=None, files=None, key: str | None = KEY, **kw) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.client().post("/v1/generate", data=data, files=files, headers=headers, **kw).status_code

    def run(self, kind: str, rng: random.Random) -> tuple[str, int | None]:
        """(route label, status) of one request of `kind`."""
        gen = "/v1/generate"
        square = {"prompt": "soak", "aspect_ratio": "square"}
        if kind == "valid":
            return gen, self.post({**square, "seed": str(rng.randrange(1000))})
        if kind == "health":
            return "/healthz", self.client().get("/healthz").status_code
        if kind == "invalid":
            case = rng.randrange(8)
            if case == 0:
                return gen, self.post({**square, "aspect_ratio": "huge"})
            if case == 1:
                return gen, self.post(square, key=None)
            if case == 2:
                return gen, self.post(square, key="wrong-key")
            if case == 3:
                return gen, self.post({**square, "image_uris": "[not json"})
            if case == 4:
                return gen, self.post({**square, "model": "nope"})
            if case == 5:
                return gen, self.post(square, files=[("images", ("x.png", b"not an image", "image/png"))])
            if case == 6:
                return "unmatched", self.client().get(f"/nowhere/{rng.randrange(10**6)}").status_code
            return "unmatched", self.client().request(f"BREW{rng.randrange(10**6)}", "/healthz").status_code  # 405
        if kind == "oversized":
            case = rng.randrange(3)
            if case == 0:
                return gen, self.post(square, files=[("images", ("big.png", b"\0" * (MAX_BODY + 1), "image/png"))])
            if case == 1:
                body = [b"prompt=soak&x=" + b"a" * 65536] * (MAX_BODY // 65536 + 2)
                return gen, _raw(self.port, _head("POST", gen, "application/x-www-form-urlencoded", None),
                                 _chunked(body))
            return gen, self.post({**square, **{f"f{i}": "1" for i in range(40)}})
        if kind == "slow":  # a valid-looking body in 4 pieces over ~0.3 s: a full answer (422: bad aspect ratio)
            body = b"prompt=slow&aspect_ratio=huge&seed=1"
            pieces = [body[i:i + 10] for i in range(0, len(body), 10)]
            return gen, _raw(self.port, _head("POST", gen, "application/x-www-form-urlencoded", len(body)), pieces,
                             0.1)
        if kind == "cancelled":  # leaves mid-body: the server counts a 499
            _raw(self.port, _head("POST", gen, "application/x-www-form-urlencoded", 1000), [b"prompt=gone"], 0.05,
                 leave=True)
            return gen, 499
        case = rng.randrange(6)  # ssrf
        target = [f"http://127.0.0.1:{self.trap_port}/x.png", f"http://localhost:{self.trap_port}/x.png",
                  f"http://2130706433:{self.trap_port}/x.png", "http://169.254.169.254/latest/meta-data/",
                  "http://10.0.0.1/x.png", f"http://h{rng.randrange(10**6)}.black-hole.test/x.png"][case]
        return gen, self.post({**square, "image_uris": json.dumps([target])})


def metrics_counts(base_url: str) -> collections.Counter:
    """(route, status) -> requests counted by the server, /metrics itself left out."""
    text = httpx.get(base_url + "/metrics", trust_env=False, timeout=30).text
    counts = collections.Counter()
    for line in text.splitlines():
        if line.startswith("klein_requests_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels["route"] != "/metrics":
                counts[(labels["route"], int(labels["status"]))] += int(float(line.rsplit(" ", 1)[1]))
    return counts


# ---- the soak ----

def soak(server: ServerProcess, trap: RecordingServer, *, requests: int, concurrency: int, seed: int) -> dict:
    traffic = Traffic(server.base_url, trap.port)
    kinds = random.Random(seed).choices(list(KINDS), weights=list(KINDS.values()), k=requests)
    before = metrics_counts(server.base_url)
    outcomes: list[Outcome] = []
    rss: list[tuple[int, int]] = []  # (requests done, RSS bytes)
    lock = threading.Lock()

    def one(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        start = time.perf_counter()
        try:
            route, status = traffic.run(kinds[i], rng)
            outcome = Outcome(kinds[i], route, status, (time.perf_counter() - start) * 1000)
        except (httpx.HTTPError, OSError) as e:
            outcome = Outcome(kinds[i], "?", None, (time.perf_counter() - start) * 1000, f"{type(e).__name__}: {e}")
        with lock:
            outcomes.append(outcome)
            if len(outcomes) % max(1, requests // 200) == 0:
                rss.append((len(outcomes), rss_bytes(server.proc.pid)))

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall_s = time.perf_counter() - start
    time.sleep(2.0)  # the server notices the last cancelled clients
    after = metrics_counts(server.base_url)
    server_counts = after - before
    client_counts = collections.Counter((o.route, o.status) for o in outcomes if o.status is not None)
    window = max(1, len(rss) // 10)
    first = max(r for _, r in rss[:window])
    last = max(r for _, r in rss[-window:])
    health_ms = sorted(o.ms for o in outcomes if o.kind == "health" and o.status == 200)
    black_hole_ms = [o.ms for o in outcomes if o.kind == "ssrf" and o.status == 422 and o.ms > 500]
    return {
        "requests": requests, "concurrency": concurrency, "wall_s": round(wall_s, 1),
        "kinds": dict(collections.Counter(kinds)),
        "statuses": dict(sorted(collections.Counter(o.status for o in outcomes).items(), key=lambda kv: str(kv[0]))),
        "unanswered": sum(1 for o in outcomes if o.status is None),
        "errors": [o.error for o in outcomes if o.error][:5],
        "metrics_equal_client": server_counts == client_counts,
        "metrics_mismatch": {f"{k[0]} {k[1]}": (server_counts[k], client_counts[k])
                             for k in set(server_counts) | set(client_counts) if server_counts[k] != client_counts[k]},
        "trap_connections": len(trap.requests),
        "rss_first10_mib": round(first / MIB, 1), "rss_last10_mib": round(last / MIB, 1),
        "rss_change_pct": round(100 * (last - first) / first, 2),
        "rss_max_mib": round(max(r for _, r in rss) / MIB, 1),
        "healthz_p50_ms": round(health_ms[len(health_ms) // 2], 1) if health_ms else None,
        "healthz_p99_ms": round(health_ms[int(len(health_ms) * 0.99)], 1) if health_ms else None,
        "black_hole_ms_median": round(statistics.median(black_hole_ms), 1) if black_hole_ms else None,
    }


def soak_failures(result: dict) -> list[str]:
    problems = []
    if result["unanswered"]:
        problems.append(f"{result['unanswered']} requests unanswered: {result['errors']}")
    if not result["metrics_equal_client"]:
        problems.append(f"/metrics differs from the client (server, client): {result['metrics_mismatch']}")
    if result["trap_connections"]:
        problems.append(f"{result['trap_connections']} SSRF requests reached the trap server")
    if abs(result["rss_change_pct"]) > 5:
        problems.append(f"RSS not flat: {result['rss_change_pct']} % from the first 10 % to the last")
    if 500 in result["statuses"] or 504 in result["statuses"]:
        problems.append(f"5xx answers: {result['statuses']}")
    return problems


# ---- chaos ----

def chaos_sigterm(tmp: pathlib.Path, black_hole_port: int, trap: RecordingServer) -> dict:
    """SIGTERM while 40 mixed requests (8 valid) are in flight: every one answered (200, 4xx or 503; a request sent
    after the listener closed is refused), then exit 0."""
    server = demo_server(tmp, "sigterm", black_hole_port, drain_s=20)
    traffic = Traffic(server.base_url, trap.port)
    kinds = ["valid"] * 8 + ["slow", "invalid", "ssrf", "health"] * 8
    answers: list = []

    def one(i: int):
        try:
            return traffic.run(kinds[i], random.Random(i))[1]
        except (httpx.HTTPError, OSError) as e:
            return f"{type(e).__name__}"

    with concurrent.futures.ThreadPoolExecutor(len(kinds)) as pool:
        futures = [pool.submit(one, i) for i in range(len(kinds))]
        time.sleep(1.0)
        sent = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
        code = server.proc.wait(60)
    exit_s = time.perf_counter() - sent
    statuses = collections.Counter(answers)
    refused = sum(n for a, n in statuses.items() if a == "ConnectError")  # sent after the listener closed
    answered = all(a in (200, 401, 404, 405, 413, 422, 503) or a == "ConnectError" for a in answers)
    return {"requests": len(kinds), "answers": {str(k): v for k, v in statuses.items()}, "exit_code": code,
            "exit_s_after_sigterm": round(exit_s, 1), "ok": code == 0 and answered and refused < len(kinds)}


def chaos_worker_fault(tmp: pathlib.Path) -> dict:
    """200 requests on the EchoPipeline server, every 10th raising a BaseException in its batch."""
    (tmp / "fault").mkdir()
    server = ServerProcess(["--no-auth", "--aspect-ratios", "square", "--max-batch", "1", "--max-queue", "64"],
                           tmp / "fault", launcher=echo_server_command(delay_s=0.01))
    try:
        server.wait_ready()

        def one(i: int) -> int:
            prompt = "fault:base" if i % 10 == 0 else f"soak {i}"
            return httpx.post(server.base_url + "/v1/generate", data={"prompt": prompt, "aspect_ratio": "square"},
                              timeout=60, trust_env=False).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(one, range(200)))
        ready = httpx.get(server.base_url + "/readyz", trust_env=False).status_code
        faults = re.search(r"^klein_batch_failures_total (\S+)$", httpx.get(server.base_url + "/metrics",
                                                                             trust_env=False).text, re.M).group(1)
    finally:
        server.stop()
    counts = collections.Counter(statuses)
    return {"requests": 200, "statuses": dict(counts), "readyz_after": ready, "batch_failures": float(faults),
            "ok": counts[500] == 20 and counts[200] == 180 and ready == 200}


def demo_server(tmp: pathlib.Path, name: str, black_hole_port: int, *, drain_s: float = 30) -> ServerProcess:
    folder = tmp / name
    folder.mkdir()
    server = ServerProcess(
        ["--demo", "--aspect-ratios", "square", "--compile-references", "0", "--max-batch", "1", "--max-queue", "4",
         "--timeout-s", "300", "--max-body-bytes", str(MAX_BODY), "--max-image-bytes", str(MIB),
         "--dns-servers", f"127.0.0.1:{black_hole_port}", "--dns-timeout-s", "1", "--drain-timeout-s", str(drain_s)],
        folder, env={"KLEIN_API_KEYS": KEY, "KLEIN_COMPILE_CACHE": str(tmp / "compile-cache")})
    server.wait_ready()
    return server


def write_docs(results: dict, command: str, path: pathlib.Path = DOCS) -> None:
    lines = [f"Measured by `{command}` on {platform.machine()}, {os.cpu_count()} CPUs "
             f"({time.strftime('%Y-%m-%d')}): demo model, square, --max-queue 4 --max-batch 1.", "",
             "| run | figure | value |", "|---|---|---|"]
    for run, figures in results.items():
        for name, value in figures.items():
            lines.append(f"| {run} | {name} | {json.dumps(value) if not isinstance(value, str) else value} |")
    reporting.write_section(path, "soak", "\n".join(lines), heading="")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chaos", action="store_true", help="skip the SIGTERM, worker-fault and DNS chaos runs")
    p.add_argument("--no-write", action="store_true", help="do not update docs/server.md")
    args = p.parse_args(argv)
    black_hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a DNS server that never answers
    black_hole.bind(("127.0.0.1", 0))
    trap = RecordingServer("127.0.0.1", routes={"/x.png": (200, {}, png_bytes())})
    results, problems = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        server = demo_server(tmp, "soak", black_hole.getsockname()[1])
        try:
            results["soak"] = soak(server, trap, requests=args.requests, concurrency=args.concurrency,
                                   seed=args.seed)
        finally:
            server.stop()
        problems += soak_failures(results["soak"])
        if not args.no_chaos:
            results["chaos: SIGTERM under load"] = chaos_sigterm(tmp, black_hole.getsockname()[1], trap)
            results["chaos: BaseException in every 10th batch"] = chaos_worker_fault(tmp)
            problems += [f"{name} failed: {r}" for name, r in results.items() if name != "soak" and not r["ok"]]
    trap.close()
    print(json.dumps(results, indent=1))
    if not args.no_write:
        write_docs(results, " ".join(["python benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]))
    for problem in problems:
        print("FAIL:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
