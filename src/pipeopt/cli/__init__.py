"""The ``pipeopt`` command line.

One module per command, each adding its subcommands to the parser and
importing only the layers below it::

    app.py      exit codes, parser, console, safe text, main()
    load.py     FILE[:PIPELINE] -> Pipeline
    session.py  one run on the command line: dashboard, progress, signals, summary
    run.py      pipeopt run
    graph.py    pipeopt graph
    demo.py     pipeopt demo
    bench.py    pipeopt bench
    history.py  pipeopt history, pipeopt show
    resume.py   pipeopt resume
    ui.py       pipeopt ui

Heavy imports (the optimizer, the dashboard, the benchmark suite, the run
store) happen inside the commands, so ``pipeopt --help`` stays quick.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeopt.cli import app, bench, demo, graph, history, resume, run, ui
from pipeopt.cli.app import ExitCode
from pipeopt.cli.load import load_pipeline

COMMANDS: tuple[app.Command, ...] = (run, graph, demo, bench, history, resume, ui)

__all__ = ["COMMANDS", "ExitCode", "build_parser", "load_pipeline", "main"]


def build_parser() -> app.Parser:
    """Return the ``pipeopt`` argument parser with every command."""
    return app.build_parser(COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pipeopt`` with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    return app.main(COMMANDS, sys.argv[1:] if argv is None else argv)
