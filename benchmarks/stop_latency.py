"""Seconds from Ctrl-C to the exit of ``pipeopt run``, per executor.

Each case starts ``python -m pipeopt.cli run`` in a subprocess with two
slots and a pipeline whose two running bodies ignore cancellation (they
wait on an event nobody sets), waits until both run, sends a real
``SIGINT`` and measures how long the process takes to exit. Running bodies
get ``--interrupt-grace`` seconds to return; the figure shown next to the
exit time is that time minus the grace, so what the run itself spends
stopping (cancelling, terminating worker processes, closing a Dask
cluster, recording every state and printing the result) is visible on
its own. The target is at most 2 s from the signal to the exit with the
CLI's default grace.

Usage::

    python benchmarks/stop_latency.py                      # every executor, 3 repetitions
    python benchmarks/stop_latency.py --executors process,dask --repeat 5 --grace 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

EXECUTORS = ("thread", "sync", "process", "async", "dask")

BODIES = """
import threading
from pathlib import Path

_never = threading.Event()


def wait_forever(mark):
    Path(mark).touch()  # tells the benchmark this body runs
    _never.wait(600)  # and ignores cancellation


def nothing(**_upstream):
    return None
"""

PIPELINE = """
import functools
from pathlib import Path

from pipeopt import Pipeline, PipelineTask
from stopbodies import nothing, wait_forever

here = Path(__file__).parent
pipeline = Pipeline("stuck")
for name in ("first", "second"):
    pipeline.add(PipelineTask(name, functools.partial(wait_forever, str(here / name))))
pipeline.add(PipelineTask("after", nothing, dependencies=["first", "second"]))
"""


def _wait_until_running(proc: subprocess.Popen[str], marks: list[Path], what: str) -> None:
    """Return once every file in ``marks`` exists (each body touches its own when it starts)."""
    give_up = time.monotonic() + 120
    while not all(mark.exists() for mark in marks):
        if proc.poll() is not None or time.monotonic() > give_up:
            proc.kill()
            raise RuntimeError(f"{what}: the run never started its bodies: {proc.communicate()[1]}")
        time.sleep(0.01)


def stop_once(executor: str, grace: float | None) -> float:
    """Run the pipeline on ``executor``, send SIGINT once it runs, return seconds to the exit."""
    with tempfile.TemporaryDirectory() as folder:
        here = Path(folder)
        (here / "stopbodies.py").write_text(textwrap.dedent(BODIES))
        (here / "stuck.py").write_text(textwrap.dedent(PIPELINE))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, *sys.path])}
        grace_option = [] if grace is None else ["--interrupt-grace", str(grace)]
        command = [sys.executable, "-m", "pipeopt.cli", "run", "stuck.py", "--json"]
        command += ["--workers", "2", "--executor", executor, *grace_option]
        pipe = subprocess.PIPE
        with subprocess.Popen(
            command, cwd=here, env=env, stdout=pipe, stderr=pipe, text=True
        ) as proc:
            # The sync executor runs one body at a time: "second" never starts there.
            marks = [here / "first"] if executor == "sync" else [here / "first", here / "second"]
            _wait_until_running(proc, marks, executor)
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=120)
            took = time.monotonic() - sent
        if proc.returncode != 130 or json.loads(out)["status"] != "cancelled":
            raise RuntimeError(f"{executor}: exit {proc.returncode}, not a cancelled run: {err}")
        return took


def _default_grace() -> float:
    """Return the interrupt grace ``pipeopt run`` uses without ``--interrupt-grace``."""
    import inspect

    from pipeopt import PipelineOptimizer

    return float(inspect.signature(PipelineOptimizer).parameters["interrupt_grace"].default)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, measure each executor and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--executors", default=",".join(EXECUTORS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (median is shown)")
    parser.add_argument(
        "--grace", type=float, default=None, help="--interrupt-grace to pass (CLI default if unset)"
    )
    args = parser.parse_args(argv)
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    unknown = [e for e in executors if e not in EXECUTORS]
    if unknown or args.repeat < 1:
        parser.error(f"executors must be among {', '.join(EXECUTORS)}, and --repeat >= 1")
    grace = args.grace if args.grace is not None else _default_grace()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cpus, grace {grace:g} s, "
        f"{args.repeat} repetition(s), load average {load:.2f} at the start",
        file=sys.stderr,
    )
    times: dict[str, list[float]] = {e: [] for e in executors}
    for rep in range(args.repeat):
        for executor in executors[rep % len(executors) :] + executors[: rep % len(executors)]:
            times[executor].append(stop_once(executor, args.grace))
            print(f"  {executor:<8} rep {rep + 1}: {times[executor][-1]:.2f} s", file=sys.stderr)
    print("| executor | SIGINT → exit, s (median) | max | beyond the grace, s (median) |")
    print("|---|---|---|---|")
    for executor, seen in times.items():
        median = statistics.median(seen)
        # The sync executor runs the body in the main thread: Ctrl-C lands in it, no grace.
        beyond = median - (0.0 if executor == "sync" else grace)
        print(f"| {executor} | {median:.2f} | {max(seen):.2f} | {beyond:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
