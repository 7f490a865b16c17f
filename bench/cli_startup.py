"""CLI start-up time: median wall time of `reprpo --help`, `reprpo train --help`, `reprpo shifts list`.

    python bench/cli_startup.py [--runs 5] [--limit 1.5]

Each command runs in a fresh subprocess (this interpreter, `-m reprpo.cli`), so the time
includes interpreter start and every import the command does. Target (issue 13): under 1.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = (["--help"], ["train", "--help"], ["shifts", "list"])


def wall_time(args: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "reprpo.cli", *args], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"reprpo {' '.join(args)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per command (default: %(default)s)")
    ap.add_argument("--limit", type=float, default=1.5, help="target seconds (default: %(default)s)")
    a = ap.parse_args()
    ok = True
    for args in COMMANDS:
        times = [wall_time(args) for _ in range(a.runs)]
        med = statistics.median(times)
        under = med < a.limit
        ok &= under
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"reprpo {' '.join(args):<14} median {med:.2f} s ({runs})  {'under' if under else 'OVER'} {a.limit} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
