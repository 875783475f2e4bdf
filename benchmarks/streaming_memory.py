"""Streaming memory: peak memory of streaming 10M rows against 1M rows.

Each case runs in a fresh subprocess, which first builds its input (a row
generator, a DataFrame in memory, or a CSV file on disk) and then streams it
in chunks of 50,000 rows through ``stream_iterable``, ``stream_dataframe`` or
``read_csv_chunks``, summing one column so every row is touched. Two figures
are taken while it streams (not while it builds the input):

* RSS: a thread samples ``/proc/self/statm`` every 2 ms; the figure is the
  highest RSS seen minus the RSS just before streaming began;
* traced: ``tracemalloc``'s peak over the streaming loop (Python objects and
  numpy buffers), in a second, separate run (tracing slows it down).

Streaming is flat when the 10M figure is within 10 % of the 1M figure. As a
control, ``materialised`` does what streaming avoids (``list(rows)``,
``pandas.read_csv`` of the whole file) and should grow about tenfold.

Usage::

    python benchmarks/streaming_memory.py            # 1M and 10M rows
    python benchmarks/streaming_memory.py --quick    # 100k and 1M rows
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHUNK = 50_000
PAGE = os.sysconf("SC_PAGE_SIZE")
CASES = ("iterable", "dataframe", "csv", "iterable (materialised)", "csv (materialised)")


def gen_rows(count: int) -> Iterator[tuple[int, int, float]]:
    """Yield ``count`` small rows."""
    for i in range(count):
        yield (i, i % 1000, i * 0.25)


def rss() -> int:
    """Return this process's resident set size in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


class PeakRss:
    """Sample RSS in a thread; ``peak`` is the highest value seen."""

    def __init__(self) -> None:
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def write_csv(path: Path, count: int) -> None:
    """Write ``count`` rows of ``a,b,c`` to ``path``."""
    with path.open("w") as out:
        out.write("a,b,c\n")
        lines: list[str] = []
        for a, b, c in gen_rows(count):
            lines.append(f"{a},{b},{c}\n")
            if len(lines) == 100_000:
                out.write("".join(lines))
                lines.clear()
        out.write("".join(lines))


def prepare(case: str, count: int, csv: Path) -> Callable[[], int]:
    """Build the input of ``case``; return the streaming loop, which returns the rows seen."""
    from pipeopt.streaming import read_csv_chunks, stream_dataframe, stream_iterable

    if case == "iterable":

        def loop() -> int:
            seen = 0
            for chunk in stream_iterable(gen_rows(count), CHUNK):
                seen += len(chunk)
                sum(row[1] for row in chunk)
            return seen

        return loop
    if case == "iterable (materialised)":
        return lambda: len(list(gen_rows(count)))
    import numpy as np
    import pandas as pd

    if case == "dataframe":
        df = pd.DataFrame(
            {
                "a": np.arange(count, dtype="int64"),
                "b": np.arange(count, dtype="int64") % 1000,
                "c": np.arange(count, dtype="float64") * 0.25,
            }
        )

        def frame_loop() -> int:
            seen = 0
            for chunk in stream_dataframe(df, CHUNK):
                seen += len(chunk)
                chunk["b"].sum()
            return seen

        return frame_loop
    if case == "csv":

        def csv_loop() -> int:
            seen = 0
            for chunk in read_csv_chunks(csv, CHUNK):
                seen += len(chunk)
                chunk["b"].sum()
            return seen

        return csv_loop
    if case == "csv (materialised)":
        return lambda: len(pd.read_csv(csv))
    raise ValueError(f"unknown case {case!r}")


def child(case: str, count: int, csv: Path, traced: bool) -> dict[str, Any]:
    """Measure one case in this process."""
    loop = prepare(case, count, csv)
    before = rss()
    started = time.perf_counter()
    if traced:
        tracemalloc.start()
        seen = loop()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"traced": peak, "rows": seen}
    with PeakRss() as sampler:
        seen = loop()
    return {
        "rss": sampler.peak - before,
        "rows": seen,
        "seconds": time.perf_counter() - started,
    }


def measure(case: str, count: int, csv: Path) -> dict[str, Any]:
    """Run ``case`` in two fresh subprocesses (RSS, then traced); return the figures."""
    out: dict[str, Any] = {}
    for traced in (False, True):
        argv = [sys.executable, __file__, "--child", case, str(count), str(csv)]
        if traced:
            argv.append("--traced")
        done = subprocess.run(argv, capture_output=True, text=True, check=True)
        out.update(json.loads(done.stdout))
    if out["rows"] != count:
        raise RuntimeError(f"{case}: streamed {out['rows']} rows, expected {count}")
    return out


def ratio(small: float, large: float) -> str:
    """Return large/small, or "flat" when both are under 1 MiB (a ratio of noise)."""
    if max(small, large) < 1024 * 1024:
        return "flat (< 1 MiB)"
    return f"{large / max(small, 1.0):.2f}"


def main(argv: list[str] | None = None) -> int:
    """Print the table; return 0."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k and 1M rows")
    parser.add_argument("--child", nargs=3, metavar=("CASE", "ROWS", "CSV"), help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, count, csv = args.child
        print(json.dumps(child(case, int(count), Path(csv), args.traced)))
        return 0

    small, large = (100_000, 1_000_000) if args.quick else (1_000_000, 10_000_000)
    started = time.perf_counter()
    mib = 1024 * 1024
    print(f"chunks of {CHUNK:,} rows; memory added while streaming, MiB\n")
    print(
        f"| case | RSS {small:,} | RSS {large:,} | ratio "
        f"| traced {small:,} | traced {large:,} | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="pipeopt-stream-") as folder:
        files = {n: Path(folder) / f"rows-{n}.csv" for n in (small, large)}
        for n, path in files.items():
            print(f"writing {n:,} rows of CSV", file=sys.stderr)
            write_csv(path, n)
        for case in CASES:
            print(f"measuring {case}", file=sys.stderr)
            a = measure(case, small, files[small])
            b = measure(case, large, files[large])
            print(
                f"| {case} | {a['rss'] / mib:.1f} | {b['rss'] / mib:.1f} "
                f"| {ratio(a['rss'], b['rss'])} | {a['traced'] / mib:.2f} "
                f"| {b['traced'] / mib:.2f} | {ratio(a['traced'], b['traced'])} |"
            )
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
