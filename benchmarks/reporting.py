"""What the benchmark scripts share: their marked sections of docs/*.md, table and load-average text, the JSON
report beside the table, and child processes that answer with one JSON line.

The scripts run as `python benchmarks/NAME.py`, so Python finds this module beside them (`import reporting`).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent


def markers(name: str, opening: str = "begin") -> tuple[str, str]:
    """The comment lines around section `name`: <!-- name:begin --> (or :start) and <!-- name:end -->."""
    return f"<!-- {name}:{opening} -->", f"<!-- {name}:end -->"


def section(name: str, text: str, opening: str = "begin") -> str:
    """`text` between the markers of section `name`, each on its own line."""
    begin, end = markers(name, opening)
    return f"{begin}\n{text}\n{end}"


def read_section(path: pathlib.Path, name: str, opening: str = "begin") -> str | None:
    """The text between the markers of section `name` in the file (newlines next to the markers included), or
    None where the file or the section is missing."""
    begin, end = markers(name, opening)
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    start = doc.find(begin)
    stop = doc.find(end, start + len(begin))
    return None if start < 0 or stop < 0 else doc[start + len(begin):stop]


def write_section(path: pathlib.Path, name: str, text: str, *, opening: str = "begin",
                  heading: str | None = None) -> None:
    """Replaces the text between the markers of section `name` in the Markdown file at `path` by `text`. A file
    without the section gets it appended under `heading` ("" for none); with heading None that is an error."""
    begin, end = markers(name, opening)
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    start = doc.find(begin)
    stop = doc.find(end, start + len(begin)) if start >= 0 else -1
    block = section(name, text, opening)
    if start >= 0 and stop >= 0:
        doc = doc[:start] + block + doc[stop + len(end):]
    elif start >= 0 or heading is None:
        raise SystemExit(f"{path} has no {begin} ... {end} section")
    else:
        doc = "\n\n".join(part for part in (doc.rstrip(), heading, block) if part) + "\n"
    path.write_text(doc, encoding="utf-8")


def table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: a header row, the separator, then one line per row of cells (an empty cell is "| |")."""
    def line(cells: Sequence[str]) -> str:
        return "|" + "".join(f" {cell} |" if cell != "" else " |" for cell in cells)

    return "\n".join([line(columns), "|" + "---|" * len(columns), *(line(row) for row in rows)])


def cell(value, fmt: str) -> str:
    """A table cell: the value formatted, or "-" for None."""
    return "-" if value is None else format(value, fmt)


def format_load(load_average: Iterable[float]) -> str:
    """A load average (1, 5, 15 min, as os.getloadavg() gives it) as "1.2, 0.8, 0.5"."""
    return ", ".join(f"{a:.1f}" for a in load_average)


def proc_load() -> str:
    """The load average as /proc/loadavg writes it ("1.28 1.31 1.46"), or "?" where there is no such file."""
    if not os.path.exists("/proc/loadavg"):
        return "?"
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def host() -> str:
    """This machine for a table's caption: the CPU's model, its cores and the vector units that set CPU speed, e.g.
    "AMD EPYC (AVX-512, AVX512-BF16, no AMX), 2 CPU cores". CPU figures from different hosts do not compare."""
    model, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    units = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    if flags:
        units.append("AMX" if "amx_bf16" in flags else "no AMX")
    described = f"{model} ({', '.join(units)})" if units else model
    return f"{described}, {os.cpu_count()} CPU cores"


def emit(report: dict, text: str, json_path: pathlib.Path | None) -> None:
    """Prints the JSON report and its Markdown text; also writes the JSON to json_path unless it is None."""
    print(json.dumps(report, indent=1))
    print(text)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")


def child_json(command: list[str], what: str, *, env: dict[str, str] | None = None,
               timeout_s: float | None = None) -> dict:
    """Runs a child process in the checkout's root and returns the JSON of its last stdout line; RuntimeError (with
    the end of its stderr) if it fails."""
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def command_line(script: str, argv: list[str] | None) -> str:
    """How a script was run, for a table's caption: `python benchmarks/NAME.py ARGS`."""
    return f"python benchmarks/{pathlib.Path(script).name} " + " ".join(argv if argv is not None else sys.argv[1:])
