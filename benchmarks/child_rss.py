"""Run a benchmark's child process and read its own peak RSS.

wait4's and getrusage's maxrss keep the parent's pages at fork time (which can hold gigabytes of vectors), so the
child reports VmHWM of its own address space at exit, on stderr, and `run` reads it back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PEAK = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            sys.stderr.write(f'\\nPEAK_RSS_KB {line.split()[1]}\\n')\n"
    "atexit.register(_peak)\n"
)
# `python -c CLI ARGS...` is `simsearch ARGS...` with its peak RSS reported
CLI = PEAK + "import sys\nfrom simsearch.cli import main\nsys.argv = ['simsearch', *sys.argv[1:]]\nmain()\n"


def run(cmd: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """stdout, wall seconds and peak RSS (MiB, as the child measured itself) of one child; SystemExit on failure."""
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(cmd[:4])} ...\n{p.stderr[-3000:]}")
    peak = [line.split()[1] for line in p.stderr.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return p.stdout, wall, int(peak[-1]) / 1024 if peak else float("nan")


def cli_json(*args: str | Path) -> dict:
    """`simsearch ARGS --json` of this checkout in a child process: its JSON answer; SystemExit on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out, _, _ = run([sys.executable, "-c", CLI, *map(str, args), "--json"], env)
    return json.loads(out)
