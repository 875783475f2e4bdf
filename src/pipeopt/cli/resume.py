"""``pipeopt resume [RUN_ID | --last]``: run again only what did not succeed in a recorded run.

The pipeline comes from the file the run was started from (recorded by
``pipeopt run``; for a resumed run, from the run it resumed) or from
``--file``. The resumed run is a run like any other: progress, dashboard,
Ctrl-C and SIGTERM behave as for ``pipeopt run``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeopt.cli import options
from pipeopt.cli.app import MAX_WORKERS, Parser, add_state_dir_option, clean
from pipeopt.cli.history import open_store
from pipeopt.cli.load import load_pipeline, source_of
from pipeopt.cli.run import add_run_options, make_optimizer
from pipeopt.cli.session import add_dashboard_options, run_session
from pipeopt.errors import PipeoptError, UsageError
from pipeopt.executors.registry import EXECUTOR_NAMES

if TYPE_CHECKING:
    from pipeopt.result import RunResult
    from pipeopt.store import RunStore, RunSummary


def register(commands: argparse._SubParsersAction[Parser]) -> None:
    """Add ``resume``."""
    parser = commands.add_parser(
        "resume", help="run again only what did not succeed in a recorded run"
    )
    parser.add_argument("run_id", metavar="RUN_ID", nargs="?", default=None, help="default: --last")
    parser.add_argument("--last", action="store_true", help="resume the newest run")
    parser.add_argument(
        "--file",
        metavar="FILE[:PIPELINE]",
        default=None,
        help="the pipeline to run (default: the file the run was started from)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="resume even if the pipeline's structure or a --param changed",
    )
    add_run_options(parser, inherit=True)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_state_dir_option(parser)
    add_dashboard_options(parser)
    parser.set_defaults(func=resume)


def _recorded_source(store: RunStore, run: RunSummary) -> str | None:
    """Return the pipeline file of ``run``, or of the run it resumed, and so on."""
    seen = {run.run_id}
    while run.source is None and run.resumed_from is not None and run.resumed_from not in seen:
        seen.add(run.resumed_from)
        try:
            run = store.summary(run.resumed_from)
        except PipeoptError:
            return None
    return run.source


def resume(args: argparse.Namespace) -> int:
    """Resume a recorded run; exit codes as for ``pipeopt run``."""
    if args.last and args.run_id is not None:
        raise UsageError("give a RUN_ID or --last, not both")
    with open_store(args) as store:
        run = store.summary(store.resolve_run(args.run_id))
        source = source_of(args.file) if args.file else _recorded_source(store, run)
    if source is None:
        raise UsageError(
            f"run {run.run_id} has no recorded pipeline file; pass --file FILE[:PIPELINE]"
        )
    pipeline = load_pipeline(source)
    if pipeline.name != run.pipeline:
        raise UsageError(
            f"{source} holds pipeline {pipeline.name!r}, but run {run.run_id} "
            f"is a run of {run.pipeline!r}; pass its file with --file"
        )
    params = options.run_params(args, pipeline)
    workers = options.workers(args, MAX_WORKERS) or run.workers
    executor = options.executor(args, EXECUTOR_NAMES) or run.executor
    with make_optimizer(args, workers=workers, executor=executor) as optimizer:

        def record_source(result: RunResult) -> None:
            # So that this run can be resumed in turn.
            store = optimizer.store
            assert store is not None
            try:
                store.set_source(result.run_id, source)
            except PipeoptError as exc:
                print(f"pipeopt resume: warning: {clean(exc)}", file=sys.stderr)

        return run_session(
            optimizer,
            args,
            lambda: optimizer.resume(pipeline, run.run_id, force=args.force, params=params or None),
            title=pipeline.name,
            total=len(pipeline),
            after=record_source,
        )
